"""Mistral architecture config, its parameter and FLOP counts, and named presets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, model_validator

from common.config import Config
from models.attention import AttentionBackend


class MistralArgs(Config):
    """Shapes of a Mistral model; everything the architecture needs and nothing about training."""

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int | None = Field(None, gt=0)  # None: hidden_size // num_heads, set on validation
    intermediate_size: int = Field(gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    max_seq_len: int = Field(gt=0)
    sliding_window: int | None = Field(None, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)
    # How attention is computed; all three follow models.masks and change no
    # weights, so checkpoints and the Hugging Face conversion are the same for each.
    # "sdpa": PyTorch's SDPA, its flash kernel for plain causal attention, else a dense
    # (B, 1, T, T) mask (O(B T^2) memory; every key block computed). "flex": FlexAttention
    # with a block-sparse mask, skipping blocks no query sees; compiled on first use, no
    # backward on CPU. "flash": flash-attn's varlen kernel, one sequence per document;
    # CUDA, bf16 or fp16 only, needs pip install 'kinoe[gpu]'.
    attention: AttentionBackend = "sdpa"

    @model_validator(mode="before")
    @classmethod
    def _default_head_dim(cls, data: Any) -> Any:
        # Filled in before field validation so that head_dim is always an int afterwards;
        # setting it in an "after" validator would re-enter validation on assignment.
        if isinstance(data, dict) and data.get("head_dim") is None:
            hidden, heads = data.get("hidden_size"), data.get("num_heads")
            if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
                if hidden % heads:
                    raise ValueError(
                        f"num_heads ({heads}) must divide hidden_size ({hidden}) "
                        "when head_dim is not given"
                    )
                data = {**data, "head_dim": hidden // heads}
        return data

    @model_validator(mode="after")
    def _heads_group_evenly(self) -> MistralArgs:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        return self

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters of ``Mistral(self)``; a tied output matrix counts once, as the embedding."""
        d, k, f = self.hidden_size, self.head_dim, self.intermediate_size
        attention = d * self.num_heads * k * 2 + d * self.num_kv_heads * k * 2  # q, o; k, v
        feed_forward = 3 * d * f  # gate, up, down
        norms = 2 * d
        blocks = self.num_layers * (attention + feed_forward + norms)
        embedding = self.vocab_size * d
        output = 0 if self.tie_embeddings else self.vocab_size * d
        total = blocks + d + output  # d: the final norm
        return total + embedding if include_embeddings else total

    def num_non_embedding_parameters(self) -> int:
        """Parameters other than the token embedding table (an untied output projection counts)."""
        return self.num_parameters(include_embeddings=False)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward, matmuls only) at sequence length ``seq_len``.

        ``6 N + 12 L H K T``: each weight a token multiplies by costs 2 FLOPs forward and 4
        backward (N: non-embedding parameters; a tied output projection is added back, since
        the lookup is free but the output matmul is not; norm weights are a negligible
        overcount). The attention scores and the weighted sum cost ``2 * 2 * H * K * T``
        forward per layer, three times that with backward. Like PaLM's formula it counts the
        full T x T score matrix, ignoring causal and sliding-window savings.
        """
        matmul_parameters = self.num_non_embedding_parameters()
        if self.tie_embeddings:
            matmul_parameters += self.vocab_size * self.hidden_size
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return float(6 * matmul_parameters + attention)


def tiny() -> MistralArgs:
    """A model for CPU tests: 64 wide, 2 layers, 4 heads sharing 2 KV heads."""
    return MistralArgs(
        vocab_size=2048,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_seq_len=256,
    )


def mistral_1b() -> MistralArgs:
    """About 1.04B non-embedding parameters, for kinoe's 65,024-token tokenizer."""
    return MistralArgs(
        vocab_size=65024,
        hidden_size=2048,
        num_layers=16,
        num_heads=16,
        num_kv_heads=8,
        intermediate_size=7168,
        max_seq_len=4096,
    )


def mistral_7b() -> MistralArgs:
    """Mistral 7B v0.1 shapes with kinoe's 65,024-token vocabulary (the original has 32,000)."""
    return MistralArgs(
        vocab_size=65024,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        rope_theta=10000.0,
        max_seq_len=8192,
        sliding_window=4096,
    )


def mistral_13b() -> MistralArgs:
    """Llama-2-13B widths and depth with Mistral's grouped-query attention (8 KV heads)."""
    return MistralArgs(
        vocab_size=65024,
        hidden_size=5120,
        num_layers=40,
        num_heads=40,
        num_kv_heads=8,
        intermediate_size=13824,
        max_seq_len=4096,
    )


PRESETS: dict[str, Callable[[], MistralArgs]] = {
    "tiny": tiny,
    "mistral_1b": mistral_1b,
    "mistral_7b": mistral_7b,
    "mistral_13b": mistral_13b,
}
