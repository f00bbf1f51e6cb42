"""Verification: our model from the source weights against the converted Hugging Face model.

Both read the same Japanese documents, tokenized by the Hugging Face directory's tokenizer
(BOS added as it adds it). Compared: every logit (max and mean absolute difference), the
next-token argmax at every position, and ``greedy_tokens`` tokens generated greedily from
each document's first ``prompt_tokens`` (ours: a forward over the growing sequence; Hugging
Face: ``generate(do_sample=False)`` with its KV cache).

Two checks:

- **exact** (always): the Hugging Face weights read in float32 against ours with the same
  weights, rounded to the dtype the directory stores, in float32 on CPU. Only float32
  arithmetic separates the two, so ``verify.exact`` is tight, and the greedy tokens must be
  identical, except where our own top two logits at the first differing step lie within
  twice ``verify.exact.max_abs`` of each other (a tie that float32 rounding may break
  either way; counted as ``near_ties``).
- **bf16** (when the directory stores bf16): the Hugging Face model run in bf16, as users run
  it, against ours in float32 with the unrounded weights. It measures what bf16 costs and
  fails only past ``verify.bf16``; the greedy agreement is recorded, not enforced (in bf16
  the first near tie sends the two generations apart, and every later token with them).

The figures go into the manifest's summary, passed or not; a failed check raises
``VerificationFailed``, which carries them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import KinoeError
from common.logs import get_logger
from convert.config import Thresholds, VerifySettings
from convert.sources import Source, inference_args, load_weights
from convert.texts import load_texts


class VerificationFailed(KinoeError):
    """Logits or generations of the converted model are off; ``summary`` holds every figure."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@dataclass
class Reference:
    """Our model's outputs on the documents: logits (T, V) each, and greedy runs."""

    logits: list[torch.Tensor]
    greedy: list[list[int]]
    greedy_logits: list[list[torch.Tensor]]  # per document, per generated step: (V,)


def stored_dtypes(hf_dir: Path) -> set[torch.dtype]:
    """The floating dtypes the weights in ``hf_dir`` are stored in (from the safetensors headers)."""
    from convert.safetensors_shards import read_sharded

    return {
        ref.dtype for ref in read_sharded(hf_dir, "model").values() if ref.dtype.is_floating_point
    }


def build_model(source: Source) -> nn.Module:
    """Our model of ``source``'s architecture with its weights, float32, on CPU, in eval mode."""
    model = source.model_family.model_type(inference_args(source.args))
    load_weights(model, source)
    return model.eval()


@torch.no_grad()
def round_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating weight of ``model`` to ``dtype`` and back, in place."""
    for tensor in model.state_dict(keep_vars=True).values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(dtype).to(tensor.dtype))


@torch.no_grad()
def reference(
    model: nn.Module,
    documents: list[list[int]],
    prompts: list[list[int]],
    steps: int,
    stops: set[int],
) -> Reference:
    """Our logits on each document and our greedy continuation of each prompt."""
    logits = [model(torch.tensor([ids]))[0].float() for ids in documents]
    greedy, greedy_logits = [], []
    for prompt in prompts:
        tokens, step_logits = list(prompt), []
        for _ in range(steps):
            last = model(torch.tensor([tokens]))[0, -1].float()
            step_logits.append(last)
            tokens.append(int(last.argmax()))
            if tokens[-1] in stops:
                break
        greedy.append(tokens[len(prompt) :])
        greedy_logits.append(step_logits)
    return Reference(logits, greedy, greedy_logits)


@contextmanager
def hf_model(hf_dir: Path, dtype: torch.dtype) -> Iterator[Any]:
    """The Hugging Face model in ``hf_dir`` loaded by transformers in ``dtype`` on CPU."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=dtype, attn_implementation="eager"
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise VerificationFailed(
            f"verification: transformers cannot load {hf_dir} ({str(error).splitlines()[0]})",
            {"passed": False, "load_error": str(error).splitlines()[0]},
        ) from None
    try:
        yield model.eval()
    finally:
        del model


@torch.no_grad()
def compare(
    model: Any,
    ours: Reference,
    documents: list[list[int]],
    prompts: list[list[int]],
    steps: int,
    tie: float,
) -> dict[str, Any]:
    """The figures of the Hugging Face ``model`` against our ``ours`` on the same documents."""
    max_abs, abs_sum, count, agree, positions, non_finite = 0.0, 0.0, 0, 0, 0, 0
    for ids, expected in zip(documents, ours.logits, strict=True):
        got = model(torch.tensor([ids])).logits[0].float()
        non_finite += int((~torch.isfinite(got)).sum())
        difference = (got - expected).abs().nan_to_num(nan=float("inf"))
        max_abs = max(max_abs, float(difference.max()))
        abs_sum += float(difference.sum(dtype=torch.float64))
        count += difference.numel()
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        positions += len(ids)
    identical = near_ties = matching_tokens = 0
    for prompt, expected, step_logits in zip(prompts, ours.greedy, ours.greedy_logits, strict=True):
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=steps,
            do_sample=False,
        )
        got = out[0, len(prompt) :].tolist()
        if got == expected:
            identical += 1
            matching_tokens += len(expected)
            continue
        first = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        matching_tokens += first
        if first < len(got) and first < len(expected):
            margin = float(step_logits[first][expected[first]] - step_logits[first][got[first]])
            near_ties += margin <= tie
    return {
        "documents": len(documents),
        "positions": positions,
        "max_abs": max_abs,
        "mean_abs": abs_sum / max(count, 1),
        "argmax_agreement": agree / max(positions, 1),
        "non_finite_logits": non_finite,
        "greedy": {
            "prompts": len(prompts),
            "tokens": steps,
            "identical": identical,
            "near_ties": near_ties,
            "token_agreement": matching_tokens / max(sum(len(g) for g in ours.greedy), 1),
        },
    }


