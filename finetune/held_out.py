"""The held-out evaluation of a fine-tuning run, as a callback (``PeriodicEvaluation``): at step
0, every ``train.eval_interval`` steps and at the end, with the run's own objective."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from finetune.examples import Unit
from finetune.packing import Batch, collate, evaluation_batches
from training.callbacks.periodic import PeriodicEvaluation, shared_forward_count
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
    """A rank's micro-batches padded with empty ones to the count every rank runs."""
    return micro_batches + [[()]] * (
        shared_forward_count(len(micro_batches), world) - len(micro_batches)
    )


class HeldOutEvaluation(PeriodicEvaluation):
    """Loss (and DPO's reward figures) over the held-out units, every rank a share; at step 0
    too. Recorded to the console and W&B as ``eval/<figure>`` and appended to ``eval.jsonl``.
    """

    title = "held-out evaluation"

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
        super().__init__(world, interval, total_steps, Path(run_dir) / EVAL_FILE, at_start=True)
        self.objective, self.engine, self.units = objective, engine, units
        self.reference, self.reference_offset = reference, reference_offset
        self.max_length, self.packing, self.micro_batch_size = max_length, packing, micro_batch_size

    @property
    def enabled(self) -> bool:
        return bool(self.units)

    @torch.no_grad()
    def evaluate(self, step: int, model: nn.Module | None) -> dict[str, float]:
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
        return {"loss": figures.loss, **figures.extra}

    def recorded(self, values: dict[str, float]) -> dict[str, float]:
        return {f"eval/{key}": value for key, value in values.items()}
