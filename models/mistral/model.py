"""The Mistral architecture: pre-norm decoder blocks of grouped-query attention and SwiGLU.

Architecture only; parallelism, activation checkpointing and compilation are applied from
outside. Tensor names end in their shape: B batch, T sequence, D hidden size, H query heads,
G key/value heads, K head dimension, F intermediate size, V vocabulary, P max positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AttentionMask, attend, build_attention_mask
from models.masks import positions_from_documents
from models.mistral.args import MistralArgs

# A parameter and the function that draws its initial values in place.
Initializer = tuple[nn.Parameter, Callable[[torch.Tensor], None]]


def normal(std: float) -> Callable[[torch.Tensor], None]:
    """Draws Normal(0, std) in place."""
    return lambda tensor: nn.init.normal_(tensor, mean=0.0, std=std)


def ones(tensor: torch.Tensor) -> None:
    nn.init.ones_(tensor)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x32_BTD = x_BTD.float()
        mean_square_BT1 = x32_BTD.pow(2).mean(dim=-1, keepdim=True)
        normed_BTD = x32_BTD * torch.rsqrt(mean_square_BT1 + self.eps)
        return self.weight * normed_BTD.to(x_BTD.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for RoPE in the rotate-half layout (pairs ``k`` and ``k + K/2``).

    Hugging Face's Mistral uses the same layout, so q/k weights convert without permutation.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        # Not persistent: derived from the config, so checkpoints hold parameters only.
        self.register_buffer("cos_PK", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin_PK", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        device = self.cos_PK.device
        max_seq_len = self.cos_PK.shape[0]
        exponents_K2 = torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim
        inverse_frequency_K2 = 1.0 / (self.theta**exponents_K2)
        positions_P = torch.arange(max_seq_len, device=device).float()
        angles_PK2 = torch.outer(positions_P, inverse_frequency_K2)
        angles_PK = torch.cat([angles_PK2, angles_PK2], dim=-1)
        self.cos_PK.copy_(angles_PK.cos())
        self.sin_PK.copy_(angles_PK.sin())

    def forward(self, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at each token's position, shaped (B, 1, T, K) to broadcast over heads."""
        return self.cos_PK[positions_BT][:, None], self.sin_PK[positions_BT][:, None]


def apply_rotary(
    x_BHTK: torch.Tensor, cos_B1TK: torch.Tensor, sin_B1TK: torch.Tensor
) -> torch.Tensor:
    """Rotate each (x[k], x[k + K/2]) pair by its position's angle."""
    first_BHTk, second_BHTk = x_BHTK.chunk(2, dim=-1)
    rotated_BHTK = torch.cat([-second_BHTk, first_BHTk], dim=-1)
    cos_B1TK, sin_B1TK = cos_B1TK.to(x_BHTK.dtype), sin_B1TK.to(x_BHTK.dtype)
    return x_BHTK * cos_B1TK + rotated_BHTK * sin_B1TK


class Attention(nn.Module):
    """Grouped-query self-attention: G key/value heads, each shared by H / G query heads."""

    def __init__(self, args: MistralArgs):
        super().__init__()
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_B1TK: torch.Tensor,
        sin_B1TK: torch.Tensor,
        mask: AttentionMask,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
        q_BHTK = self.q_proj(x_BTD).view(B, T, H, K).transpose(1, 2)
        k_BGTK = self.k_proj(x_BTD).view(B, T, G, K).transpose(1, 2)
        v_BGTK = self.v_proj(x_BTD).view(B, T, G, K).transpose(1, 2)

        q_BHTK = apply_rotary(q_BHTK, cos_B1TK, sin_B1TK)
        k_BGTK = apply_rotary(k_BGTK, cos_B1TK, sin_B1TK)
        out_BHTK = attend(q_BHTK, k_BGTK, v_BGTK, mask)
        return self.o_proj(out_BHTK.transpose(1, 2).reshape(B, T, H * K))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: MistralArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        hidden_BTF = F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD)
        return self.down_proj(hidden_BTF)

    def initializers(self, std: float, residual_std: float) -> list[Initializer]:
        """gate and up Normal(0, std); down, the residual branch's output, Normal(0, residual_std)."""
        return [
            (self.gate_proj.weight, normal(std)),
            (self.up_proj.weight, normal(std)),
            (self.down_proj.weight, normal(residual_std)),
        ]


