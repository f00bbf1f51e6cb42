"""The Mixtral architecture: Mistral's decoder blocks with each SwiGLU MLP replaced by a sparse MoE.

Architecture only; parallelism, activation checkpointing and compilation are applied from
outside. Attention, RoPE, RMSNorm, the block and the masks are Mistral's own. Tensor names end
in their shape: L layers, E experts.
"""

from __future__ import annotations

import torch

from models.experts import ExpertModel, RouterStats
from models.mistral.model import Mistral
from models.mixtral.args import MixtralArgs
from models.mixtral.moe import MoE


class Mixtral(Mistral, ExpertModel):
    """Token ids in, next-token logits out; the router losses and statistics of that forward kept.

    Mistral's model with an ``MoE`` as each block's feed-forward: everything else is Mistral's.
    """

    feed_forward_type = MoE
    args: MixtralArgs

    def moe_modules(self) -> list[MoE]:
        """Each layer's MoE; ZeRO-3 gathers each one's parameters whole, as a leaf module."""
        return [layer.feed_forward for layer in self.layers]

    def _last_forward(self) -> list[MoE]:
        moes = self.moe_modules()
        if any(moe.aux_loss is None for moe in moes):
            raise RuntimeError("the router losses and statistics exist only after a forward")
        return moes

    def auxiliary_loss(self) -> torch.Tensor:
        """The router losses of the last forward, weighted, to add to the LM loss (with grad).

        ``router_aux_loss_coef * mean_L(aux_loss) + router_z_loss_coef * mean_L(z_loss)``.
        """
        moes = self._last_forward()
        aux_L = torch.stack([moe.aux_loss for moe in moes])
        z_L = torch.stack([moe.z_loss for moe in moes])
        return (
            self.args.router_aux_loss_coef * aux_L.mean()
            + self.args.router_z_loss_coef * z_L.mean()
        )

    @torch.no_grad()
    def router_stats(self) -> RouterStats:
        """Routing of the last forward: per-layer load shares, unweighted router losses, drops."""
        moes = self._last_forward()
        routed_LE = torch.stack([moe.tokens_per_expert_E for moe in moes]).float()
        return RouterStats(
            load_LE=routed_LE / routed_LE.sum(dim=-1, keepdim=True),
            aux_loss=torch.stack([moe.aux_loss for moe in moes]).mean().detach(),
            z_loss=torch.stack([moe.z_loss for moe in moes]).mean().detach(),
            dropped_tokens=sum(moe.dropped_tokens for moe in moes),
        )
