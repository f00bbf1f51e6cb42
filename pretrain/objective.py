"""Pretraining's objective: next-token prediction over packed samples, with figures per source."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from training.losses import IGNORE, TokenLoss
from training.objective import Objective, StepFigures


class LanguageModelling(Objective):
    """The mean next-token loss of a micro-batch; sums per source of loss, targets and samples.

    ``sums`` is laid out (3, S) for S sources: summed token loss (nats), target tokens,
    samples. The loss back-propagated is the micro-batch's mean over its target tokens;
    DeepSpeed averages it over micro-batches and ranks.
    """

    def __init__(self, source_names: Sequence[str], token_loss: TokenLoss):
        self.source_names = list(source_names)
        self.token_loss = token_loss
        self.num_sums = 3 * len(self.source_names)

    def loss(self, model: Any, batch: Any, sums: torch.Tensor) -> torch.Tensor:
        logits_BTV = model(batch.input_ids_BT, batch.document_ids_BT)
        token_loss_BT = self.token_loss(logits_BTV, batch.labels_BT)
        targets_B = (batch.labels_BT != IGNORE).sum(dim=1)
        figures_3B = torch.stack(
            [
                token_loss_BT.detach().sum(dim=1).double(),
                targets_B.double(),
                torch.ones_like(targets_B, dtype=torch.float64),
            ]
        )
        sums.view(3, -1).index_add_(1, batch.source_B, figures_3B)
        return token_loss_BT.sum() / targets_B.sum().clamp(min=1)

    def figures(self, sums: list[float]) -> StepFigures:
        count = len(self.source_names)
        loss_S, targets_S, samples_S = sums[:count], sums[count : 2 * count], sums[2 * count :]
        return StepFigures(
            loss=sum(loss_S) / max(sum(targets_S), 1.0),
            tokens=int(sum(targets_S)),
            tokens_by_source={n: int(t) for n, t in zip(self.source_names, targets_S, strict=True)},
            samples_by_source={
                n: int(s) for n, s in zip(self.source_names, samples_S, strict=True)
            },
            loss_by_source={
                name: loss / targets
                for name, loss, targets in zip(self.source_names, loss_S, targets_S, strict=True)
                if targets > 0
            },
        )
