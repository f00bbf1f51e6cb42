"""Which keys each query may attend to, and RoPE positions, for packed documents and sliding windows.

Shared by every model family and attention backend so that they all mean the same thing: the
dense SDPA mask, the FlexAttention block mask and flash-attn's per-document sequences all come
from ``causal_mask_mod`` and ``document_starts``. ``document_ids_BT`` labels each token with
its document; a document occupies one contiguous run of positions (e.g. ids are the running
count of EOS tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def document_starts(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """Whether each token (B, T) begins a document: the first of its row or a change of id."""
    starts_BT = torch.ones_like(document_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
    return starts_BT


def positions_from_documents(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """RoPE position of each token (B, T), restarting at 0 wherever the document id changes."""
    _, seq_len = document_ids_BT.shape
    index_T = torch.arange(seq_len, device=document_ids_BT.device)
    start_index_BT = torch.where(document_starts(document_ids_BT), index_T, 0).cummax(dim=1).values
    return index_T - start_index_BT


def causal_mask_mod(
    document_ids_BT: torch.Tensor | None, sliding_window: int | None
) -> Callable[..., torch.Tensor]:
    """The rule, as a FlexAttention ``mask_mod(batch, head, query, key) -> allowed``.

    Query ``i`` sees key ``j`` when ``j <= i``, both tokens share a document (when
    ``document_ids_BT`` is given) and ``i - sliding_window < j`` (when a window is set), i.e.
    a window of ``sliding_window`` keys including the query itself, as in Mistral and
    Hugging Face's ``MistralForCausalLM``. The indices may be broadcasting tensors, which is
    how ``attention_mask`` builds the dense mask from the same function.
    """

    def allowed(
        batch: torch.Tensor, head: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
    ) -> torch.Tensor:
        visible = key <= query
        if sliding_window is not None:
            visible = visible & (key > query - sliding_window)
        if document_ids_BT is not None:
            visible = visible & (document_ids_BT[batch, query] == document_ids_BT[batch, key])
        return visible

    return allowed


def attention_mask(
    document_ids_BT: torch.Tensor | None,
    seq_len: int,
    sliding_window: int | None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """``causal_mask_mod`` as a dense boolean (B or 1, 1, T, T) mask; None: plain causal.

    ``device`` is used only without document ids.
    """
    if document_ids_BT is None and sliding_window is None:
        return None
    if document_ids_BT is not None:
        device = document_ids_BT.device
    batch_size = 1 if document_ids_BT is None else document_ids_BT.shape[0]
    batch_B11 = torch.arange(batch_size, device=device)[:, None, None]
    query_1T1 = torch.arange(seq_len, device=device)[None, :, None]
    key_11T = torch.arange(seq_len, device=device)[None, None, :]
    allowed_BTT = causal_mask_mod(document_ids_BT, sliding_window)(
        batch_B11, None, query_1T1, key_11T
    )
    return allowed_BTT[:, None]
