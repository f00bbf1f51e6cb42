"""Evaluations run on the model being trained: every ``interval`` steps, at the last step and,
when asked, at step 0; every rank takes part; the figures are recorded (console, W&B) and
appended to a JSONL history in the run directory, which a resumed run cuts back to its step.

Pretraining's task and bits-per-character evaluation (``training.callbacks.evaluation``) and
fine-tuning's held-out loss (``finetune.held_out``) are the two kinds.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from training.callbacks.base import Callback
from training.callbacks.metrics_file import truncate_history
from training.world import World


def shared_forward_count(mine: int, world: World) -> int:
    """The most forwards any rank has to run: every rank runs that many, padding its own share
    with empty ones, because under ZeRO-3 each forward gathers parameters from all ranks."""
    count = torch.tensor([mine], device=world.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


class PeriodicEvaluation(Callback, ABC):
    """The schedule and the reporting; a subclass says what ``evaluate`` scores."""

    # The record's title on the console (W&B takes the figures' own names).
    title: ClassVar[str]

    def __init__(
        self, world: World, interval: int, total_steps: int, history: Path, at_start: bool = False
    ):
        self.world, self.interval, self.total_steps = world, interval, total_steps
        self.history, self.at_start = Path(history), at_start
        self._callbacks: Any = None

    @property
    def enabled(self) -> bool:
        """Whether there is anything to score (a subclass with nothing says False)."""
        return True

    def bind(self, callbacks: Any) -> None:
        self._callbacks = callbacks

    def on_train_start(self, step: int) -> None:
        if self.world.is_main:
            truncate_history(self.history, step)
        if self.at_start and step == 0 and self.enabled:
            self.run(0, None)  # where the figures start

    def on_step_end(self, step: int, model: nn.Module) -> None:
        if self.enabled and (step % self.interval == 0 or step == self.total_steps):
            self.run(step, model)

    def run(self, step: int, model: nn.Module | None) -> dict[str, float]:
        """Score, record, append to the history; the figures."""
        values = self.evaluate(step, model)
        self._callbacks.record(step, self.title, self.recorded(values))
        if self.world.is_main:
            with self.history.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")
        return values

    @abstractmethod
    def evaluate(self, step: int, model: nn.Module | None) -> dict[str, float]:
        """The figures at ``step``, the same on every rank (``model``: None at step 0)."""

    def recorded(self, values: dict[str, float]) -> dict[str, float]:
        """The figures under the names the console and W&B show them by."""
        return values
