"""Log-likelihood of each choice after a shared context, the context run once per question.

Each question's prompt goes through the model once, with its key/value cache kept; the cache
is then repeated once per choice and only the choice tokens run on top of it. The alternative,
one row per choice holding context and choice, recomputes the context for every choice: five
times the work for JCommonsenseQA, whose prompts are hundreds of tokens and whose choices are a
few. The leading tokens every context of a batch shares (a task's few-shot header) run once
(eval/prefix.py); the rests are left-padded with explicit positions, and the second pass
attends to the cache through the same attention mask, so every choice sees exactly its context.

Tokens: the context and each context+choice string are encoded whole. The choice's tokens are
what follows the longest prefix that all of them share with the encoded context (normally the
whole context; a tokenizer that merges across the boundary moves it a little to the left), so
every choice is scored on the same conditioning tokens, and nothing of the choice text is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eval.model import Batcher, LoadedModel, common_prefix, truncate_left
from eval.prefix import layout, prefix_cache


@dataclass(frozen=True)
class ChoiceRequest:
    """One question: the shared context tokens and, per choice, the tokens to score after it."""

    context: list[int]
    continuations: list[list[int]]
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.context) + max(len(c) for c in self.continuations)


def build_requests(
    loaded: LoadedModel, contexts: Sequence[str], choices: Sequence[Sequence[str]]
) -> list[ChoiceRequest]:
    """Per question: tokenize its context and each choice after it (all texts in one tokenizer call)."""
    texts = [
        text for context, options in zip(contexts, choices, strict=True)
        for text in (context, *(context + option for option in options))
    ]  # fmt: skip
    encoded = loaded.encode(texts)
    requests, start = [], 0
    for options in choices:
        end = start + 1 + len(options)
        requests.append(_request(loaded, encoded[start], encoded[start + 1 : end]))
        start = end
    return requests


def _request(loaded: LoadedModel, context_ids: list[int], wholes: list[list[int]]) -> ChoiceRequest:
    """The choices' tokens after what they share with the context; the context cut from the left to fit ``max_length``."""
    shared = min(common_prefix(context_ids, whole) for whole in wholes)
    continuations = [whole[shared:] for whole in wholes]
    if shared == 0:
        # Nothing in common (no BOS, and the first token already differs): condition every
        # choice on a lone start token, so each scores the same string plus its own choice.
        start = loaded.bos_id if loaded.bos_id is not None else loaded.stop_ids()[0]
        context_ids, shared = [start], 1
    longest = max(len(c) for c in continuations)
    kept, truncated = truncate_left(
        context_ids[:shared], max(loaded.max_length - longest, 2), loaded.bos_id
    )
    return ChoiceRequest(kept, continuations, truncated)


@torch.inference_mode()
def _score_batch(loaded: LoadedModel, requests: Sequence[ChoiceRequest]) -> list[list[float]]:
    model, device, pad = loaded.model, loaded.device, loaded.pad_id
    batch = layout([r.context for r in requests], pad, loaded.full_attention)
    lengths, mask = batch.lengths, batch.full_mask
    out = model(
        input_ids=batch.ids.to(device),
        attention_mask=mask.to(device),
        position_ids=batch.positions.to(device),
        past_key_values=prefix_cache(loaded, batch),
        use_cache=True,
        logits_to_keep=1,
    )
    first_logprobs = out.logits[:, -1].float().log_softmax(-1)  # predicts each choice's first token

    owners = [q for q, r in enumerate(requests) for _ in r.continuations]
    continuations = [c for r in requests for c in r.continuations]
    cache = out.past_key_values
    cache.reorder_cache(torch.tensor(owners, device=device))
    longest = max(len(c) for c in continuations)
    tail = torch.full((len(continuations), longest), pad, dtype=torch.long)
    tail_mask = torch.zeros((len(continuations), longest), dtype=torch.long)
    for row, tokens in enumerate(continuations):
        tail[row, : len(tokens)] = torch.tensor(tokens)
        tail_mask[row, : len(tokens)] = 1
    owner_index = torch.tensor(owners)
    tail_positions = lengths[owner_index][:, None] + torch.arange(longest)[None, :]
    if longest > 1:
        # Every tail token but the last goes in; position t predicts token t + 1.
        logits = model(
            input_ids=tail[:, :-1].to(device),
            attention_mask=torch.cat([mask[owner_index], tail_mask[:, :-1]], dim=1).to(device),
            position_ids=tail_positions[:, :-1].to(device),
            past_key_values=cache,
            use_cache=True,
        ).logits
        later = logits.float().log_softmax(-1).gather(-1, tail[:, 1:].to(device)[..., None])
        later = (later[..., 0] * tail_mask[:, 1:].to(device)).sum(-1)
    else:
        later = torch.zeros(len(continuations), device=device)
    first = first_logprobs[owner_index.to(device), tail[:, 0].to(device)]
    scores = (first + later).tolist()
    grouped, start = [], 0
    for request in requests:
        grouped.append(scores[start : start + len(request.continuations)])
        start += len(request.continuations)
    return grouped


def score_choices(
    loaded: LoadedModel, requests: Sequence[ChoiceRequest], batcher: Batcher, done=lambda n: None
) -> list[list[float]]:
    """Sum of log-probabilities (nats) of each choice's tokens, per request, in the order given."""
    order = sorted(range(len(requests)), key=lambda i: -requests[i].length)
    scored = batcher.run(
        [requests[i] for i in order], lambda chunk: _score_batch(loaded, chunk), done
    )
    results: list[list[float]] = [[] for _ in requests]
    for position, index in enumerate(order):
        results[index] = scored[position]
    return results
