"""Readers for every source kind, each tagging documents with their source and losing none.

datatrove's stock readers skip records they cannot parse (and give up on the rest of a file
at the first invalid UTF-8 byte) and drop documents with empty text. kinoe must count every
record it was given, so its readers turn each unreadable record into a document carrying
``metadata["read_error"]``; the first step of the pipeline (``ReadErrors``) moves those to the
removed output under that reason, and empty documents reach the length filter, which says so.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseDiskReader, BaseReader
from datatrove.pipeline.readers.parquet import ParquetReader

from data_prep.aozora import AozoraReader
from data_prep.config import SourceConfig

# How much of an unreadable record is kept in the removed output for people to look at.
_REJECT_EXCERPT_CHARS = 2000


def rejected(source: str | None, doc_id: str, reason: str, raw: bytes | str = b"") -> Document:
    """A document standing for an unreadable record, so it is counted and kept for review."""
    excerpt = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return Document(
        text=excerpt[:_REJECT_EXCERPT_CHARS],
        id=doc_id,
        metadata={"source": source, "read_error": reason},
    )


def document_from_record(
    record: Any, source: str | None, text_field: str, id_field: str, fallback_id: str
) -> Document:
    """A Document from one parsed record; other fields go to metadata, nothing is dropped."""
    if not isinstance(record, dict):
        return rejected(
            source, fallback_id, "not_an_object", json.dumps(record, ensure_ascii=False)[:200]
        )
    if text_field not in record:
        return rejected(
            source, fallback_id, "missing_text_field", json.dumps(record, ensure_ascii=False)
        )
    text = record[text_field]
    if not isinstance(text, str):
        return rejected(
            source,
            fallback_id,
            "text_not_a_string",
            json.dumps(record, ensure_ascii=False, default=str),
        )
    metadata = {key: value for key, value in record.items() if key not in (text_field, id_field)}
    nested = metadata.pop("metadata", None)
    if isinstance(nested, dict):
        metadata = nested | metadata
    if source is not None:
        metadata["source"] = source
    doc_id = record.get(id_field)
    return Document(
        text=text, id=str(doc_id) if doc_id not in (None, "") else fallback_id, metadata=metadata
    )


class JsonlDocuments(BaseDiskReader):
    """JSON Lines (plain, .gz, .zst; local or fsspec URLs) read line by line as bytes.

    With ``source`` None the records' own ``source`` field is kept (kinoe's intermediate files).
    """

    name = "jsonl"

    def __init__(
        self,
        folder: str,
        glob: str | None,
        source: str | None,
        text_field: str = "text",
        id_field: str = "id",
        limit: int = -1,
    ):
        super().__init__(
            folder,
            limit=limit,
            text_key=text_field,
            id_key=id_field,
            glob_pattern=glob,
            recursive=True,
        )
        self.source = source

    @classmethod
    def of(cls, source: SourceConfig) -> JsonlDocuments:
        """The reader for a configured source."""
        return cls(
            source.folder(),
            source.file_glob(),
            source.name,
            source.text_field,
            source.id_field,
            source.limit,
        )

    def read_file(self, filepath: str) -> DocumentsPipeline:
        index = -1
        try:
            with self.data_folder.open(filepath, "rb", compression="infer") as handle:
                for index, raw in enumerate(handle):
                    with self.track_time():
                        document = self._parse(raw, f"{filepath}#{index}")
                    yield document
        except (OSError, EOFError, zlib.error) as error:
            # A truncated or corrupt compressed file: what was read is kept, the rest is counted.
            self.stat_update("corrupt_files")
            yield rejected(self.source, f"{filepath}#{index + 1}", "corrupt_file", str(error))

    def _parse(self, raw: bytes, fallback_id: str) -> Document:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return rejected(self.source, fallback_id, "invalid_utf8", raw)
        if not line.strip():
            return rejected(self.source, fallback_id, "blank_line", line)
        try:
            record = json.loads(line)
        except ValueError:
            return rejected(self.source, fallback_id, "malformed_json", line)
        return document_from_record(record, self.source, self.text_key, self.id_key, fallback_id)


class ParquetDocuments(ParquetReader):
    """Parquet files (local mirrors, or the Hub's Wikipedia dumps) with every row kept."""

    name = "parquet"

    def __init__(self, source: SourceConfig):
        super().__init__(
            source.folder(),
            limit=source.limit,
            text_key=source.text_field,
            id_key=source.id_field,
            glob_pattern=source.file_glob(),
            recursive=True,
        )
        self.source = source.name

    def get_document_from_dict(
        self, data: dict, source_file: str, id_in_file: int | str
    ) -> Document:
        return document_from_record(
            data, self.source, self.text_key, self.id_key, f"{source_file}#{id_in_file}"
        )


def reader_for(source: SourceConfig) -> BaseReader:
    """The datatrove reader step for one configured source."""
    if source.kind in ("c4_ja", "jsonl"):
        return JsonlDocuments.of(source)
    if source.kind in ("wikipedia_ja", "parquet"):
        return ParquetDocuments(source)
    return AozoraReader(
        source.folder(), source=source.name, glob_pattern=source.file_glob(), limit=source.limit
    )


class ReadErrors(BaseFilter):
    """First step after the readers: records that could not be read leave, under their reason."""

    name = "read_errors"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = doc.metadata.get("read_error")
        return (False, reason) if reason else True
