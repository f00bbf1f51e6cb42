"""A batch's shared leading tokens run once: the few-shot header every prompt of a task starts with.

A task's prompts all begin with the same instruction and few-shot examples (hundreds of tokens
for a 4-shot JMMLU or JSeM prompt) and differ only in the question after them. A batch is laid
out as ``[shared prefix][left padding][the rest of each prompt]``: the prefix goes through the
model once, its key/value cache is repeated for every row, and only the rests run batched on
top of it. Positions are explicit (the prefix's length plus the count of real tokens before),
and the attention mask has the padding's columns off, so every token sees exactly the tokens
of its own prompt, at the positions it would have had without sharing.

The prefix is whatever the batch's token ids have in common, measured on the ids (never on the
text), so a tokenizer that merges across the boundary only shortens it. It is used from
``MIN_SHARED`` tokens on (below that the extra pass costs more than it saves), and only for a
model that attends to everything within ``max_length``: a sliding-window cache keeps only the
window's last tokens, so a prefix cached on its own would not be the one a row attends to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eval.model import LoadedModel, common_prefix

MIN_SHARED = 32


@dataclass(frozen=True)
class PrefixBatch:
    """Model inputs for rows of token ids that may share leading ids.

    ``ids`` and ``positions`` are (rows, width) for the part after the prefix, left-padded;
    ``full_mask`` is (rows, shared + width), the attention mask over the prefix's cached columns
    and these; ``lengths`` is each row's whole length in tokens.
    """

    shared: int
    ids: torch.Tensor
    full_mask: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    prefix: list[int]


def layout(rows: Sequence[Sequence[int]], pad_id: int, share: bool = True) -> PrefixBatch:
    """Lay ``rows`` out as shared prefix + left-padded rests (``share=False``: left-padded rows).

    The last id of every row stays out of the prefix (the scorer needs its logits). No prefix
    under ``MIN_SHARED`` ids or for a single row.
    """
    shared = min(len(row) for row in rows) - 1
    for row in rows[1:]:
        shared = min(shared, common_prefix(rows[0], row))
    if not share or shared < MIN_SHARED or len(rows) == 1:
        shared = 0
    rests = [row[shared:] for row in rows]
    lengths = torch.tensor([len(row) for row in rows])
    width = max(len(rest) for rest in rests)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, rest in enumerate(rests):
        ids[index, width - len(rest) :] = torch.tensor(list(rest))
        mask[index, width - len(rest) :] = 1
    positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([torch.ones((len(rows), shared), dtype=torch.long), mask], dim=1)
    return PrefixBatch(shared, ids, full_mask, positions, lengths, list(rows[0][:shared]))


@torch.inference_mode()
def prefix_cache(loaded: LoadedModel, batch: PrefixBatch):
    """The key/value cache of ``batch``'s prefix, run once and repeated for every row; None without one."""
    if not batch.shared:
        return None
    out = loaded.model(
        input_ids=torch.tensor([batch.prefix], device=loaded.device),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(batch.ids))
    return cache
