"""``Callbacks``: calls every callback's hook in order, groups steps into log intervals, and
rate-limits and redacts alerts before any callback sees them."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from common.secrets import redact, secret_values
from training.callbacks.base import (
    Alert,
    AlertLevel,
    Callback,
    EndStatus,
    Report,
    RunInfo,
    StepMetrics,
)

# Identical alerts (same title and level) closer together than this are dropped, here and by W&B.
ALERT_REPEAT_S = 600.0


class _Mean:
    """Running mean of the finite values added."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self.total += value
            self.count += 1

    def value(self) -> float | None:
        return self.total / self.count if self.count else None


class _Interval:
    """Sums and means over the steps since the last report."""

    def __init__(self) -> None:
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        self.means: dict[str, _Mean] = {}

    def add(self, metrics: StepMetrics) -> None:
        self.steps += 1
        self.tokens += metrics.tokens
        self.seconds += metrics.step_seconds
        figures: dict[str, float | None] = {
            "train/loss": metrics.loss,
            "train/grad_norm": metrics.grad_norm,
        }
        figures |= {f"train/loss/{name}": v for name, v in metrics.loss_by_source.items()}
        figures |= {f"train/{key}": v for key, v in metrics.extra.items()}
        for key, value in figures.items():
            self.means.setdefault(key, _Mean()).add(value)


class Callbacks:
    """The callbacks of one run, called in list order; the loop talks to this object only."""

    def __init__(self, callbacks: Sequence[Callback], run: RunInfo, log_interval: int):
        self.callbacks = list(callbacks)
        self.run = run
        self.log_interval = log_interval
        self._secrets = secret_values()
        # The config's phase order is the same on every resume; first-seen order is not.
        self._phases = list(run.phases)
        self._interval = _Interval()
        self._last: StepMetrics | None = None
        self._skipped_steps = 0
        self._last_alert: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        for callback in self.callbacks:
            callback.bind(self)

    def __iter__(self):
        return iter(self.callbacks)

    # Hooks the loop calls on every rank: forwarded as they are.
    def on_train_start(self, step: int) -> None:
        for callback in self.callbacks:
            callback.on_train_start(step)

    def on_step_start(self, step: int, model: nn.Module) -> None:
        for callback in self.callbacks:
            callback.on_step_start(step, model)

    def on_micro_batch(self, batch: Any) -> None:
        for callback in self.callbacks:
            callback.on_micro_batch(batch)

    def on_backward(self, model: nn.Module) -> None:
        for callback in self.callbacks:
            callback.on_backward(model)

    def on_step_end(self, step: int, model: nn.Module) -> None:
        for callback in self.callbacks:
            callback.on_step_end(step, model)

    def on_checkpoint_write(self, step: int) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint_write(step)

    # Figures, reports and alerts.
    def on_step(self, metrics: StepMetrics) -> None:
        """One step's figures to every callback, then the interval's report when it is due."""
        self._last = metrics
        self._skipped_steps += metrics.skipped
        for callback in self.callbacks:
            callback.on_step(metrics)
        self._interval.add(metrics)
        if metrics.step % self.log_interval == 0 or metrics.step >= metrics.total_steps:
            self.report()

    def report(self) -> None:
        """The interval since the last report to every callback (none when it is empty)."""
        interval, last = self._interval, self._last
        if last is None or interval.steps == 0:
            return
        self._interval = _Interval()
        if last.phase not in self._phases:
            self._phases.append(last.phase)
        values: dict[str, float] = {
            "train/lr": last.lr,
            "data/phase": self._phases.index(last.phase),
            "train/skipped_steps": self._skipped_steps,
        }
        for key, mean in interval.means.items():
            if mean.value() is not None:
                values[key] = mean.value()
        for source, tokens in last.consumed_tokens_by_source.items():
            values[f"data/consumed_tokens/{source}"] = tokens
        report = Report(
            step=last.step,
            total_steps=last.total_steps,
            phase=last.phase,
            steps=interval.steps,
            tokens=interval.tokens,
            seconds=interval.seconds,
            skipped_steps=self._skipped_steps,
            values=values,
        )
        for callback in self.callbacks:
            callback.on_report(report)

    def record(self, step: int, title: str, values: dict[str, float]) -> None:
        """Figures taken outside the step interval (a held-out evaluation)."""
        for callback in self.callbacks:
            callback.on_record(step, title, values)

    def alert(self, title: str, text: str, level: AlertLevel) -> None:
        """Raise an alert, redacted; a repeat of the same title and level within ALERT_REPEAT_S is dropped."""
        title, text = redact(title, self._secrets), redact(text, self._secrets)
        key, now = (title, level), time.monotonic()
        last = self._last_alert.get(key)
        if last is not None and now - last < ALERT_REPEAT_S:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last_alert[key] = now
        dropped = self._suppressed.pop(key, 0)
        if dropped:
            text += f" ({dropped} similar alert(s) dropped since the last one)"
        alert = Alert(
            title=title,
            text=text,
            level=level,
            step=self._last.step if self._last is not None else None,
            time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        for callback in self.callbacks:
            callback.on_alert(alert)

    def end(self, status: EndStatus, summary: dict[str, Any]) -> None:
        """Report the last partial interval, alert the outcome, then tell every callback."""
        self.report()
        summary = redact(summary, self._secrets)
        last = self._last
        where = f" at step {last.step:,}/{last.total_steps:,}" if last else ""
        details = ", ".join(f"{key} {value}" for key, value in summary.items())
        level: AlertLevel = {"complete": "INFO", "preempted": "WARN", "failed": "ERROR"}[status]
        self.alert(
            f"run {status}", f"run {status}{where}" + (f": {details}" if details else ""), level
        )
        for callback in self.callbacks:
            callback.on_end(status, summary)

    def close(self) -> None:
        for callback in self.callbacks:
            callback.close()
