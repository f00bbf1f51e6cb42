"""The tokenizer's training text: a weighted, budgeted, reproducible sample of data_prep documents.

Documents are visited file by file in an order fixed by the seed, so a sample never needs the
whole corpus in memory and stops reading once every source's share of the character budget
is filled. A small hash-chosen share of documents is held out for the report instead.
Each document becomes lines split after sentence ends (。！？ and newlines), and a line that
is still longer than SentencePiece's ``max_sentence_length`` (bytes) is cut at character
boundaries, so the trainer never drops a line.

A record that is not a document (invalid UTF-8, not JSON, not an object, no text, a text that
is not a string, is empty, or holds an unpaired surrogate escape) is left out and counted by
reason, with where the first of each reason is; a truncated or corrupt file keeps the records
read before the damage and counts ``corrupt_file``. The run goes on with the rest, as
``kinoe data`` does with its input. ``kinoe tokenizer encode`` reads its documents with the
same ``document_files`` and ``read_documents`` (``tokenizer.encode.DocumentReader``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import KinoeError
from common.progress import Progress
from tokenizer.config import SampleConfig

ALL_SOURCES = "*"
_SENTENCE_END = re.compile(r"(?<=[。！？!?])|\n")


# Parquet columns the sample needs; encode reads every column (its metadata drives rehydration).
SAMPLE_COLUMNS = ("id", "text", "source")
# A \uD800-\uDFFF escape in a JSON line; only then can its text hold an unpaired surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Rejections:
    """Records left out, by reason, with where the first of each reason is ("path:line")."""

    rejected: dict[str, int] = field(default_factory=dict)
    first_rejected: dict[str, str] = field(default_factory=dict)

    def reject(self, reason: str, where: str) -> None:
        """Count a record left out for ``reason``; remember the first ``where``."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.first_rejected.setdefault(reason, where)


@dataclass
class SampleStats(Rejections):
    """What went into the sample, per source (characters, lines, documents) and what was held out."""

    characters: dict[str, int] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)
    held_out: dict[str, int] = field(default_factory=dict)
    budgets: dict[str, int] = field(default_factory=dict)
    split_long_lines: int = 0

    def shortfalls(self) -> dict[str, int]:
        """Characters each budget fell short by because the corpus had no more."""
        taken = (
            {ALL_SOURCES: sum(self.characters.values())}
            if ALL_SOURCES in self.budgets
            else self.characters
        )
        return {
            pool: budget - taken.get(pool, 0)
            for pool, budget in self.budgets.items()
            if taken.get(pool, 0) < budget
        }


def document_files(folder: Path, setting: str = "sample.documents") -> list[Path]:
    """The document shards in a data_prep output folder (named by ``setting``), sorted."""
    files = sorted(
        p for p in Path(folder).rglob("*") if p.name.endswith((".jsonl.gz", ".jsonl", ".parquet"))
    )
    if not files:
        raise KinoeError(
            f"tokenizer: no documents (*.jsonl.gz, *.jsonl, *.parquet) under {folder}; "
            f"point {setting} at a data_prep run's documents/ folder"
        )
    return files


def read_documents(
    path: Path, stats: Rejections, parquet_columns: tuple[str, ...] | None = SAMPLE_COLUMNS
) -> Iterator[dict]:
    """Records of one shard in the documents contract (id, text, source, metadata) whose text is a
    non-empty string; every other record is counted in ``stats.rejected`` instead. A Parquet
    shard is read in ``parquet_columns`` only (None: every column)."""
    if path.name.endswith(".parquet"):
        yield from _parquet_documents(path, stats, parquet_columns)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                record, reason = _parse_document(raw)
                if reason is None:
                    yield record
                else:
                    stats.reject(reason, f"{path}:{number}")
    except (OSError, EOFError, zlib.error) as error:
        # A truncated or corrupt .gz: the records before the damage are kept, the rest counted.
        stats.reject("corrupt_file", f"{path}:{number + 1} ({error})")