def failures(figures: dict[str, Any], limits: Thresholds, greedy_exact: bool) -> list[str]:
    """Each figure past its limit, as ``name value > limit``."""
    problems = []
    if figures["non_finite_logits"]:
        problems.append(f"{figures['non_finite_logits']} logits are NaN or infinite")
    if figures["max_abs"] > limits.max_abs:
        problems.append(f"max |logit difference| {figures['max_abs']:.3g} > {limits.max_abs:g}")
    if figures["mean_abs"] > limits.mean_abs:
        problems.append(f"mean |logit difference| {figures['mean_abs']:.3g} > {limits.mean_abs:g}")
    if figures["argmax_agreement"] < limits.argmax_agreement:
        problems.append(
            f"next-token argmax agreement {figures['argmax_agreement']:.4f} < {limits.argmax_agreement:g}"
        )
    greedy = figures["greedy"]
    if greedy_exact and greedy["identical"] + greedy["near_ties"] < greedy["prompts"]:
        differing = greedy["prompts"] - greedy["identical"] - greedy["near_ties"]
        problems.append(f"greedy generation differs on {differing} of {greedy['prompts']} prompts")
    return problems


def encode(
    tokenizer_dir: Path, settings: VerifySettings, max_seq_len: int
) -> tuple[list, list, int]:
    """Token ids of the documents, of the greedy prompts, and how many tokens to generate."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = load_texts(settings.text, settings.documents)
    length = min(settings.max_tokens, max_seq_len)
    documents = [ids[:length] for ids in tokenizer(texts).input_ids if len(ids) >= 2]
    if not documents:
        raise KinoeError(f"verify.text: no document of {settings.text} has two tokens or more")
    steps = min(settings.greedy_tokens, max_seq_len - 1)
    prompt_length = min(settings.prompt_tokens, max_seq_len - steps)
    prompts = [ids[:prompt_length] for ids in documents] if steps else []
    return documents, prompts, steps


def verify(
    source: Source, hf_dir: Path, tokenizer_dir: Path, settings: VerifySettings
) -> dict[str, Any]:
    """Compare our model of ``source`` with the Hugging Face model in ``hf_dir``; the figures.

    Raises ``VerificationFailed`` (with the figures) when a check is past its thresholds.
    """
    from transformers import GenerationConfig

    logger = get_logger("convert")
    started = time.monotonic()
    stored = stored_dtypes(hf_dir)
    # The dtype users run the model in: the narrowest one stored.
    narrowest = min(stored, key=lambda dtype: dtype.itemsize, default=torch.float32)
    max_seq_len = source.args.max_seq_len
    documents, prompts, steps = encode(tokenizer_dir, settings, max_seq_len)
    try:
        stop_ids = GenerationConfig.from_pretrained(str(hf_dir)).eos_token_id
    except OSError:
        stop_ids = None
    stops = set(
        stop_ids if isinstance(stop_ids, list) else [stop_ids] if stop_ids is not None else []
    )

    model = build_model(source)
    unrounded = (
        reference(model, documents, prompts, steps, stops) if narrowest != torch.float32 else None
    )
    if len(stored) == 1:
        # to-hf writes every tensor in one dtype: round ours the same way. A directory of
        # mixed dtypes (some models keep the router in fp32) is a from-hf source, whose
        # weights are already the stored values.
        round_weights(model, narrowest)
    exact_reference = reference(model, documents, prompts, steps, stops)
    del model

    summary: dict[str, Any] = {
        "stored_dtype": str(narrowest).removeprefix("torch."),
        "text": str(settings.text or "bundled passages"),
    }
    problems = []
    with hf_model(hf_dir, torch.float32) as model:
        figures = compare(
            model, exact_reference, documents, prompts, steps, 2 * settings.exact.max_abs
        )
    figures["thresholds"] = settings.exact.model_dump()
    summary["exact"] = figures
    problems += [f"exact: {p}" for p in failures(figures, settings.exact, greedy_exact=True)]
    if unrounded is not None:
        with hf_model(hf_dir, narrowest) as model:
            figures = compare(
                model, unrounded, documents, prompts, steps, 2 * settings.bf16.max_abs
            )
        figures["thresholds"] = settings.bf16.model_dump()
        summary["bf16"] = figures
        problems += [f"bf16: {p}" for p in failures(figures, settings.bf16, greedy_exact=False)]
    summary["passed"] = not problems
    summary["seconds"] = round(time.monotonic() - started, 1)
    logger.info("verification: %s", json.dumps(_brief(summary), ensure_ascii=False))
    if problems:
        raise VerificationFailed(
            f"verification of {hf_dir} against {source.origin} failed: {'; '.join(problems)}; "
            "the converted model does not compute what the source does (figures in the manifest)",
            summary,
        )
    return summary


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, for the log line."""
    brief: dict[str, Any] = {"passed": summary["passed"]}
    for check in ("exact", "bf16"):
        if check in summary:
            figures = summary[check]
            brief[check] = {
                "max_abs": float(f"{figures['max_abs']:.3g}"),
                "mean_abs": float(f"{figures['mean_abs']:.3g}"),
                "argmax": round(figures["argmax_agreement"], 4),
                "greedy_identical": f"{figures['greedy']['identical']}/{figures['greedy']['prompts']}",
            }
    return brief
