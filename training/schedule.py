"""Learning rate as a function of the step: linear warmup, then warmup-stable-decay or cosine.

A pure function of the step, so a resumed run computes the same rate as one that never
stopped, with no scheduler state to save.
"""

from __future__ import annotations

import math

from training.config import OptimizerConfig, ScheduleConfig


def decay_start_step(
    schedule: ScheduleConfig, total_steps: int, last_phase_step: int | None
) -> int:
    """First step of the wsd decay: ``decay_start`` of training, else the last phase's start."""
    if schedule.decay_start is not None:
        return round(schedule.decay_start * total_steps)
    if last_phase_step is not None and last_phase_step > 0:
        return last_phase_step
    return round(0.8 * total_steps)


def learning_rate(
    step: int,
    total_steps: int,
    optimizer: OptimizerConfig,
    schedule: ScheduleConfig,
    decay_start: int,
) -> float:
    """The lr for optimizer step ``step`` (0-based: the step about to be taken)."""
    peak, floor = optimizer.lr, optimizer.lr * optimizer.min_lr_ratio
    warmup = schedule.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule.kind == "cosine":
        start, length = warmup, total_steps - warmup
    else:
        start = max(decay_start, warmup)
        length = total_steps - start
        if step < start:
            return peak
    # Progress reaches 1 on the last step, so the run ends exactly at the floor.
    progress = min(1.0, (step - start + 1) / max(length, 1))
    if schedule.kind == "cosine" or schedule.decay_shape == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak - (peak - floor) * progress
