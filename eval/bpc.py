"""Bits per character: how well a model predicts held-out Japanese text, comparable across tokenizers.

Cross-entropy per token depends on how much text a token holds, so models with different
tokenizers cannot be compared by it; the total information in bits divided by the number of
characters (Unicode code points of the original text) can. Each document is encoded without
special tokens and preceded by BOS (or EOS when there is none), so every token of the text is
predicted, the first one from that start token. Documents longer than ``max_length`` are read
in overlapping windows that advance by ``stride``; each token is scored once, with at least
``max_length - stride`` tokens of context once the document is long enough.

A tokenizer that normalises text (NFKC, whitespace) encodes a slightly different string from
the one whose characters are counted; ``round_trip_mismatches`` counts such documents.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import KinoeError
from eval.model import Batcher, LoadedModel


def read_texts(paths: Sequence[Path], max_documents: int | None) -> tuple[list[str], int]:
    """Non-empty documents from .jsonl/.jsonl.gz (``text`` field) or .txt files; and the count of
    what could not be read: lines (not UTF-8, not JSON, no text), .txt files that are not UTF-8,
    and damaged .gz files (whose documents before the damage are kept)."""
    texts: list[str] = []
    malformed = 0
    for path in map(Path, paths):
        documents: list[str] = []
        if path.suffix == ".txt":
            try:
                documents.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                malformed += 1
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.suffix == ".gz" else open
            try:
                with opener(path, "rb") as handle:
                    for raw in handle:
                        text = _document_text(raw)
                        if text is None:
                            malformed += 1
                        else:
                            documents.append(text)
            except (OSError, EOFError, zlib.error):
                malformed += 1  # truncated or corrupt: the documents before the damage count
        else:
            raise KinoeError(f"bpc.texts: {path} is not .txt, .jsonl or .jsonl.gz")
        texts.extend(text for text in documents if text.strip())
        if max_documents is not None and len(texts) >= max_documents:
            return texts[:max_documents], malformed
    return texts, malformed


def _document_text(raw: bytes) -> str | None:
    """The ``text`` of a JSON line, or None when the line is not UTF-8 JSON with a string text.

    Strict UTF-8: replacing undecodable bytes would score mojibake (a Shift_JIS file) as text.
    """
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    text = record.get("text") if isinstance(record, dict) else None
    return text if isinstance(text, str) else None


def windows(count: int, width: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) for a document of ``count`` tokens; tokens 1..count-1 each scored once."""
    stride = max(1, min(stride, width - 1))
    spans, begin, scored_to = [], 0, 1
    while scored_to < count:
        end = min(begin + width, count)
        spans.append((begin, end, scored_to))
        scored_to = end
        begin += stride
    return spans


@torch.inference_mode()
def _window_bits(loaded: LoadedModel, rows: Sequence[tuple[list[int], int]]) -> list[float]:
    """Negative log-likelihood in bits of each row's tokens from ``first`` on."""
    width = max(len(tokens) for tokens, _ in rows)
    ids = torch.full((len(rows), width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (tokens, _) in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    logits = loaded.model(
        input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device)
    ).logits
    bits = []
    for row, (tokens, first) in enumerate(rows):
        # One row at a time in float32: a whole batch of vocabulary-wide log-softmaxes is large.
        logprobs = logits[row, first - 1 : len(tokens) - 1].float().log_softmax(-1)
        targets = ids[row, first : len(tokens)].to(loaded.device)
        bits.append(-logprobs.gather(-1, targets[:, None]).sum().item() / math.log(2))
    return bits


@dataclass
class Windows:
    """The documents cut into model-sized rows, with what the score divides by."""

    rows: list[tuple[list[int], int]]  # (tokens, index of the first token scored)
    documents: int
    characters: int
    tokens: int
    width: int
    stride: int
    round_trip_mismatches: int


def prepare_windows(loaded: LoadedModel, texts: Sequence[str], stride: int | None) -> Windows:
    """Encode ``texts`` (start token first) and cut them into windows of ``max_length`` tokens."""
    start = loaded.bos_id if loaded.bos_id is not None else loaded.stop_ids()[0]
    width = loaded.max_length
    stride = max(1, min(stride or width // 2, width - 1))
    rows: list[tuple[list[int], int]] = []
    tokens = mismatches = 0
    for text in texts:
        encoded = list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
        mismatches += loaded.tokenizer.decode(encoded) != text
        ids = [start, *encoded]
        tokens += len(encoded)
        for begin, end, first in windows(len(ids), width, stride):
            rows.append((ids[begin:end], first - begin))
    characters = sum(len(text) for text in texts)
    return Windows(rows, len(texts), characters, tokens, width, stride, mismatches)


def bits_per_character(
    loaded: LoadedModel, prepared: Windows, batcher: Batcher, done=lambda n: None
) -> dict:
    """Bits per character over the prepared windows, with the counts behind it; ``done(n)`` after n windows."""
    rows = prepared.rows
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    total_bits = sum(
        batcher.run(order, lambda chunk: _window_bits(loaded, [rows[i] for i in chunk]), done)
    )
    characters, tokens = prepared.characters, prepared.tokens
    return {
        "bpc": total_bits / characters if characters else float("nan"),
        "bits_per_token": total_bits / tokens if tokens else float("nan"),
        "characters_per_token": characters / tokens if tokens else float("nan"),
        "documents": prepared.documents,
        "characters": characters,
        "tokens": tokens,
        "windows": len(rows),
        "window_tokens": prepared.width,
        "stride": prepared.stride,
        "round_trip_mismatches": prepared.round_trip_mismatches,
    }
