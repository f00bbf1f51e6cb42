"""Everything that watches a run, as callbacks: console, W&B, metrics.jsonl, alerts, speed and
memory, mixture-of-experts balance, drills. ``standard_callbacks`` builds the set every
training run has; a stage adds its own (fine-tuning's held-out evaluation)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from models.experts import ExpertModel
from training.callbacks.alerts import AlertFile, LossAlerts
from training.callbacks.base import Callback, RunInfo, StepMetrics
from training.callbacks.console import ConsoleLog
from training.callbacks.dispatch import Callbacks
from training.callbacks.drills import Drills
from training.callbacks.experts import ExpertBalance
from training.callbacks.metrics_file import MetricsFile
from training.callbacks.speed import SpeedMonitor
from training.config import DrillConfig, MonitorConfig
from training.world import World

__all__ = ["Callback", "Callbacks", "RunInfo", "StepMetrics", "standard_callbacks"]


def standard_callbacks(
    monitor: MonitorConfig,
    run: RunInfo,
    world: World,
    model: nn.Module,
    drills: DrillConfig | None = None,
    stage: Sequence[Callback] = (),
    total_steps: int | None = None,
) -> Callbacks:
    """The run's callbacks in the order they are called.

    Drills first (their NaN hook must be gone before anything else runs the model), then the
    producers of figures on every rank (expert balance, the stage's own, e.g. a held-out
    evaluation, and the evaluation while training when ``monitor.evaluation.interval`` is set and
    ``total_steps`` given), then the reporters, on the main rank only: other ranks write and print nothing.
    """
    callbacks: list[Callback] = []
    if drills is not None:
        callbacks.append(Drills(drills, world, run.run_dir, run.logger))
    if isinstance(model, ExpertModel):
        callbacks.append(ExpertBalance(monitor.experts, monitor.log_interval))
    callbacks.extend(stage)
    if monitor.evaluation.interval and total_steps is not None:
        from training.callbacks.evaluation import TrainingEvaluation

        max_length = getattr(getattr(model, "args", None), "max_seq_len", None) or 2048
        callbacks.append(
            TrainingEvaluation(monitor.evaluation, world, max_length, total_steps, run.run_dir)
        )
    if world.is_main:
        callbacks += [
            LossAlerts(monitor.loss_spike_zscore, monitor.loss_spike_window),
            MetricsFile(run.run_dir),
            SpeedMonitor(run, monitor.peak_flops_per_gpu),
            AlertFile(run.run_dir),
            ConsoleLog(run.logger),
        ]
        if monitor.wandb.enabled:
            from training.callbacks.wandb_log import WandbLog

            callbacks.append(WandbLog(monitor.wandb, run))
    return Callbacks(callbacks, run, monitor.log_interval)
