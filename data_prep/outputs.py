"""Writers of kept and removed documents, and the per-task tallies the funnel report adds up.

Every output (kept documents, each removed-by-step folder, the input count) leaves one small
tally per task: documents and characters, per source, and a histogram of document lengths.
The report sums tallies instead of rereading terabytes, and the funnel balances because the
input tally and the output tallies are counted independently.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.pipeline.writers.parquet import ParquetWriter

# Upper bounds (characters) of the length-histogram bins; the last bin is open.
LENGTH_BINS = (
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
    32768,
    65536,
    131072,
    262144,
    1048576,
)


@dataclass
class Tally:
    """Documents and characters seen, in total, per source, and by length bin."""

    documents: int = 0
    characters: int = 0
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    # Why documents were removed, by the first word of the step's reason (e.g. "invalid_utf8").
    by_reason: dict[str, int] = field(default_factory=dict)
    # The same per source, so that a source whose records are all unreadable can be named.
    reasons_by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    length_histogram: list[int] = field(default_factory=lambda: [0] * (len(LENGTH_BINS) + 1))
    # Documents by metadata.minhash_cluster_size (as a string, for JSON), where near dedup set it.
    cluster_sizes: dict[str, int] = field(default_factory=dict)

    def add(self, document: Document) -> None:
        length = len(document.text)
        self.documents += 1
        self.characters += length
        per_source = self.by_source.setdefault(
            str(document.metadata.get("source")), {"documents": 0, "characters": 0}
        )
        per_source["documents"] += 1
        per_source["characters"] += length
        self.length_histogram[bisect.bisect_left(LENGTH_BINS, length)] += 1
        cluster_size = document.metadata.get("minhash_cluster_size")
        if cluster_size is not None:
            key = str(cluster_size)
            self.cluster_sizes[key] = self.cluster_sizes.get(key, 0) + 1
        reason = document.metadata.get("filter_reason")
        if reason:
            key = str(reason).split(" ", 1)[0]
            self.by_reason[key] = self.by_reason.get(key, 0) + 1
            reasons = self.reasons_by_source.setdefault(str(document.metadata.get("source")), {})
            reasons[key] = reasons.get(key, 0) + 1

    def merge(self, other: Tally) -> Tally:
        self.documents += other.documents
        self.characters += other.characters
        for source, counts in other.by_source.items():
            mine = self.by_source.setdefault(source, {"documents": 0, "characters": 0})
            mine["documents"] += counts["documents"]
            mine["characters"] += counts["characters"]
        for reason, count in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + count
        for source, reasons in other.reasons_by_source.items():
            mine = self.reasons_by_source.setdefault(source, {})
            for reason, count in reasons.items():
                mine[reason] = mine.get(reason, 0) + count
        self.length_histogram = [
            a + b for a, b in zip(self.length_histogram, other.length_histogram, strict=True)
        ]
        for size, count in other.cluster_sizes.items():
            self.cluster_sizes[size] = self.cluster_sizes.get(size, 0) + count
        return self

    def save(self, folder: Path, rank: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{rank:05d}.json.tmp"
        temporary.write_text(json.dumps(self.__dict__))
        temporary.replace(folder / f"{rank:05d}.json")

    @classmethod
    def load_all(cls, folder: Path) -> Tally:
        """The sum of every task's tally in ``folder`` (zero if there is none)."""
        total = cls()
        for path in sorted(Path(folder).glob("*.json")):
            total.merge(cls(**json.loads(path.read_text())))
        return total


def document_record(writer: DiskWriter, document: Document) -> dict[str, Any]:
    """The documents contract: ``id``, ``text``, ``source`` and the rest under ``metadata``."""
    metadata = dict(document.metadata)
    source = metadata.pop("source", None)
    return {"id": document.id, "text": document.text, "source": source, "metadata": metadata}


def parquet_record(writer: DiskWriter, document: Document) -> dict[str, Any]:
    """The documents contract for Parquet: ``metadata`` as a JSON string.

    Metadata keys differ between documents and sources, which a Parquet struct column
    (schema fixed by the first batch) cannot hold; readers parse the string back.
    """
    record = document_record(writer, document)
    record["metadata"] = json.dumps(record["metadata"], ensure_ascii=False, default=str)
    return record


class _TallyingWriter:
    """Mixin for datatrove writers: shards named by task in the documents contract, with a
    tally of what was written saved when the task ends."""

    extension: ClassVar[str]
    record: ClassVar[Callable[[DiskWriter, Document], dict[str, Any]]]

    def __init__(
        self, folder: Path, tally_folder: Path, removed_by: str | None = None, max_file_mb: int = -1
    ):
        super().__init__(
            str(folder),
            output_filename="${rank}" + self.extension,
            adapter=self.record,
            max_file_size=max_file_mb * 2**20 if max_file_mb > 0 else -1,
        )
        self.tally_folder = Path(tally_folder)
        self.removed_by = removed_by
        self._tally = Tally()
        self._rank: int | None = None

    def write(self, document: Document, rank: int = 0, **kwargs) -> None:
        if self.removed_by is not None:
            document.metadata["removed_by"] = self.removed_by
        self._tally.add(document)
        self._rank = rank
        super().write(document, rank, **kwargs)

    def close(self) -> None:
        super().close()
        if self._rank is not None:
            self._tally.save(self.tally_folder, self._rank)
            self._tally = Tally()


class TallyingJsonlWriter(_TallyingWriter, JsonlWriter):
    """JSONL.gz shards, one per task."""

    extension = ".jsonl.gz"
    record = staticmethod(document_record)


class TallyingParquetWriter(_TallyingWriter, ParquetWriter):
    """Parquet shards, one per task; metadata as a JSON string."""

    extension = ".parquet"
    record = staticmethod(parquet_record)


class CountDocuments(PipelineStep):
    """Passes documents through unchanged and saves a tally of them when the task ends."""

    name = "count"
    type = "📊 - STATS"

    def __init__(self, tally_folder: Path):
        super().__init__()
        self.tally_folder = Path(tally_folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tally = Tally()
        for document in data:
            tally.add(document)
            yield document
        tally.save(self.tally_folder, rank)
