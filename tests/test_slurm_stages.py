"""Stages on a real SLURM cluster: array jobs per step, then a finishing job completes the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import KinoeError
from common.manifest import read_manifest
from common.run import run_stage
from data_prep.cli import STAGE
from data_prep.config import DataConfig

QUICKSTART = Path(__file__).resolve().parent.parent / "data_prep" / "quickstart"


def test_slurm_arrays_then_report_job_complete_the_run(slurm_cluster, monkeypatch, tmp_path):
    slurm_cluster.export_env(monkeypatch)
    config = DataConfig.model_validate(
        {
            "run": {"root": str(tmp_path / "runs"), "name": "on-slurm"},
            "sources": [
                {"name": "web", "kind": "jsonl", "path": str(QUICKSTART), "glob": "web.jsonl"},
                {
                    "name": "wikipedia",
                    "kind": "jsonl",
                    "path": str(QUICKSTART),
                    "glob": "wikipedia.jsonl",
                    "preset": "wikipedia",
                },
            ],
            # Few bands: each is a task of two array jobs, and this test is about the arrays.
            "dedup": {"minhash": {"bands": 4}},
            "executor": {
                "kind": "slurm",
                "tasks": 2,
                "slurm": {"partition": "debug", "time": "00:20:00", "mem_per_cpu_gb": 1},
            },
        }
    )
    monkeypatch.chdir(tmp_path)  # jobs start in the submitting directory
    submitted = run_stage(STAGE, config)
    assert submitted.status == "submitted" and submitted.manifest.status == "submitted"
    jobs = submitted.manifest.summary["jobs"]
    assert len(jobs) == 10  # nine steps and the report job
    # Submitting again while those jobs are queued would run every task twice: refused, and
    # the run directory keeps its submitted manifest.
    with pytest.raises(KinoeError, match="still queued or running"):
        run_stage(STAGE, config)
    assert read_manifest(submitted.run_dir).status == "submitted"
    assert slurm_cluster.wait(jobs[-1], timeout=420) == "COMPLETED"

    manifest = read_manifest(submitted.run_dir)
    assert manifest.status == "complete" and manifest.summary["balanced"] is True
    assert manifest.summary["documents_in"] == 143
    report = json.loads((submitted.run_dir / "report" / "report.json").read_text())
    assert report["documents_kept"] == manifest.summary["documents_kept"] > 0
    # Every step ran as its own array job: datatrove left a completion per task.
    completions = submitted.run_dir / "work" / "logs" / "minhash_filter" / "completions"
    assert len(list(completions.iterdir())) == 2
    # The same config run locally now finds the work done.
    again = run_stage(
        STAGE,
        config.model_copy(
            update={"executor": config.executor.model_copy(update={"kind": "local"})}
        ),
    )
    assert again.status == "skipped"


def test_tokenizer_encoding_runs_as_a_slurm_array(slurm_cluster, monkeypatch, tmp_path):
    from tokenizer.cli import STEPS, shards_path
    from tokenizer.config import TokenizerConfig
    from tokenizer.indexed import open_shard_set

    slurm_cluster.export_env(monkeypatch)
    documents = tmp_path / "documents"
    documents.mkdir()
    for name in ("web", "wikipedia"):
        lines = (QUICKSTART / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines]
        with (documents / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for index, record in enumerate(r for r in records if r["text"].strip()):
                document = {"id": f"{name}-{index}", "text": record["text"], "source": name}
                handle.write(json.dumps(document, ensure_ascii=False) + "\n")
    config = TokenizerConfig.model_validate(
        {
            "run": {"root": str(tmp_path / "runs"), "name": "on-slurm"},
            "sample": {"documents": str(documents), "character_budget": 100_000},
            "trainer": {"vocab_size": 2048, "character_coverage": 0.99, "num_threads": 2},
            "encode": {"chat": {"instructions": str(QUICKSTART / "instructions.jsonl")}},
            "executor": {
                "kind": "slurm",
                "tasks": 2,
                "slurm": {"partition": "debug", "time": "00:20:00", "mem_per_cpu_gb": 1},
            },
        }
    )
    monkeypatch.chdir(tmp_path)
    assert run_stage(STEPS["train"], config).status == "complete"  # training runs where called
    submitted = run_stage(STEPS["encode"], config)
    assert submitted.status == "submitted"
    jobs = submitted.manifest.summary["jobs"]
    assert slurm_cluster.wait(jobs[-1], timeout=300) == "COMPLETED"
    manifest = read_manifest(submitted.run_dir)
    assert manifest.status == "complete"
    sha = manifest.summary["tokenizer_sha256"]
    total = sum(
        len(d)
        for source in ("web", "wikipedia", "instructions")
        for d in open_shard_set(shards_path(config) / source, sha)
    )
    assert total == sum(manifest.summary["documents"].values()) > 100
    assert manifest.summary["conversations"]["instructions"]["encoded"] == 43
