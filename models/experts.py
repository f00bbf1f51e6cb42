"""What a model with routed experts declares to training: its MoE modules, router losses and statistics.

Training code asks ``isinstance(model, ExpertModel)`` rather than probing for methods, so a
family that adds experts states it once, in its class line, and a typo is an error at import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RouterStats:
    """Routing of the last forward, detached, kept on the model's device (no host sync).

    ``load_LE``: float (L, E), each layer's share of assignments per expert, dropped ones
    included; ``aux_loss`` and ``z_loss``: 0-dim, unweighted means over layers;
    ``dropped_tokens``: assignments dropped for capacity, summed over layers.
    """

    load_LE: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped_tokens: torch.Tensor | int


class ExpertModel(ABC):
    """A model whose feed-forward blocks route tokens to experts (mixed into an ``nn.Module``)."""

    @abstractmethod
    def moe_modules(self) -> list[nn.Module]:
        """Each layer's MoE module; ZeRO-3 gathers each one's parameters whole, as a leaf."""

    @abstractmethod
    def auxiliary_loss(self) -> torch.Tensor:
        """The weighted router losses of the last forward, to add to the training loss (with grad)."""

    @abstractmethod
    def router_stats(self) -> RouterStats:
        """The routing of the last forward, for logging and the starving-expert alert."""
