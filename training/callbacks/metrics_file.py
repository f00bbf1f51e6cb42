"""``metrics.jsonl``: one record per optimizer step, rewritten from the resume point on a resume."""

from __future__ import annotations

import json
from pathlib import Path

from training.callbacks.base import Callback, StepMetrics

METRICS_FILE = "metrics.jsonl"


def truncate_history(path: Path, step: int) -> None:
    """Drop records after ``step`` from a per-step JSONL file: a resumed run writes them again."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class MetricsFile(Callback):
    """Appends each step's figures to ``<run_dir>/metrics.jsonl``."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def on_train_start(self, step: int) -> None:
        # Steps after the checkpoint are redone, by however many ranks this run has.
        truncate_history(self.path, step)

    def on_step(self, metrics: StepMetrics) -> None:
        record = {
            "step": metrics.step,
            "phase": metrics.phase,
            "loss": metrics.loss,
            "loss_by_source": metrics.loss_by_source,
            "lr": metrics.lr,
            "grad_norm": metrics.grad_norm,
            "tokens": metrics.tokens,
            "skipped": metrics.skipped,
            "step_seconds": round(metrics.step_seconds, 4),
            **metrics.extra,  # objective- or model-specific figures (MoE balance, DPO rewards)
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
