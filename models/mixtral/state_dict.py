"""Conversion between our parameter names and Hugging Face ``MixtralForCausalLM``'s.

Tensors pass through unchanged. Transformers 5 stacks the experts as we do: ``gate_up_proj``
(E, 2F, D) with gate rows first and ``down_proj`` (E, D, F); it converts the per-expert
``block_sparse_moe.experts.{e}.w1/w2/w3`` of older checkpoints itself when loading them.
Attention, norms, embeddings and output are named as in Mistral.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models.mistral.state_dict import NAMES as MISTRAL_NAMES
from models.mistral.state_dict import (
    args_fields_from_hf_config,
    hf_config_fields,
    rename,
)
from models.mixtral.args import MixtralArgs

if TYPE_CHECKING:  # importing transformers takes a second; training never needs it
    from transformers import MixtralConfig

# (ours, Hugging Face); "{i}" stands for a layer index. Mistral's, less its MLP.
NAMES: tuple[tuple[str, str], ...] = (
    *(names for names in MISTRAL_NAMES if ".feed_forward." not in names[0]),
    ("layers.{i}.feed_forward.router.weight", "model.layers.{i}.mlp.gate.weight"),
    ("layers.{i}.feed_forward.w_gate_up_E2FD", "model.layers.{i}.mlp.experts.gate_up_proj"),
    ("layers.{i}.feed_forward.w_down_EDF", "model.layers.{i}.mlp.experts.down_proj"),
)


def to_hf(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Our ``Mixtral.state_dict()`` under Hugging Face ``MixtralForCausalLM`` names."""
    return rename(state_dict, NAMES, source=0, description="kinoe Mixtral")


def from_hf(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face ``MixtralForCausalLM`` state dict under our names; inverse of ``to_hf``."""
    return rename(state_dict, NAMES, source=1, description="Hugging Face Mixtral")


def hf_config(args: MixtralArgs) -> MixtralConfig:
    """The Hugging Face config describing the same architecture as ``args``.

    Hugging Face computes every assignment (it has no capacity) and no z-loss. Its
    load-balancing loss counts a token's top_k choices as top_k whole tokens, top_k times
    ours, so the coefficient is divided by top_k to keep the same pull toward balance.
    """
    from transformers import MixtralConfig

    return MixtralConfig(
        **hf_config_fields(args),
        num_local_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        router_aux_loss_coef=args.router_aux_loss_coef / args.top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
        architectures=["MixtralForCausalLM"],
    )


def args_from_hf_config(config: MixtralConfig) -> MixtralArgs:
    """The ``MixtralArgs`` of a Hugging Face ``MixtralConfig``; the inverse of ``hf_config``.

    Hugging Face's load-balancing loss is top_k times kinoe's for the same coefficient (see
    ``hf_config``), hence the factor. Router jitter is training-time noise kinoe does not
    add; it changes no weight.
    """
    return MixtralArgs.model_validate(
        {
            **args_fields_from_hf_config(config),
            "num_experts": config.num_local_experts,
            "top_k": config.num_experts_per_tok,
            "router_aux_loss_coef": config.router_aux_loss_coef * config.num_experts_per_tok,
        }
    )
