"""Mixtral architecture config: Mistral's shapes plus the experts, their counts and presets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, model_validator

from models.mistral.args import MistralArgs, mistral_1b, tiny

MoeImplementation = Literal["grouped", "loop"]


class MixtralArgs(MistralArgs):
    """Shapes of a Mixtral model: Mistral with each block's MLP replaced by ``num_experts`` experts.

    ``intermediate_size`` is one expert's width. Each token goes to its ``top_k`` experts.
    """

    num_experts: int = Field(ge=2)
    top_k: int = Field(ge=1)
    # Switch Transformer's load-balancing loss, E * sum_e f_e P_e (1.0 when balanced), and
    # ST-MoE's router z-loss, mean logsumexp(logits)^2; both are added to the LM loss.
    router_aux_loss_coef: float = Field(0.01, ge=0)
    router_z_loss_coef: float = Field(0.0, ge=0)
    # None: every assignment is computed. Else an expert takes at most
    # ceil(capacity_factor * tokens * top_k / num_experts) assignments of a forward, in token
    # order; the rest contribute nothing (the residual stream carries the token) and are counted.
    capacity_factor: float | None = Field(None, gt=0)
    # How the experts are computed; both give the same results and weights. "grouped": one
    # grouped matmul per weight over all experts (torch's grouped GEMM). "loop": one matmul
    # per expert in a Python loop, the plain reference that "grouped" is tested against.
    moe_implementation: MoeImplementation = "grouped"

    @model_validator(mode="after")
    def _experts_fit(self) -> MixtralArgs:
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be at most num_experts ({self.num_experts})"
            )
        if self.moe_implementation == "grouped" and (
            self.hidden_size % 8 or self.intermediate_size % 8
        ):
            raise ValueError(
                f"moe_implementation 'grouped' needs hidden_size ({self.hidden_size}) and "
                f"intermediate_size ({self.intermediate_size}) divisible by 8: torch's grouped "
                "GEMM reads rows in 16-byte steps; change the sizes or use 'loop'"
            )
        return self

    def _with_experts(self, mistral_count: int, experts: int) -> int:
        """A Mistral count with each layer's one MLP swapped for a router and ``experts`` MLPs."""
        mlp = 3 * self.hidden_size * self.intermediate_size  # gate, up, down
        router = self.hidden_size * self.num_experts
        return mistral_count + self.num_layers * (router + experts * mlp - mlp)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters of ``Mixtral(self)``, every expert counted; a tied output matrix counts once."""
        return self._with_experts(super().num_parameters(include_embeddings), self.num_experts)

    def num_active_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters one token uses: the router and its ``top_k`` experts in each layer."""
        return self._with_experts(super().num_parameters(include_embeddings), self.top_k)

    def num_expert_parameters(self) -> int:
        """Parameters of the routed experts of every layer (what expert parallelism splits)."""
        return self.num_layers * self.num_experts * 3 * self.hidden_size * self.intermediate_size

    def flops_per_token(self, seq_len: int) -> float:
        """Mistral's count (``6 N + 12 L H K T``) over active parameters only.

        A token multiplies by the router and its top_k experts and by no other expert, so the
        usual MoE MFU counts only those. Tokens dropped by capacity are still counted.
        """
        inactive = self.num_parameters() - self.num_active_parameters()
        return super().flops_per_token(seq_len) - 6 * inactive


def _with_experts(base: MistralArgs, **changes: Any) -> MixtralArgs:
    """A Mistral preset's shapes with experts (and any other field changed)."""
    return MixtralArgs.model_validate({**base.model_dump(), **changes})


def mixtral_tiny() -> MixtralArgs:
    """Mistral's ``tiny`` with 4 experts, top-2: for CPU tests."""
    return _with_experts(tiny(), num_experts=4, top_k=2)


def mixtral_1b_active() -> MixtralArgs:
    """mistral_1b's attention with 8 experts of half its MLP width, top-2: about 1.04B active.

    About 3.1B non-embedding parameters in all; the same FLOPs per token as mistral_1b.
    """
    return _with_experts(mistral_1b(), intermediate_size=3584, num_experts=8, top_k=2)


def mixtral_8x7b() -> MixtralArgs:
    """Mixtral 8x7B v0.1 shapes with kinoe's 65,024-token vocabulary (the original has 32,000)."""
    return MixtralArgs(
        vocab_size=65024,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        num_experts=8,
        top_k=2,
        rope_theta=1e6,
        max_seq_len=32768,
        sliding_window=None,
    )


PRESETS: dict[str, Callable[[], MixtralArgs]] = {
    "mixtral_tiny": mixtral_tiny,
    "mixtral_1b_active": mixtral_1b_active,
    "mixtral_8x7b": mixtral_8x7b,
}