class Block(nn.Module):
    """One decoder layer of every family: x + attention(norm(x)), then x + feed_forward(norm(x)).

    The feed-forward part is the one thing a family changes (SwiGLU here, routed experts in
    Mixtral); it is built by the model and passed in.
    """

    def __init__(self, args: MistralArgs, feed_forward: nn.Module):
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.feed_forward = feed_forward

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_B1TK: torch.Tensor,
        sin_B1TK: torch.Tensor,
        mask: AttentionMask,
    ) -> torch.Tensor:
        x_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), cos_B1TK, sin_B1TK, mask)
        return x_BTD + self.feed_forward(self.ffn_norm(x_BTD))


class Mistral(nn.Module):
    """Token ids in, next-token logits out.

    A family that changes only the feed-forward part of the block (Mixtral) subclasses this
    and sets ``feed_forward_type``, a module built from the args with an
    ``initializers(std, residual_std)``; embedding, attention, masks, RoPE, the block and the
    forward pass stay one implementation.
    """

    feed_forward_type: ClassVar[type[nn.Module]] = FeedForward

    def __init__(self, args: MistralArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.rope = RotaryEmbedding(args.head_dim, args.max_seq_len, args.rope_theta)
        self.layers = nn.ModuleList(
            Block(args, self.feed_forward_type(args)) for _ in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Draw every parameter from its initializer, in ``initializers`` order; recompute RoPE.

        So a model built on the meta device and moved with ``to_empty`` is fully initialised
        by this call, and a partitioned build that draws the same initializers in the same
        order from the same generator gets the same weights.
        """
        for parameter, initialise in self.initializers():
            initialise(parameter)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute the buffers that are not parameters (RoPE's tables), e.g. after ``to_empty``."""
        self.rope.reset_buffers()

    def initializers(self) -> list[Initializer]:
        """Every distinct parameter with its initializer, in the order the random draws are made.

        Normal(0, init_std) weights, residual-branch outputs Normal(0, init_std / sqrt(2 L)),
        norms 1; the feed-forward part's own (``feed_forward.initializers``).
        """
        std = self.args.init_std
        residual_std = std / math.sqrt(2 * self.args.num_layers)
        found: list[Initializer] = [(self.tok_embeddings.weight, normal(std))]
        for layer in self.layers:
            attention = layer.attention
            found += [
                (linear.weight, normal(std))
                for linear in (attention.q_proj, attention.k_proj, attention.v_proj)
            ]
            found.append((attention.o_proj.weight, normal(residual_std)))
            found += layer.feed_forward.initializers(std, residual_std)
            found += [(layer.attention_norm.weight, ones), (layer.ffn_norm.weight, ones)]
        found.append((self.norm.weight, ones))
        if not self.args.tie_embeddings:
            found.append((self.output.weight, normal(std)))
        return found

    def forward(
        self, tokens_BT: torch.Tensor, document_ids_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T); ``document_ids_BT`` separates packed documents."""
        batch_size, seq_len = tokens_BT.shape
        if seq_len > self.args.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len {self.args.max_seq_len}"
            )
        if document_ids_BT is None:
            positions_BT = torch.arange(seq_len, device=tokens_BT.device).expand(
                batch_size, seq_len
            )
        else:
            if document_ids_BT.shape != tokens_BT.shape:
                raise ValueError(
                    f"document_ids shape {tuple(document_ids_BT.shape)} differs from "
                    f"tokens shape {tuple(tokens_BT.shape)}"
                )
            positions_BT = positions_from_documents(document_ids_BT)
        # Built once and shared by every layer: a BlockMask or document list is slow to build.
        mask = build_attention_mask(
            self.args.attention,
            document_ids_BT,
            batch_size,
            seq_len,
            self.args.sliding_window,
            device=tokens_BT.device,
        )
        cos_B1TK, sin_B1TK = self.rope(positions_BT)

        x_BTD = self.tok_embeddings(tokens_BT)
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos_B1TK, sin_B1TK, mask)
        return self.output(self.norm(x_BTD))
