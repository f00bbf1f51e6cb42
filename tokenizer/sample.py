"""The tokenizer's training text: a weighted, budgeted, reproducible sample of data_prep documents.

Documents are visited file by file in an order fixed by the seed, so a sample never needs the
whole corpus in memory and stops reading once every source's share of the character budget
is filled. A small hash-chosen share of documents is held out for the report instead.
Each document becomes lines split after sentence ends (。！？ and newlines), and a line that
is still longer than SentencePiece's ``max_sentence_length`` (bytes) is cut at character
boundaries, so the trainer never drops a line.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import KinoeError
from common.progress import Progress
from tokenizer.config import SampleConfig

ALL_SOURCES = "*"
_SENTENCE_END = re.compile(r"(?<=[。！？!?])|\n")


@dataclass
class SampleStats:
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


def document_files(folder: Path) -> list[Path]:
    """The document shards in a data_prep output folder, sorted."""
    files = sorted(
        p for p in Path(folder).rglob("*") if p.name.endswith((".jsonl.gz", ".jsonl", ".parquet"))
    )
    if not files:
        raise KinoeError(
            f"tokenizer: no documents (*.jsonl.gz, *.jsonl, *.parquet) under {folder}; "
            "point sample.documents at a data_prep run's documents/ folder"
        )
    return files


def read_documents(path: Path) -> Iterator[dict]:
    """Records of one shard in the documents contract: id, text, source, metadata."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=["id", "text", "source"]):
            yield from batch.to_pylist()
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            try:
                yield json.loads(line)
            except ValueError:
                raise KinoeError(
                    f"tokenizer: {path} line {number + 1} is not JSON; these must be data_prep documents"
                ) from None


def training_lines(text: str, max_bytes: int) -> Iterator[str]:
    """Lines of ``text`` split after sentence ends, each at most ``max_bytes`` UTF-8 bytes."""
    for piece in _SENTENCE_END.split(text):
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
            for record in read_documents(path):
                source = str(record.get("source"))
                pool = ALL_SOURCES if ALL_SOURCES in remaining else source
                if pool not in remaining:
                    continue
                text = record.get("text") or ""
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
                stats.documents[source] = stats.documents.get(source, 0) + 1
            if (
                all(value <= 0 for value in remaining.values())
                and held >= config.held_out_max_documents
            ):
                break
    progress.close()
    if not any(stats.characters.values()):
        raise KinoeError(
            f"tokenizer: no text for sources {', '.join(weights)} under {config.documents}; "
            "check sample.weights names against the documents' source field"
        )
    return stats
