"""What a kind of training (language modelling, SFT, DPO) tells the loop: the loss of a micro-batch
and what the step's sums mean.

An objective keeps its figures as sums in one float64 device tensor per step (``sums``),
added to in place, so a micro-batch never waits for the device; the loop reduces the
tensor over ranks and reads it once per log interval, then asks ``figures`` what it means.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from models.experts import ExpertModel


@dataclass
class StepFigures:
    """A step's figures from its sums over all ranks, on the host."""

    loss: float
    tokens: int  # tokens processed (pretraining: target tokens; fine-tuning: non-padding)
    tokens_by_source: dict[str, int]  # added to the run's consumed tokens per source
    samples_by_source: dict[str, int]
    loss_by_source: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)  # logged as train/<key>


class Objective(ABC):
    """The loss of a micro-batch and the meaning of a step's sums."""

    #: Length of the per-step sums tensor.
    num_sums: int

    @abstractmethod
    def loss(self, model: Any, batch: Any, sums: torch.Tensor) -> torch.Tensor:
        """Forward ``batch`` (on the device) through ``model``; return the loss to back-propagate
        and add the micro-batch's figures to ``sums`` in place, without reading them back."""

    @abstractmethod
    def figures(self, sums: list[float]) -> StepFigures:
        """The step's figures from its sums reduced over ranks."""


def training_loss(
    objective: Objective, engine: Any, batch: Any, sums: torch.Tensor
) -> torch.Tensor:
    """The objective's loss plus, for a model with experts, its router losses (one per micro-batch)."""
    loss = objective.loss(engine, batch, sums)
    model = getattr(engine, "module", engine)
    if isinstance(model, ExpertModel):
        loss = loss + model.auxiliary_loss()
    return loss