def _parse_document(raw: bytes) -> tuple[dict, str | None]:
    """The record on one line and None, or an empty dict and why the line is not a document."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return {}, "invalid_utf8"
    if not line.strip():
        return {}, "blank_line"
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting ([[[[...)
        return {}, "malformed_json"
    problem = _document_problem(record)
    # json accepts "\ud800" alone, but such a text is not Unicode: SentencePiece refuses it
    # (TypeError) and it cannot be written as UTF-8. Searched only when the line has the escape.
    if problem is None and _SURROGATE_ESCAPE.search(raw) and _SURROGATE.search(record["text"]):
        problem = "unpaired_surrogate"
    return record, problem


def _document_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "not_an_object"
    if "text" not in record:
        return "missing_text_field"
    if not isinstance(record["text"], str):
        return "text_not_a_string"
    if not record["text"]:
        return "empty_text"
    return None


def _parquet_documents(
    path: Path, stats: Rejections, columns: tuple[str, ...] | None
) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(columns=list(columns) if columns else None):
            for record in batch.to_pylist():
                row += 1
                reason = _document_problem(record)
                if reason is None:
                    yield record
                else:
                    stats.reject(reason, f"{path}:row {row}")
    except (OSError, pa.ArrowException) as error:
        stats.reject("corrupt_file", f"{path}:row {row + 1} ({error})")


def training_lines(text: str, max_bytes: int) -> Iterator[str]:
    """Lines of ``text`` split after sentence ends, each at most ``max_bytes`` UTF-8 bytes."""
    for piece in _sentences(text):
        line = piece.strip()
        if not line:
            continue
        if len(line.encode("utf-8")) <= max_bytes:
            yield line
            continue
        # Cut at characters: a UTF-8 Japanese character is 3 bytes, so max_bytes // 4 characters
        # always fits, whatever the mix.
        step = max(1, max_bytes // 4)
        for start in range(0, len(line), step):
            yield line[start : start + step]


def _sentences(text: str) -> Iterator[str]:
    """``_SENTENCE_END.split(text)``, lazily: the sampler stops early in a 50 MB document."""
    start = 0
    for end in _SENTENCE_END.finditer(text):
        yield text[start : end.start()]
        start = end.end()
    yield text[start:]


def is_held_out(doc_id: str, seed: int, fraction: float) -> bool:
    """A stable, seed-dependent choice of held-out documents by id."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def write_sample(
    config: SampleConfig, max_bytes: int, text_path: Path, held_out_path: Path
) -> SampleStats:
    """Write the training lines and the held-out documents; returns what the sample holds."""
    files = document_files(config.documents)
    random.Random(config.seed).shuffle(files)
    stats = SampleStats()
    # Without weights every source shares one budget, in the order the documents come.
    weights = dict(config.weights) or {ALL_SOURCES: 1.0}
    total = sum(weights.values())
    stats.budgets = {s: int(config.character_budget * w / total) for s, w in weights.items()}
    remaining = dict(stats.budgets)
    held = 0
    progress = Progress(
        "tokenizer sample", total=config.character_budget, unit="chars", log_every_s=30
    )
    with (
        text_path.open("w", encoding="utf-8") as lines_out,
        held_out_path.open("w", encoding="utf-8") as held_out,
    ):
        for path in files:
            for record in read_documents(path, stats):
                source = str(record.get("source"))
                pool = ALL_SOURCES if ALL_SOURCES in remaining else source
                if pool not in remaining:
                    continue
                text = record["text"]
                if held < config.held_out_max_documents and is_held_out(
                    str(record.get("id")), config.seed, config.held_out_fraction
                ):
                    held_out.write(
                        json.dumps(
                            {"id": record.get("id"), "source": source, "text": text},
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
                    stats.held_out[source] = stats.held_out.get(source, 0) + 1
                    held += 1
                    continue
                if remaining[pool] <= 0:
                    continue
                for line in training_lines(text, max_bytes):
                    lines_out.write(line + "\n")
                    stats.lines[source] = stats.lines.get(source, 0) + 1
                    stats.characters[source] = stats.characters.get(source, 0) + len(line)
                    remaining[pool] -= len(line)
                    progress.update(len(line))
                    if remaining[pool] <= 0:
                        break  # one huge document must not blow the budget (and the trainer's memory)
                stats.documents[source] = stats.documents.get(source, 0) + 1
            if (
                all(value <= 0 for value in remaining.values())
                and held >= config.held_out_max_documents
            ):
                break
    progress.close()
    if not any(stats.characters.values()):
        hint = "check sample.weights names against the documents' source field"
        if stats.rejected:
            left_out = ", ".join(f"{reason} {count}" for reason, count in stats.rejected.items())
            first = next(iter(stats.first_rejected.values()))
            hint = f"records left out: {left_out}, the first at {first}; {hint}, and that the files are data_prep documents (UTF-8 JSON lines)"
        raise KinoeError(
            f"tokenizer: no text for sources {', '.join(weights)} under {config.documents}; {hint}"
        )
    return stats
