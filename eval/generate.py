"""Batched generation: left-padded prompts, greedy by default, stopping at the model's end tokens.

The leading tokens all prompts of a batch share (a task's few-shot header) run once and their
cache serves every row (eval/prefix.py); the rests are left-padded after them.

JGLUE generation is greedy with llm-jp-eval's per-dataset output length. MT-Bench samples with
its category's temperature (FastChat's rule: 0 means greedy), seeded once per batch, with
transformers' default top-k of 50 and top-p of 1 as FastChat's generate call got them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eval.model import Batcher, LoadedModel, truncate_left
from eval.prefix import layout, prefix_cache


@dataclass(frozen=True)
class Decoding:
    """How tokens are chosen; recorded in every report."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 50
    top_p: float = 1.0
    # A row stops once its text holds one of these (the end tokens stop it anyway).
    stop_strings: tuple[str, ...] = ()

    @property
    def do_sample(self) -> bool:
        return self.temperature > 1e-4

    def summary(self) -> dict:
        stops = {"stop_strings": list(self.stop_strings)} if self.stop_strings else {}
        if not self.do_sample:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens, **stops}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            **stops,
        }


def prompt_ids(
    loaded: LoadedModel, texts: Sequence[str], max_new_tokens: int
) -> list[tuple[list[int], bool]]:
    """Per prompt: its token ids, the start cut so that prompt and answer fit ``max_length``; and whether it was cut."""
    keep = max(loaded.max_length - max_new_tokens, 1)
    return [truncate_left(ids, keep, loaded.bos_id) for ids in loaded.encode(texts)]


class GeneratedText:
    """Stops a row once the text it generated holds a stop string; the prompt is never looked at.

    (transformers' own ``stop_strings`` match the sequence's end, prompt included, so a prompt
    ending in a newline would stop at a first generated newline.) A stop string not seen before
    the latest token ends within it, so only the last ``TAIL`` generated tokens are decoded per
    step.
    """

    TAIL = 8

    def __init__(self, tokenizer: Any, start: int, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.start = start
        self.stop_strings = tuple(stop_strings)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        tail = input_ids[:, max(self.start, input_ids.shape[1] - self.TAIL) :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        done = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_batch(
    loaded: LoadedModel, prompts: Sequence[list[int]], decoding: Decoding, seed: int
) -> list[str]:
    """One batch: the text generated after each prompt, special tokens removed."""
    from transformers import GenerationConfig, StoppingCriteriaList

    batch = layout(prompts, loaded.pad_id, loaded.full_attention)
    # The prefix's ids lead every row; generate runs only what its cache does not hold yet.
    prefix = torch.tensor([batch.prefix], dtype=torch.long).expand(len(prompts), -1)
    ids = torch.cat([prefix, batch.ids], dim=1)
    width = ids.shape[1]
    settings = {
        "max_new_tokens": decoding.max_new_tokens,
        "do_sample": decoding.do_sample,
        "eos_token_id": loaded.stop_ids(),
        "pad_token_id": loaded.pad_id,
    }
    if decoding.do_sample:
        settings.update(
            temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p
        )
        torch.manual_seed(seed)
    stops = {}
    if decoding.stop_strings:
        criterion = GeneratedText(loaded.tokenizer, width, decoding.stop_strings)
        stops["stopping_criteria"] = StoppingCriteriaList([criterion])
    output = loaded.model.generate(
        input_ids=ids.to(loaded.device),
        attention_mask=batch.full_mask.to(loaded.device),
        past_key_values=prefix_cache(loaded, batch),
        generation_config=GenerationConfig(**settings),
        **stops,
    )
    return loaded.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)


def generate(
    loaded: LoadedModel,
    prompts: Sequence[list[int]],
    decoding: Decoding,
    batcher: Batcher,
    done=lambda n: None,
    seed: int = 0,
) -> list[str]:
    """The generated text after each prompt (special tokens removed), in the order given."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = batcher.run(
        [prompts[i] for i in order],
        lambda chunk: generate_batch(loaded, chunk, decoding, seed),
        done,
    )
    results = [""] * len(prompts)
    for position, index in enumerate(order):
        results[index] = texts[position]
    return results
