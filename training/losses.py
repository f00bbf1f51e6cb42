"""Token losses every objective builds on: cross-entropy of each label, compiled when asked."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from training.config import EngineConfig
from training.parallelize import compiled_loss

# Label of a position that trains nothing (padding, a prompt, a document's last token).
IGNORE = -100

TokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def next_token_losses(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of each label under the logits, in float32; 0 where the label is -100."""
    return F.cross_entropy(
        logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(labels_BT)


def token_loss_function(engine: EngineConfig) -> TokenLoss:
    """``next_token_losses``, compiled when ``engine.compile`` is on."""
    return compiled_loss(next_token_losses) if engine.compile else next_token_losses
