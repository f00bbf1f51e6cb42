"""Alerts about the loss (non-finite, spikes) and the file every alert of a run is kept in."""

from __future__ import annotations

import json
import math
import sys
from collections import deque
from dataclasses import asdict
from pathlib import Path

from training.callbacks.base import Alert, Callback, StepMetrics
from training.config import MIN_SPIKE_WINDOW

ALERTS_FILE = "alerts.jsonl"
# A flat loss window has std ~ 0, which would turn float noise into enormous z-scores.
_MIN_RELATIVE_STD = 1e-3


class AlertFile(Callback):
    """Appends every alert to ``<run_dir>/alerts.jsonl``: time, step, level, title, text."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ALERTS_FILE

    def on_alert(self, alert: Alert) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = asdict(alert)
        record = {key: record[key] for key in ("time", "step", "level", "title", "text")}
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


class _SpikeDetector:
    """Flags a loss far above the recent window's mean; only finite losses enter the window."""

    def __init__(self, zscore: float, window: int) -> None:
        self.zscore = zscore
        self.losses: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> tuple[float, float, int] | None:
        """(z-score, window mean, window length) when ``loss`` is a spike, else None; then adds it."""
        found = None
        if len(self.losses) >= MIN_SPIKE_WINDOW:
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
            std = max(std, _MIN_RELATIVE_STD * abs(mean), sys.float_info.min)
            z = (loss - mean) / std
            if z > self.zscore:
                found = (z, mean, len(self.losses))
        self.losses.append(loss)
        return found


class LossAlerts(Callback):
    """An ERROR for a non-finite loss; a WARN for a loss ``zscore`` deviations above the window.

    A spike alerts at most once per window of steps, so one bad stretch is one alert.
    """

    def __init__(self, zscore: float, window: int):
        self.window = window
        self._spikes = _SpikeDetector(zscore, window)
        self._next_spike_alert_step = 0
        self._skipped_steps = 0
        self._callbacks = None

    def bind(self, callbacks) -> None:
        self._callbacks = callbacks

    def on_step(self, metrics: StepMetrics) -> None:
        self._skipped_steps += metrics.skipped
        if not math.isfinite(metrics.loss):
            state = "step skipped" if metrics.skipped else "step applied anyway; skipped steps"
            self._callbacks.alert(
                "non-finite loss",
                f"non-finite loss at step {metrics.step} ({state}; {self._skipped_steps} so far)",
                "ERROR",
            )
            return
        spike = self._spikes.check(metrics.loss)
        if spike is not None and metrics.step >= self._next_spike_alert_step:
            self._next_spike_alert_step = metrics.step + self.window
            z, mean, window = spike
            self._callbacks.alert(
                "loss spike",
                f"loss {metrics.loss:.4f} at step {metrics.step} is {z:.1f} standard deviations "
                f"above the mean {mean:.4f} of the previous {window} steps",
                "WARN",
            )
