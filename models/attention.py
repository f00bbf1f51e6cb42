"""Attention backends shared by the model families: SDPA, FlexAttention and flash-attn varlen.

All three apply the rule of ``models.masks``; they differ in speed and memory, never
in weights. A model builds one mask with ``build_attention_mask`` per forward and hands it
to every layer's ``attend``: a BlockMask or a document list costs about as much to build as
a layer's attention, so building it per layer would be slow.

Tensor names end in their shape: B batch, T sequence, H query heads, G key/value heads,
K head dimension, N = B * T tokens of the flattened batch, C = documents in it + 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from common.errors import KinoeError
from models.masks import attention_mask, causal_mask_mod, document_starts

AttentionBackend = Literal["sdpa", "flex", "flash"]


@dataclass(frozen=True)
class SdpaMask:
    """A dense boolean (B or 1, 1, T, T) mask; None for plain causal, SDPA's fused causal kernel."""

    allowed_B1TT: torch.Tensor | None


@dataclass(frozen=True)
class FlexMask:
    """A block-sparse mask: FlexAttention skips key blocks that no query of a block may see."""

    block_mask: BlockMask


@dataclass(frozen=True)
class FlashMask:
    """Each document as one sequence of flash-attn's varlen batch, and the window it allows.

    ``cu_seqlens_C`` (int32) holds each document's first token in the flattened batch, then
    N; ``window_size`` is flash-attn's (keys left of the query, keys right of it), -1 for no
    limit.
    """

    cu_seqlens_C: torch.Tensor
    max_seqlen: int
    window_size: tuple[int, int]


AttentionMask = SdpaMask | FlexMask | FlashMask

_COMPILED: dict[Callable, Callable] = {}


def _compiled(function: Callable) -> Callable:
    """``function`` compiled on first use, once per process, for static shapes.

    FlexAttention is fast only compiled: uncompiled, ``flex_attention`` materialises the
    T x T scores and ``create_block_mask`` the T x T mask (at T=4096 on an H200, 2-8 ms
    per forward against 0.1 ms compiled, while a layer's attention takes 0.5-0.9 ms). Lazily, because importing the compiler costs
    seconds that the other backends need not pay; static, because training shapes do not
    change. A new mask_mod closure each forward reuses the graph: it is not a new one.
    """
    if function not in _COMPILED:
        _COMPILED[function] = torch.compile(function, dynamic=False)
    return _COMPILED[function]


def _flash_attn_varlen_func() -> Callable[..., torch.Tensor]:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        raise KinoeError(
            f"attention 'flash' needs flash-attn, which does not import here ({error}); "
            "install it on the GPU nodes with pip install 'kinoe[gpu]', or set attention "
            "to 'sdpa' or 'flex'"
        ) from None
    return flash_attn_varlen_func


def build_attention_mask(
    backend: AttentionBackend,
    document_ids_BT: torch.Tensor | None,
    batch_size: int,
    seq_len: int,
    sliding_window: int | None,
    device: torch.device,
) -> AttentionMask:
    """The mask for one forward, shared by all layers; no ``document_ids_BT``: plain causal."""
    if backend == "sdpa":
        return SdpaMask(attention_mask(document_ids_BT, seq_len, sliding_window, device=device))
    if backend == "flex":
        rule = causal_mask_mod(document_ids_BT, sliding_window)
        # Without documents the rule is the same for every row, so one row's mask broadcasts.
        rows = None if document_ids_BT is None else batch_size
        block_mask = _compiled(create_block_mask)(rule, rows, None, seq_len, seq_len, device=device)
        return FlexMask(block_mask)
    if backend == "flash":
        _flash_attn_varlen_func()  # fail before the first layer, not inside it
        if document_ids_BT is None:
            starts_N = torch.arange(batch_size * seq_len, device=device) % seq_len == 0
        else:
            starts_N = document_starts(document_ids_BT).flatten()
        end_1 = torch.tensor([batch_size * seq_len], device=device)
        cu_seqlens_C = torch.cat([starts_N.nonzero().flatten(), end_1]).to(torch.int32)
        # flash-attn sizes its grid from a host integer; one sync per forward, not per layer.
        max_seqlen = int(cu_seqlens_C.diff().max())
        # flash-attn's window counts keys left of the query; ours includes the query itself.
        window_size = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        return FlashMask(cu_seqlens_C, max_seqlen, window_size)
    raise ValueError(f"unknown attention backend {backend!r}")


def attend(
    q_BHTK: torch.Tensor, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor, mask: AttentionMask
) -> torch.Tensor:
    """Softmax attention (B, H, T, K) of H query heads over G shared key/value heads.

    Query head ``h`` reads key/value head ``h // (H / G)``, as ``repeat_interleave`` would.
    """
    B, H, T, K = q_BHTK.shape
    G = k_BGTK.shape[1]
    if isinstance(mask, FlexMask):
        return _compiled(flex_attention)(
            q_BHTK, k_BGTK, v_BGTK, block_mask=mask.block_mask, enable_gqa=True
        )
    if isinstance(mask, FlashMask):
        q_NHK = q_BHTK.transpose(1, 2).reshape(B * T, H, K)
        k_NGK = k_BGTK.transpose(1, 2).reshape(B * T, G, K)
        v_NGK = v_BGTK.transpose(1, 2).reshape(B * T, G, K)
        out_NHK = _flash_attn_varlen_func()(
            q_NHK,
            k_NGK,
            v_NGK,
            cu_seqlens_q=mask.cu_seqlens_C,
            cu_seqlens_k=mask.cu_seqlens_C,
            max_seqlen_q=mask.max_seqlen,
            max_seqlen_k=mask.max_seqlen,
            causal=True,
            window_size=mask.window_size,
        )
        return out_NHK.view(B, T, H, K).transpose(1, 2)
    return F.scaled_dot_product_attention(
        q_BHTK,
        k_BGTK,
        v_BGTK,
        attn_mask=mask.allowed_B1TT,
        is_causal=mask.allowed_B1TT is None,
        enable_gqa=True,
    )
