"""What a callback sees of a run: the hooks, a finished step's figures, an interval's report, an alert.

The training loop (``training.loop``) calls the hooks through ``Callbacks`` in the order the
list was built: producers of figures (expert balance) come before the callbacks that write
them (metrics file, console, W&B).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

AlertLevel = Literal["INFO", "WARN", "ERROR"]
EndStatus = Literal["complete", "preempted", "failed"]


@dataclass
class StepMetrics:
    """What one finished optimizer step reports, on the host (read once per log interval)."""

    step: int  # 1-based optimizer step just finished
    total_steps: int
    phase: str
    loss: float  # mean loss over the global batch; nan/inf possible
    loss_by_source: dict[str, float]
    lr: float
    grad_norm: float | None
    tokens: int  # tokens processed in this step, all ranks together
    step_seconds: float
    skipped: bool  # not applied (non-finite loss or gradients)
    consumed_tokens_by_source: dict[str, int]  # cumulative over the run
    extra: dict[str, float] = field(default_factory=dict)  # objective or model figures, train/<key>


@dataclass
class Report:
    """One logging interval as the console and W&B show it: means over its steps.

    ``values`` uses W&B's keys (``train/loss``, ``perf/tokens_per_s``, ``moe/load_cv``...);
    callbacks earlier in the list may add to it (speed, memory) before later ones write it.
    """

    step: int
    total_steps: int
    phase: str
    steps: int  # steps in the interval
    tokens: int
    seconds: float
    skipped_steps: int  # over the run
    values: dict[str, float]


@dataclass(frozen=True)
class Alert:
    """Something a person should look at: a non-finite loss, a spike, a starving expert, the run's end."""

    title: str
    text: str
    level: AlertLevel
    step: int | None
    time: str  # ISO 8601, UTC


@dataclass(frozen=True)
class RunInfo:
    """What callbacks may need to know about the run they watch."""

    name: str
    run_dir: Path
    config: dict[str, Any]  # the resolved config, secrets redacted
    world_size: int
    device: torch.device
    flops_per_token: float  # model FLOPs per trained token (forward + backward)
    logger: logging.Logger
    phases: tuple[str, ...] = ()  # phase names in config order (data/phase is an index)


class Callback:
    """Watches a run; every hook is optional. Hooks marked *all ranks* run on every rank and may
    hold collectives; the others run where the callback was built (reporters: the main rank)."""

    def bind(self, callbacks: Any) -> None:
        """Called once with the run's ``Callbacks``: keep it to raise alerts or record figures."""

    def on_train_start(self, step: int) -> None:
        """*All ranks*, before the first step this process takes (``step`` steps are done)."""

    def on_step_start(self, step: int, model: nn.Module) -> None:
        """*All ranks*, before step ``step + 1``'s first micro-batch."""

    def on_micro_batch(self, batch: Any) -> None:
        """*All ranks*, with a micro-batch still on the host, before it moves to the device."""

    def on_backward(self, model: nn.Module) -> None:
        """*All ranks*, after a micro-batch's forward and backward; device work only, no host reads."""

    def on_step_end(self, step: int, model: nn.Module) -> None:
        """*All ranks*, after the optimizer step that made ``step`` steps; before any checkpoint."""

    def on_checkpoint_write(self, step: int) -> None:
        """*All ranks*, while checkpoint ``step`` is half written (shards on disk, not yet complete)."""

    def on_step(self, metrics: StepMetrics) -> None:
        """A finished step's figures, delivered for each step when its log interval is read."""

    def on_report(self, report: Report) -> None:
        """Once per log interval (and at the end), after every step of it went to ``on_step``."""

    def on_record(self, step: int, title: str, values: dict[str, float]) -> None:
        """Figures taken outside the step interval, e.g. a held-out evaluation."""

    def on_alert(self, alert: Alert) -> None:
        """An alert that passed the repeat limit."""

    def on_end(self, status: EndStatus, summary: dict[str, Any]) -> None:
        """The run ended (complete, preempted or failed); the last report and alert are out."""

    def close(self) -> None:
        """Release what the callback holds; the run may have ended without ``on_end``."""
