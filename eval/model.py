"""Loading a Hugging Face causal LM for evaluation, and the batching every scorer shares.

The model must sit entirely on the configured device (``eval/placement.py``); batches run
longest first, so with ``batch_size: auto`` the first batch is the largest one and an
out-of-memory there halves the batch size before any result depends on it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from common.errors import KinoeError
from eval.config import EvalConfig
from eval.placement import Placement, check_placement

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class LoadedModel:
    """A model ready to score: itself, its tokenizer, the device its inputs go to, and its context length."""

    model: Any
    tokenizer: Any
    device: torch.device
    max_length: int
    placement: Placement
    info: dict[str, Any]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text with the tokenizer's special tokens (BOS for kinoe's).

        One call for all of them: a fast tokenizer encodes a list on every core. With a fast
        tokenizer the Rust tokenizer is called directly: transformers' wrapper builds a Python
        object per text (a quarter of the time for JSeM's 63,000 prompt strings on 2 cores, and
        most of it with more cores) and does nothing else for plain text. Should a tokenizer's
        wrapper change the ids after all, the first text shows it and the wrapper is used.
        """
        if not texts:
            return []
        texts = list(texts)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self._encode_wrapped(texts)
        encoded = [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
        if encoded[0] != self._encode_wrapped(texts[:1])[0]:
            return self._encode_wrapped(texts)
        return encoded

    def _encode_wrapped(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def encode_answers(self, answers: list[str]) -> list[list[int]]:
        """The ids each answer takes where a prompt's answer is generated: after ``### 応答:\\n``."""
        cue = "### 応答:\n"
        before = self.tokenizer(cue, add_special_tokens=False)["input_ids"]
        encoded = self.tokenizer([cue + a for a in answers], add_special_tokens=False)["input_ids"]
        return [_after_shared_prefix(before, after) for after in encoded]

    @property
    def full_attention(self) -> bool:
        """Whether every token attends to all before it within ``max_length`` (no shorter sliding window)."""
        window = getattr(self.model.config, "sliding_window", None)
        return window is None or window >= self.max_length

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return 0 if pad is None else int(pad)

    def stop_ids(self) -> list[int]:
        """End-of-sequence ids from the model's generation config (kinoe's: ``</s>`` and ``<|im_end|>``)."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [int(i) for i in ids if i is not None]


def load_model(config: EvalConfig, logger: logging.Logger) -> LoadedModel:
    """Load ``config.model`` on ``config.device`` in ``config.dtype`` and check where every tensor went."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.model is None:
        raise KinoeError("model is not set; pass model=<Hugging Face model directory>")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise KinoeError(
            f"device is {config.device} but torch {torch.__version__} sees no GPU; "
            "set device=cpu to evaluate on CPU"
        )
    if config.device_map == "auto" and config.device == "cpu":
        raise KinoeError(
            "device_map=auto spreads a model over GPUs; with device=cpu use device_map=single"
        )
    path = Path(config.model)
    tokenizer_path = Path(config.tokenizer) if config.tokenizer else path
    device_map: Any = {"": config.device} if config.device_map == "single" else "auto"
    from huggingface_hub.errors import StrictDataclassError

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, config.dtype), device_map=device_map
        )
    except StrictDataclassError as error:
        # transformers checks config.json's field types and raises a multi-line error of its own.
        last = str(error).strip().splitlines()[-1].strip()
        raise KinoeError(f"{path / 'config.json'}: {last}; fix that field") from None
    except (OSError, ValueError, TypeError) as error:
        first = " ".join(str(error).split())[:200] or type(error).__name__
        raise KinoeError(f"cannot load {path} as a causal LM with its tokenizer: {first}") from None
    model.eval()
    placement = check_placement(model, config.device, config.allow_offload, logger)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    max_length = config.max_length or context
    if max_length > context:
        logger.warning("max_length %s is beyond the model's %s positions", max_length, context)
    info = {
        "path": str(path),
        "tokenizer": str(tokenizer_path),
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": config.dtype,
        "context_length": context,
        "manifest_sha256": _sha256_if_file(path / "manifest.json"),
        "config_sha256": _sha256_if_file(path / "config.json"),
    }
    logger.info(
        "model %s: %s, %s parameters, %s on %s, context %s",
        path,
        info["architecture"],
        f"{info['parameters']:,}",
        config.dtype,
        config.device,
        context,
    )
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":
        device = torch.device(config.device)
    return LoadedModel(model, tokenizer, device, max_length, placement, info)


def _sha256_if_file(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def truncate_left(ids: list[int], keep: int, bos_id: int | None) -> tuple[list[int], bool]:
    """The last ``keep`` tokens of ``ids`` (a leading BOS stays first); and whether any were dropped."""
    if len(ids) <= keep:
        return ids, False
    if bos_id is not None and ids and ids[0] == bos_id:
        return [bos_id, *ids[len(ids) - keep + 1 :]], True
    return ids[len(ids) - keep :], True


class Batcher:
    """Runs work in batches of ``size``; with ``auto``, halves the size when the GPU runs out of memory."""

    def __init__(self, batch_size: int | str, max_batch_size: int, logger: logging.Logger) -> None:
        self.auto = batch_size == "auto"
        self.size = max_batch_size if self.auto else int(batch_size)
        self.logger = logger

    def run(
        self,
        items: Sequence[T],
        work: Callable[[Sequence[T]], list[R]],
        done: Callable[[int], None] = lambda n: None,
    ) -> list[R]:
        """``work`` on consecutive slices of ``items``; the results in order. ``done(n)`` after each slice."""
        results: list[R] = []
        start = 0
        while start < len(items):
            chunk = items[start : start + self.size]
            try:
                results.extend(work(chunk))
            except torch.cuda.OutOfMemoryError:
                if not self.auto or self.size == 1:
                    raise KinoeError(
                        f"out of GPU memory at batch size {len(chunk)}; set a smaller batch_size "
                        "(or batch_size=auto), or a shorter max_length"
                    ) from None
                self.size = max(1, self.size // 2)
                torch.cuda.empty_cache()
                self.logger.info("out of GPU memory; batch size now %s", self.size)
                continue
            start += len(chunk)
            done(len(chunk))
        return results


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` have in common."""
    shorter = min(len(a), len(b))
    if a[:shorter] == b[:shorter]:  # the usual case (a prompt and the prompt + a choice), in C
        return shorter
    size = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        size += 1
    return size


def _after_shared_prefix(prefix: list[int], ids: list[int]) -> list[int]:
    return list(ids[common_prefix(prefix, ids) :])
