"""Conversion between our parameter names and Hugging Face ``MistralForCausalLM``'s.

Tensors pass through unchanged: our RoPE uses Hugging Face's rotate-half layout, so q and
k projections need no permutation.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from models.mistral.args import MistralArgs

if TYPE_CHECKING:  # importing transformers takes a second; training never needs it
    from transformers import MistralConfig

# (ours, Hugging Face); "{i}" stands for a layer index.
NAMES: tuple[tuple[str, str], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attention.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.feed_forward.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


def rename(
    state_dict: dict[str, Any],
    table: tuple[tuple[str, str], ...],
    source: int,
    description: str,
) -> dict[str, Any]:
    """Rename every key from column ``source`` of ``table`` (ours, Hugging Face's) to the other.

    Every name of the table must be there for each layer and nothing else; ``description``
    names the expected kind of state dict in the error.
    """
    rules = [(_pattern(names[source]), names[1 - source]) for names in table]
    renamed: dict[str, Any] = {}
    unexpected: list[str] = []
    layers: set[int] = set()
    for key, tensor in state_dict.items():
        for pattern, target in rules:
            match = pattern.match(key)
            if match:
                layer = match.group(1) if match.groups() else None
                if layer is not None:
                    layers.add(int(layer))
                    target = target.replace("{i}", layer)
                renamed[target] = tensor
                break
        else:
            unexpected.append(key)
    num_layers = max(layers) + 1 if layers else 0
    expected = {
        names[source].replace("{i}", str(i))
        for names in table
        for i in (range(num_layers) if "{i}" in names[source] else [0])
    }
    missing = sorted(expected - state_dict.keys())
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected {_listing(sorted(unexpected))}")
        raise ValueError(f"not a {description} state dict: {'; '.join(problems)}")
    return renamed


def _listing(keys: list[str], shown: int = 8) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def to_hf(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Our ``Mistral.state_dict()`` under Hugging Face ``MistralForCausalLM`` names."""
    return rename(state_dict, NAMES, source=0, description="kinoe Mistral")


def from_hf(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face ``MistralForCausalLM`` state dict under our names; inverse of ``to_hf``."""
    return rename(state_dict, NAMES, source=1, description="Hugging Face Mistral")


def hf_config_fields(args: MistralArgs) -> dict[str, Any]:
    """The Hugging Face config fields of a Mistral-style architecture (Mixtral adds its experts)."""
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "rms_norm_eps": args.rms_norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "sliding_window": args.sliding_window,
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": args.init_std,
    }


def hf_config(args: MistralArgs) -> MistralConfig:
    """The Hugging Face config describing the same architecture as ``args``."""
    from transformers import MistralConfig

    return MistralConfig(**hf_config_fields(args), architectures=["MistralForCausalLM"])


def args_fields_from_hf_config(config: Any) -> dict[str, Any]:
    """The ``MistralArgs`` fields a Hugging Face Mistral-style config describes; inverse of ``hf_config``.

    Raises ValueError naming each setting kinoe's Mistral does not implement.
    """
    rope = dict(config.rope_parameters or {})
    unsupported = []
    if config.hidden_act != "silu":
        unsupported.append(f"hidden_act={config.hidden_act!r} (kinoe: silu)")
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope_type={rope['rope_type']!r} (kinoe: default RoPE)")
    if unsupported:
        raise ValueError(f"settings kinoe's model does not implement: {', '.join(unsupported)}")
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads or config.num_attention_heads,
        "head_dim": getattr(config, "head_dim", None)
        or config.hidden_size // config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "rms_norm_eps": config.rms_norm_eps,
        "max_seq_len": config.max_position_embeddings,
        "sliding_window": config.sliding_window,
        "tie_embeddings": bool(config.tie_word_embeddings),
        "init_std": config.initializer_range,
    }


def args_from_hf_config(config: MistralConfig) -> MistralArgs:
    """The ``MistralArgs`` of a Hugging Face ``MistralConfig``."""
    return MistralArgs.model_validate(args_fields_from_hf_config(config))
