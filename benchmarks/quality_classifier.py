"""The quality classifier on the real corpora: held-out accuracy, share kept per threshold, speed.

Trains with configs/quality/local_corpora.yaml (Wikipedia leads and Aozora works against the
FineWeb-2 web pages) in a scratch run root, then prints the held-out figures from its report,
the share of every shared web page (training pages included, so this flatters the model) kept
per threshold, and the scoring speed on one core.
Usage: python benchmarks/quality_classifier.py [--config configs/quality/local_corpora.yaml]
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import tempfile
import time
from pathlib import Path

from common.config import load_config
from common.manifest import package_versions
from common.run import run_stage
from data_prep.normalise import normalise_text
from data_prep.quality_model import QualityModel
from data_prep.quality_train import STAGE, THRESHOLDS, QualityTrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quality/local_corpora.yaml")
    args = parser.parse_args()
    config = load_config(QualityTrainConfig, args.config)
    with tempfile.TemporaryDirectory() as scratch:
        config.run.root = Path(scratch)
        started = time.perf_counter()
        result = run_stage(STAGE, config)
        train_seconds = time.perf_counter() - started
        report = json.loads((result.run_dir / "report.json").read_text())
        model = QualityModel(result.run_dir)
        web = config.negatives[0]
        with gzip.open(Path(web.path) / web.glob, "rt", encoding="utf-8") as handle:
            pages = [normalise_text(json.loads(line)["text"], web.normalise) for line in handle]
        started = time.perf_counter()
        scores = [model.score(page) for page in pages]
        score_seconds = time.perf_counter() - started
        size = (result.run_dir / "model.bin").stat().st_size / 2**20

    print(
        f"host: {platform.node()}, {platform.processor() or platform.machine()}; "
        f"versions: {package_versions(('fasttext-wheel', 'numpy'))}"
    )
    print(
        f"training: {train_seconds:.1f} s (reading and normalising included), "
        f"{report['train_pieces_per_class']} pieces per class, model {size:.1f} MB"
    )
    print(
        f"held-out balanced accuracy: {report['held_out_accuracy_balanced']:.3f}; recall "
        + ", ".join(
            f"{k} {v:.3f} ({report['held_out_pieces'][k]} pieces)"
            for k, v in report["held_out_recall"].items()
        )
    )
    print()
    kept = report["held_out_documents_kept_per_threshold"]
    print("| documents | " + " | ".join(f"≥{t}" for t in THRESHOLDS) + " |")
    print("|---|" + "---:|" * len(THRESHOLDS))
    for source, shares in kept.items():
        print(
            f"| held-out {source} | "
            + " | ".join(f"{100 * shares[f'{t:.1f}']:.0f}%" for t in THRESHOLDS)
            + " |"
        )
    print(
        f"| all {len(pages)} web pages | "
        + " | ".join(f"{100 * sum(s >= t for s in scores) / len(scores):.0f}%" for t in THRESHOLDS)
        + " |"
    )
    print()
    print(
        f"scoring: {len(pages) / score_seconds:,.0f} documents/s on one core "
        f"(first {model.max_chars} characters of each)"
    )


if __name__ == "__main__":
    main()
