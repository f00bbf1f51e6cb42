"""Fine-tuning's objectives: SFT on assistant-only labels, DPO against saved reference log-probabilities."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from finetune.packing import Batch, segment_logps
from training.losses import TokenLoss
from training.objective import Objective, StepFigures

ObjectiveName = Literal["sft", "dpo"]
SOURCE = "train"  # fine-tuning data counts as one source in the trainer state


class SupervisedFineTuning(Objective):
    """Cross-entropy of the trained tokens (assistant turns and their end), summed and scaled so
    the step's gradient is the mean over every trained token of the global batch.

    Sums: token loss (nats), trained tokens, non-padding tokens, examples.
    """

    num_sums = 4

    def __init__(self, token_loss: TokenLoss):
        self.token_loss = token_loss

    def loss(self, model: Any, batch: Batch, sums: torch.Tensor) -> torch.Tensor:
        logits_BTV = model(batch.input_ids_BT, batch.document_ids_BT)
        loss = self.token_loss(logits_BTV, batch.labels_BT).sum()
        # Element by element: a host number added on the device needs no transfer back.
        sums[0] += loss.detach()
        sums[1] += batch.targets
        sums[2] += batch.tokens
        sums[3] += len(batch.units)
        return loss * batch.loss_scale

    def figures(self, sums: list[float]) -> StepFigures:
        loss, targets, tokens, examples = sums
        return StepFigures(
            loss=loss / max(targets, 1.0),
            tokens=int(tokens),
            tokens_by_source={SOURCE: int(tokens)},
            samples_by_source={SOURCE: int(examples)},
        )


class DirectPreference(Objective):
    """DPO's sigmoid loss: -log sigmoid(beta x ((chosen - ref chosen) - (rejected - ref rejected))).

    A micro-batch holds each pair's chosen and rejected answer as consecutive segments, and
    the pairs' reference log-probabilities in ``batch.reference_P2``. Sums: pair loss, pairs,
    non-padding tokens, reward margin, pairs ranked right, chosen and rejected rewards.
    """

    num_sums = 7

    def __init__(self, token_loss: TokenLoss, beta: float):
        self.token_loss = token_loss
        self.beta = beta

    def loss(self, model: Any, batch: Batch, sums: torch.Tensor) -> torch.Tensor:
        logits_BTV = model(batch.input_ids_BT, batch.document_ids_BT)
        logps_S = segment_logps(self.token_loss(logits_BTV, batch.labels_BT), batch)
        chosen_P, rejected_P = logps_S[0::2], logps_S[1::2]
        reference_P2 = batch.reference_P2
        chosen_reward_P = self.beta * (chosen_P - reference_P2[:, 0])
        rejected_reward_P = self.beta * (rejected_P - reference_P2[:, 1])
        margin_P = chosen_reward_P - rejected_reward_P
        loss_P = -F.logsigmoid(margin_P)
        figures_P = torch.stack(
            [
                loss_P,
                margin_P,
                (margin_P > 0).to(margin_P.dtype),
                chosen_reward_P,
                rejected_reward_P,
            ]
        ).detach()
        sums[0] += figures_P[0].sum()
        sums[1] += len(batch.units)
        sums[2] += batch.tokens
        sums[3:7] += figures_P[1:].sum(dim=1)
        return loss_P.sum() * batch.loss_scale

    def figures(self, sums: list[float]) -> StepFigures:
        loss, pairs, tokens, margin, correct, chosen, rejected = sums
        count = max(pairs, 1.0)
        return StepFigures(
            loss=loss / count,
            tokens=int(tokens),
            tokens_by_source={SOURCE: int(tokens)},
            samples_by_source={SOURCE: int(pairs)},
            extra={
                "reward_margin": margin / count,
                "reward_accuracy": correct / count,
                "reward_chosen": chosen / count,
                "reward_rejected": rejected / count,
            },
        )


def build_objective(name: ObjectiveName, token_loss: TokenLoss, beta: float) -> Objective:
    """The objective of ``kinoe finetune sft`` or ``dpo``."""
    if name == "sft":
        return SupervisedFineTuning(token_loss)
    return DirectPreference(token_loss, beta)
