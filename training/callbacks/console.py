"""The console line of each log interval, and one line per alert and per recorded evaluation."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

from training.callbacks.base import Alert, Callback, Report

# Report values worth a place on the line when a run has them (mixture-of-experts balance);
# every value goes to W&B regardless.
CONSOLE_EXTRAS = (
    "train/moe/aux_loss",
    "train/moe/z_loss",
    "train/moe/load_cv",
    "train/moe/dropped_tokens",
)
_LOG_LEVELS = {"INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR}


class ConsoleLog(Callback):
    """``step 20/100 | phase main | loss 2.3 | lr ... | tokens/s | MFU | memory | skipped | ETA``."""

    def __init__(self, logger: logging.Logger, extras: Sequence[str] = CONSOLE_EXTRAS):
        self.logger = logger
        self.extras = tuple(extras)

    def on_report(self, report: Report) -> None:
        values = report.values
        loss = values.get("train/loss")
        parts = [
            f"step {report.step:,}/{report.total_steps:,}",
            f"phase {report.phase}",
            f"loss {loss:.4f}" if loss is not None else "loss nan",
            f"lr {values['train/lr']:.3e}",
        ]
        if "train/grad_norm" in values:
            parts.append(f"grad norm {values['train/grad_norm']:.3f}")
        if "perf/tokens_per_s" in values:
            parts.append(
                f"{values['perf/tokens_per_s']:,.0f} tokens/s "
                f"({values['perf/tokens_per_s_per_gpu']:,.0f}/GPU)"
            )
        if "perf/mfu" in values:
            parts.append(f"MFU {100 * values['perf/mfu']:.1f}%")
        if "memory/max_allocated_gib" in values:
            parts.append(f"max allocated {values['memory/max_allocated_gib']:.1f} GiB")
        if "memory/peak_rss_gib" in values:
            parts.append(f"peak RSS {values['memory/peak_rss_gib']:.1f} GiB")
        for key in self.extras:
            if key in values:
                parts.append(f"{key.rsplit('/', 1)[-1].replace('_', ' ')} {values[key]:.4g}")
        parts.append(f"skipped {report.skipped_steps}")
        # Same H:MM:SS form as common.progress.format_progress.
        remaining = max(report.total_steps - report.step, 0) * report.seconds / report.steps
        parts.append(f"ETA {dt.timedelta(seconds=round(remaining))}")
        self.logger.info(" | ".join(parts))

    def on_record(self, step: int, title: str, values: dict[str, float]) -> None:
        figures = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        self.logger.info("%s at step %s: %s", title, f"{step:,}", figures)

    def on_alert(self, alert: Alert) -> None:
        self.logger.log(_LOG_LEVELS[alert.level], "alert %s: %s", alert.title, alert.text)
