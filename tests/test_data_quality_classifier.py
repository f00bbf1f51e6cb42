"""The quality classifier on the real corpora: deterministic training, held-out accuracy, and its
scores and threshold inside a `kinoe data` run."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest
from pydantic import ValidationError

from common.run import run_stage
from data_prep.cli import STAGE as DATA
from data_prep.config import DataConfig
from data_prep.quality_train import STAGE as TRAIN
from data_prep.quality_train import QualityTrainConfig


def training_config(shared, root, name: str) -> QualityTrainConfig:
    corpus = shared / "corpus"
    return QualityTrainConfig.model_validate(
        {
            "run": {"root": str(root), "name": name},
            "positives": [
                {
                    "name": "wikipedia",
                    "kind": "jsonl",
                    "path": str(corpus),
                    "glob": "wikipedia_ja_leads.jsonl.gz",
                    "preset": "wikipedia",
                },
                {
                    "name": "aozora",
                    "kind": "aozora",
                    "path": str(corpus / "aozora"),
                    "glob": "card000081.tar.gz",
                },
            ],
            "negatives": [
                {
                    "name": "web",
                    "kind": "jsonl",
                    "path": str(corpus),
                    "glob": "fineweb2_ja_web.jsonl.gz",
                }
            ],
            "fasttext": {"bucket": 20_000},
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/SOURCES.md)")
    root = tmp_path_factory.mktemp("quality")
    result = run_stage(TRAIN, training_config(SHARED_DATA, root, "first"))
    return {"root": root, "run_dir": result.run_dir, "shared": SHARED_DATA}


def test_training_is_deterministic_and_tells_reference_text_from_web(trained):
    again = run_stage(TRAIN, training_config(trained["shared"], trained["root"], "second"))

    def digest(folder):
        return hashlib.sha256((folder / "model.bin").read_bytes()).hexdigest()

    assert digest(trained["run_dir"]) == digest(again.run_dir)
    report = json.loads((trained["run_dir"] / "report.json").read_text())
    assert report["held_out_accuracy_balanced"] >= 0.85
    kept = report["held_out_documents_kept_per_threshold"]
    assert kept["wikipedia"]["0.5"] > 0.8 and kept["web"]["0.5"] < 0.3
    manifest = json.loads((trained["run_dir"] / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert any("model.bin" in key for key in json.dumps(manifest["outputs"]).split('"'))


def test_scores_go_into_metadata_and_the_threshold_removes_web_pages(trained, tmp_path):
    corpus = trained["shared"] / "corpus"
    config = DataConfig.model_validate(
        {
            "run": {"root": str(tmp_path), "name": "scored"},
            "sources": [
                {
                    "name": "wikipedia",
                    "kind": "jsonl",
                    "path": str(corpus),
                    "glob": "wikipedia_ja_leads.jsonl.gz",
                    "preset": "wikipedia",
                    "min_quality_score": 0.0,  # scored, nothing removed
                },
                {
                    "name": "web",
                    "kind": "jsonl",
                    "path": str(corpus),
                    "glob": "fineweb2_ja_web.jsonl.gz",
                    "min_quality_score": 0.5,
                },
            ],
            "dedup": {"exact": False, "minhash": {"enabled": False}},
            "quality": {"model": str(trained["run_dir"])},
            "executor": {"tasks": 1, "workers": 1},
        }
    )
    run_dir = run_stage(DATA, config).run_dir
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["balanced"]
    row = next(r for r in report["steps"] if r["step"] == "quality_classifier")
    assert row["removed_documents"] > 50 and set(row["reasons"]) == {"quality_score"}
    assert report["sources"]["wikipedia"]["removed"]["quality_classifier"] == 0
    with gzip.open(run_dir / "documents" / "00000.jsonl.gz", "rt", encoding="utf-8") as handle:
        kept = [json.loads(line) for line in handle]
    assert all(0 <= d["metadata"]["quality_score"] <= 1 for d in kept)
    assert all(d["metadata"]["quality_score"] >= 0.5 for d in kept if d["source"] == "web")
    scores = report["quality_scores"]
    scored = report["documents_in"] - sum(
        r["removed_documents"] for r in report["steps"] if r["step"] != "quality_classifier"
    )
    assert sum(scores["histogram"]) == scored
    assert (run_dir / "report" / "quality_scores.png").stat().st_size > 1000
    assert "score" in (run_dir / "report" / "quality_samples.md").read_text(encoding="utf-8")


def test_a_missing_model_is_a_config_error(tmp_path):
    with pytest.raises(ValidationError, match=r"sources\.0\.min_quality_score needs a classifier"):
        DataConfig.model_validate(
            {"sources": [{"name": "w", "kind": "jsonl", "path": "x", "min_quality_score": 0.3}]}
        )
    with pytest.raises(ValidationError, match=r"holds no model\.bin; give the run directory"):
        DataConfig.model_validate(
            {
                "sources": [{"name": "w", "kind": "jsonl", "path": str(tmp_path)}],
                "quality": {"model": str(tmp_path)},
            }
        )
