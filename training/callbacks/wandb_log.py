"""Weights & Biases: one run per kinoe run (resumed runs continue it), interval points, alerts, summary."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from common.errors import KinoeError
from common.secrets import redact, secret_values
from training.callbacks.base import Alert, Callback, EndStatus, Report, RunInfo
from training.callbacks.dispatch import ALERT_REPEAT_S
from training.config import WandbConfig

# SLURM preempts with SIGTERM; 128 + 15 is the shell's exit code for it.
_EXIT_CODES = {"complete": 0, "preempted": 143, "failed": 1}


class WandbLog(Callback):
    """Starts (or resumes, by the id kept in ``<run_dir>/wandb_id``) the W&B run and logs to it."""

    def __init__(self, settings: WandbConfig, run: RunInfo):
        import wandb

        run_dir = Path(run.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb_id"
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n", encoding="utf-8")
        try:
            self._run: Any = wandb.init(
                entity=settings.entity,
                project=settings.project,
                group=settings.group,
                name=settings.name or run.name,
                tags=settings.tags,
                mode=settings.mode,
                dir=run_dir,
                config=redact(run.config, secret_values()),
                id=run_id,
                resume="allow",
                # kinoe's own log file already holds the console, redacted; W&B's capture is not.
                settings=wandb.Settings(console="off"),
            )
        except wandb.errors.Error as err:
            raise KinoeError(
                f"W&B could not start ({err}); set WANDB_API_KEY or run `wandb login`, "
                "or set monitor.wandb.mode=offline"
            ) from None

    def on_report(self, report: Report) -> None:
        if self._run is not None:
            self._run.log(report.values, step=report.step)

    def on_record(self, step: int, title: str, values: dict[str, float]) -> None:
        if self._run is not None:
            self._run.log(values, step=step)

    def on_alert(self, alert: Alert) -> None:
        if self._run is not None:
            # W&B refuses titles of 64 characters or more.
            self._run.alert(
                title=alert.title[:63],
                text=alert.text,
                level=alert.level,
                wait_duration=ALERT_REPEAT_S,
            )

    def on_end(self, status: EndStatus, summary: dict[str, Any]) -> None:
        if self._run is None:
            return
        self._run.summary.update({**summary, "status": status})
        if status == "preempted":
            self._run.mark_preempting()
        self._finish(_EXIT_CODES[status])

    def close(self) -> None:
        """Finish the W&B run if on_end did not (then as failed: the outcome is unknown)."""
        self._finish(_EXIT_CODES["failed"])

    def _finish(self, exit_code: int) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish(exit_code=exit_code)
