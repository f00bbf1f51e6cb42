"""The held-out evaluation of a fine-tuning run, as a callback: at step 0, every
``train.eval_interval`` steps and at the end, with the run's own objective."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from finetune.examples import Unit
from finetune.packing import Batch, collate, evaluation_batches
from training.callbacks import Callback
from training.callbacks.metrics_file import truncate_history
from training.objective import Objective
from training.world import World

EVAL_FILE = "eval.jsonl"
# Padding positions are a document of their own with no targets: their ids never matter.
PAD_ID = 0


def with_reference(batch: Batch, reference: torch.Tensor | None, offset: int) -> Batch:
    """``batch`` with its units' reference log-probabilities (DPO), rows ``offset + unit``."""
    if reference is not None:
        batch.reference_P2 = reference[[offset + unit for unit in batch.units]]
    return batch


def equal_shares(
    micro_batches: list[list[tuple[int, ...]]], world: World
) -> list[list[tuple[int, ...]]]:
    """Pad a rank's micro-batches with empty ones so every rank runs as many forwards (ZeRO-3 gathers in each)."""
    count = torch.tensor([len(micro_batches)], device=world.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return micro_batches + [[()]] * (int(count.item()) - len(micro_batches))


class HeldOutEvaluation(Callback):
    """Loss (and DPO's reward figures) over the held-out units, every rank a share.

    Recorded to the console and W&B as ``eval/<figure>`` and appended to ``eval.jsonl``.
    """

    def __init__(
        self,
        *,
        objective: Objective,
        engine,
        units: list[Unit],
        reference: torch.Tensor | None,
        reference_offset: int,
        max_length: int,
        packing: bool,
        micro_batch_size: int,
        interval: int,
        total_steps: int,
        world: World,
        run_dir: Path,
    ):
        self.objective, self.engine, self.units = objective, engine, units
        self.reference, self.reference_offset = reference, reference_offset
        self.max_length, self.packing, self.micro_batch_size = max_length, packing, micro_batch_size
        self.interval, self.total_steps = interval, total_steps
        self.world = world
        self.path = Path(run_dir) / EVAL_FILE
        self._callbacks = None

    def bind(self, callbacks) -> None:
        self._callbacks = callbacks

    def on_train_start(self, step: int) -> None:
        if self.world.is_main:
            truncate_history(self.path, step)
        if step == 0 and self.units:
            self.evaluate(0)  # where the held-out figures start

    def on_step_end(self, step: int, model: nn.Module) -> None:
        if self.units and (step % self.interval == 0 or step == self.total_steps):
            self.evaluate(step)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        world = self.world
        sums = torch.zeros(self.objective.num_sums, dtype=torch.float64, device=world.device)
        shares = evaluation_batches(
            len(self.units),
            [unit.length for unit in self.units],
            self.max_length,
            self.packing,
            world.rank,
            world.size,
            self.micro_batch_size,
        )
        self.engine.eval()
        for micro in equal_shares(shares, world):
            batch = collate(self.units, micro, self.max_length, PAD_ID)
            batch = with_reference(batch, self.reference, self.reference_offset)
            self.objective.loss(self.engine, batch.to(world.device), sums)
        self.engine.train()
        dist.all_reduce(sums)
        figures = self.objective.figures(sums.cpu().tolist())
        values = {"loss": figures.loss, **figures.extra}
        self._callbacks.record(
            step, "held-out evaluation", {f"eval/{k}": v for k, v in values.items()}
        )
        if world.is_main:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")
        return values
