"""Fault drills: a NaN loss, a crash mid-checkpoint, a record of consumed samples.

Drills prove that alerting, skipping and recovery work; they act through the hooks, so the
training loop holds no drill code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from training.callbacks.base import Callback
from training.callbacks.metrics_file import truncate_history
from training.config import DrillConfig
from training.world import World

SAMPLES_DIR = "samples"
# The exit status of a drill crash, distinct from a Python error's 1.
CRASH_EXIT_CODE = 86


class Drills(Callback):
    """Runs the drills ``drills`` asks for, on every rank.

    First in the callback list: the NaN drill's hook must be gone before any other callback
    (a held-out evaluation) runs the model at the end of the step.
    """

    def __init__(self, drills: DrillConfig, world: World, run_dir: Path, logger: Any):
        self.drills = drills
        self.world = world
        self.samples_dir = Path(run_dir) / SAMPLES_DIR
        self.logger = logger
        self._hook: Any = None
        self._positions: list[int] = []

    def on_train_start(self, step: int) -> None:
        if self.drills.record_samples:
            if self.world.is_main:
                # Every rank's file, also of ranks a resumed run on fewer ranks no longer has.
                for path in self.samples_dir.glob("rank*.jsonl"):
                    truncate_history(path, step)
            if dist.is_initialized():
                dist.barrier()

    def on_step_start(self, step: int, model: nn.Module) -> None:
        if step + 1 in self.drills.nan_at_steps and self.world.is_main:
            # NaN logits on one rank: the loss and every gradient of the step become NaN, as
            # after a real overflow, and the optimizer step must be skipped on all ranks.
            self._hook = model.register_forward_hook(lambda _m, _i, out: out * float("nan"))

    def on_micro_batch(self, batch: Any) -> None:
        if self.drills.record_samples:
            self._positions.extend(batch.position_B.tolist())  # a host tensor: no device sync

    def on_step_end(self, step: int, model: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.drills.record_samples:
            path = self.samples_dir / f"rank{self.world.rank:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                handle.write(json.dumps({"step": step, "positions": self._positions}) + "\n")
            self._positions = []

    def on_checkpoint_write(self, step: int) -> None:
        if self.drills.crash_in_checkpoint_at_step == step:
            self.logger.error("drill: crashing while checkpoint step %d is being written", step)
            os._exit(CRASH_EXIT_CODE)
