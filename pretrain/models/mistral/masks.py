"""Attention masks and RoPE positions for packed documents and sliding windows.

Shared by every attention implementation (SDPA now, FlexAttention later) so that they all
mean the same thing. ``document_ids_BT`` labels each token with its document; a document
occupies one contiguous run of positions (e.g. ids are the running count of EOS tokens).
"""

from __future__ import annotations

import torch


def positions_from_documents(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """RoPE position of each token (B, T), restarting at 0 wherever the document id changes."""
    _, seq_len = document_ids_BT.shape
    index_T = torch.arange(seq_len, device=document_ids_BT.device)
    starts_BT = torch.ones_like(document_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
    start_index_BT = torch.where(starts_BT, index_T, 0).cummax(dim=1).values
    return index_T - start_index_BT


def attention_mask(
    document_ids_BT: torch.Tensor | None,
    seq_len: int,
    sliding_window: int | None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Which keys each query may attend to, as a boolean (B or 1, 1, T, T) mask; None: plain causal.

    Query ``i`` sees key ``j`` when ``j <= i``, both tokens share a document (when
    ``document_ids_BT`` is given) and ``i - sliding_window < j`` (when a window is set), i.e.
    a window of ``sliding_window`` keys including the query itself, as in Mistral and
    Hugging Face's ``MistralForCausalLM``. ``device`` is used only without document ids.
    """
    if document_ids_BT is None and sliding_window is None:
        return None
    if document_ids_BT is not None:
        device = document_ids_BT.device
    query_T1 = torch.arange(seq_len, device=device)[:, None]
    key_1T = torch.arange(seq_len, device=device)[None, :]
    allowed_TT = key_1T <= query_T1
    if sliding_window is not None:
        allowed_TT = allowed_TT & (key_1T > query_T1 - sliding_window)
    if document_ids_BT is None:
        return allowed_TT[None, None]
    same_document_BTT = document_ids_BT[:, :, None] == document_ids_BT[:, None, :]
    return (allowed_TT[None] & same_document_BTT)[:, None]
