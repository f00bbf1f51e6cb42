"""Encoding documents into token shards: a datatrove step per task, then one assembly at the end.

``DocumentReader`` reads the data_prep documents as ``kinoe tokenizer train`` does
(``tokenizer.sample.read_documents``): a record that is not a document is counted by reason, the
rest of its file is still read, and each task leaves ``<accounts_dir>/<rank:05d>.json`` with the
files and documents it read and what it left out; ``read_summary`` adds those up.
``EncodeShards`` runs in every task of a datatrove pipeline. It writes the documents of each
source it meets to ``<output_dir>/<source>/<rank:05d>.bin``/``.idx`` (one document per
sequence, EOS appended; BOS first for the sources in ``bos_sources``, the conversations) and,
when the task ends, ``<output_dir>/<source>/<rank:05d>.json`` with that shard's document and
token counts. After every task has finished, ``assemble_shard_sets`` checks the shards
against those counts and writes each source's ``shards.json`` (tokenizer hash included, see
``tokenizer.indexed``).

Rehydration (FineWeb-2's, off unless ``RehydrateConfig.sources`` names the source) writes a
document ``n`` times by its duplicate-cluster size: once in ``<rank>``, and its ``k``-th repeat
in ``<rank>.repeat<k>``. Written one after the other, the copies would pack into the same
training sample; instead the shard set lists every task's own shard, then every task's first
repeats, and so on, so between two copies of a document lie the other documents written that
often (they can meet only where one pass of repeats ends and the next begins).

Paths are local (or a shared file system mounted on every node); object stores are not
supported, because the writer renames files into place.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from common.errors import KinoeError
from tokenizer.accounts import AccountedReader, read_accounts
from tokenizer.config import RehydrateConfig
from tokenizer.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    data_path,
    dtype_for_vocab,
    index_path,
    write_shard_set_metadata,
)
from tokenizer.sample import Rejections, document_files, read_documents

# <rank>.json for a task's shard, <rank>.repeat<k>.json for its k-th repeats (rehydration).
TASK_TALLY = re.compile(r"^(\d+)(?:\.repeat(\d+))?\.json$")


class DocumentReader(AccountedReader):
    """Read data_prep documents (JSONL, JSONL.gz, Parquet) under a folder, counting bad records.

    Not datatrove's JsonlReader: that one drops the rest of a file after a byte that is not UTF-8
    and stops the task with a traceback on a truncated .gz, a line that is not an object or a
    text that is not a string. Records become documents as datatrove's readers make them
    (``metadata`` and the other fields, ``source`` among them, in ``Document.metadata``), and the
    files are listed and dealt out to the tasks as they deal them, so clean input gives the same
    shards, byte for byte.
    """

    name = "📄 Documents"

    def __init__(self, folder: str | Path, accounts_dir: str | Path, setting: str):
        files = document_files(Path(folder), setting)
        # Sorted as path strings, as datatrove lists them.
        names = sorted(path.relative_to(Path(folder)).as_posix() for path in files)
        super().__init__(str(folder), names, accounts_dir)
        self.folder = Path(folder)

    def start_task(self, rank: int) -> None:
        self._rejections = Rejections()

    def finish_task(self, files: int, documents: int) -> dict[str, Any]:
        for reason, count in self._rejections.rejected.items():
            self.stat_update(f"rejected_{reason}", value=count)
        return {
            "files": files,
            "documents": documents,
            "rejected": self._rejections.rejected,
            "first_rejected": self._rejections.first_rejected,
        }

    def read_file(self, filepath: str) -> DocumentsPipeline:
        records = read_documents(self.folder / filepath, self._rejections, parquet_columns=None)
        for index, record in enumerate(records):
            with self.track_time():
                document = self.get_document_from_dict(record, filepath, index)
            yield document


def read_summary(accounts_dir: Path) -> dict[str, Any]:
    """Files and documents the tasks' DocumentReaders read, and the records they left out by
    reason with the first of each (the lowest task's)."""
    total: dict[str, Any] = {"files": 0, "documents": 0, "rejected": {}, "first_rejected": {}}
    for account in read_accounts(accounts_dir):
        total["files"] += account["files"]
        total["documents"] += account["documents"]
        for reason, count in account["rejected"].items():
            total["rejected"][reason] = total["rejected"].get(reason, 0) + count
        for reason, where in account["first_rejected"].items():
            total["first_rejected"].setdefault(reason, where)
    return total


def _source_of(document: Document) -> str:
    """The document's source, which names its shard directory (ValueError when unusable)."""
    source = document.metadata.get("source")
    if source is None or source == "":
        raise ValueError(
            f"document {document.id!r} has no 'source' in its metadata; token shards are "
            "written per source, so every document needs one"
        )
    source = str(source)
    if "/" in source or "\\" in source or source in (".", "..") or source.startswith("."):
        raise ValueError(
            f"document {document.id!r} has source {source!r}, which cannot name a shard directory"
        )
    return source


class EncodeShards(PipelineStep):
    """Encode documents with a SentencePiece model into per-source token shards for this task.

    A terminal step: it consumes every document and yields none, because its output is the
    shards (put any step that should see the documents before it). Documents are encoded in
    batches of ``batch_size`` with SentencePiece's batched (C++, multithreaded) ``encode``.
    Documents of a source in ``bos_sources`` start with BOS: conversations, which fine-tuning
    and inference encode with the tokenizer's ``<s>`` first, so the model sees them the same way.
    The processor is loaded on first use in the task and is never pickled, so the step can
    be sent to worker processes. If the task fails, the unfinished shards are removed and no
    per-task tally is written, so a rerun starts clean. Documents of the sources ``rehydrate``
    names are written as many times as their cluster size earns (module docstring).
    """

    name = "encode"
    type = "🔢 - TOKENIZE"

    def __init__(
        self,
        model_path: str,
        output_dir: str,
        append_eos: bool = True,
        batch_size: int = 256,
        bos_sources: Sequence[str] = (),
        rehydrate: RehydrateConfig | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_path = str(model_path)
        self.output_dir = str(output_dir)
        self.append_eos = append_eos
        self.batch_size = batch_size
        self.bos_sources = frozenset(bos_sources)
        self.rehydrate = rehydrate or RehydrateConfig()
        self._processor = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_processor"] = None
        return state

    @property
    def processor(self):
        """The SentencePiece processor, loaded on first use."""
        if self._processor is None:
            import sentencepiece

            if not Path(self.model_path).is_file():
                raise KinoeError(f"{self.model_path}: tokenizer model file not found")
            self._processor = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        return self._processor

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._encode(data or (), rank)
        yield from ()

    def _encode(self, data: DocumentsPipeline, rank: int) -> None:
        processor = self.processor
        vocab_size = processor.get_piece_size()
        eos_id = processor.eos_id()
        if self.append_eos and eos_id < 0:
            raise KinoeError(f"{self.model_path}: the tokenizer has no EOS piece to end documents")
        if self.bos_sources and processor.bos_id() < 0:
            raise KinoeError(
                f"{self.model_path}: the tokenizer has no BOS piece to start conversations"
            )
        output = Path(self.output_dir)
        # Keyed by (source, repeat): repeat 0 holds every document once, repeat k its k-th copy.
        writers: dict[tuple[str, int], IndexedDatasetWriter] = {}
        rehydrated: dict[str, dict[str, Any]] = {}
        try:
            batch: list[Document] = []
            for document in data:
                _source_of(document)
                batch.append(document)
                if len(batch) >= self.batch_size:
                    self._write_batch(batch, writers, rehydrated, output, rank, vocab_size, eos_id)
                    batch = []
            if batch:
                self._write_batch(batch, writers, rehydrated, output, rank, vocab_size, eos_id)
            for writer in writers.values():
                writer.finalize()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        for (source, repeat), writer in writers.items():
            counts: dict[str, Any] = {"documents": writer.documents, "tokens": writer.tokens}
            if repeat == 0 and source in rehydrated:
                counts["rehydration"] = rehydrated[source]
            tally = writer.prefix.with_name(f"{writer.prefix.name}.json")
            temporary = tally.with_name(f".{tally.name}.tmp")
            temporary.write_text(json.dumps(counts) + "\n")
            temporary.replace(tally)

    def _copies(self, document: Document, source: str, rehydrated: dict[str, dict]) -> int:
        """Times the document is written: 1, or what its cluster size earns when rehydrated."""
        if source not in self.rehydrate.sources:
            return 1
        tally = rehydrated.setdefault(
            source,
            {
                "copies_by_cluster_size": {str(k): v for k, v in self.rehydrate.copies.items()},
                "documents_by_copies": {},
                "without_cluster_size": 0,
            },
        )
        size = document.metadata.get("minhash_cluster_size")
        if size is None:  # near dedup was off: the document counts as unique
            tally["without_cluster_size"] += 1
            size = 1
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"document {document.id!r} has minhash_cluster_size {size!r}, not a whole number "
                f"of at least 1; rehydrate only sources deduplicated by kinoe data"
            )
        copies = self.rehydrate.copies_for(size)
        by_copies = tally["documents_by_copies"]
        by_copies[str(copies)] = by_copies.get(str(copies), 0) + 1
        return copies

    def _write_batch(
        self,
        batch: list[Document],
        writers: dict[tuple[str, int], IndexedDatasetWriter],
        rehydrated: dict[str, dict[str, Any]],
        output: Path,
        rank: int,
        vocab_size: int,
        eos_id: int,
    ) -> None:
        with self.track_time(unit="batch"):
            encoded = self.processor.encode([document.text for document in batch])
            for document, ids in zip(batch, encoded, strict=True):
                source = _source_of(document)
                if source in self.bos_sources:
                    ids.insert(0, self.processor.bos_id())
                if self.append_eos:
                    ids.append(eos_id)
                tokens = np.asarray(ids, dtype=np.int64)
                for repeat in range(self._copies(document, source, rehydrated)):
                    writer = writers.get((source, repeat))
                    if writer is None:
                        name = f"{rank:05d}" + (f".repeat{repeat}" if repeat else "")
                        writer = IndexedDatasetWriter(output / source / name, vocab_size)
                        writers[(source, repeat)] = writer
                    writer.add_document(tokens)
                self.stat_update("documents")
                self.stat_update("tokens", value=len(ids), unit="doc")
                self.stat_update(f"tokens_{source}", value=len(ids), unit="doc")


def assemble_shard_sets(
    output_dir: Path, tokenizer_sha256: str, vocab_size: int, eos_id: int
) -> dict[str, dict]:
    """Write ``shards.json`` for every source under ``output_dir`` from the tasks' tallies.

    Shards are listed by rank, every task's own before any repeat (rehydration). Each listed
    ``.bin``/``.idx`` must exist and hold the documents and tokens its task reported, in the
    dtype ``vocab_size`` calls for (KinoeError otherwise). A rehydrated source's shards.json
    adds the documents by times written. Returns the written metadata per source.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise KinoeError(f"{output_dir}: token shard directory not found")
    expected_dtype = dtype_for_vocab(vocab_size)
    assembled: dict[str, dict] = {}
    for directory in sorted(path for path in output_dir.iterdir() if path.is_dir()):
        tallies = sorted(
            (int(match.group(2) or 0), int(match.group(1)), path)
            for path in directory.iterdir()
            if (match := TASK_TALLY.match(path.name))
        )
        if not tallies:
            continue
        shards = []
        rehydration: dict[str, Any] | None = None
        for _, _, tally_path in tallies:
            try:
                tally = json.loads(tally_path.read_text(encoding="utf-8"))
                documents, tokens = int(tally["documents"]), int(tally["tokens"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise KinoeError(f"{tally_path}: unreadable task tally ({error})") from None
            if "rehydration" in tally:
                rehydration = _add_rehydration(rehydration, tally["rehydration"], documents, tokens)
            prefix = directory / tally_path.name.removesuffix(".json")
            for path in (data_path(prefix), index_path(prefix)):
                if not path.is_file():
                    raise KinoeError(f"{path}: missing, though {tally_path.name} reports it")
            dataset = IndexedDataset(prefix)
            if dataset.dtype != expected_dtype:
                raise KinoeError(
                    f"{dataset.index_path}: dtype {dataset.dtype.name}, but a vocabulary of "
                    f"{vocab_size} calls for {expected_dtype.name}; encoded with another tokenizer?"
                )
            if dataset.documents != documents or dataset.num_tokens != tokens:
                raise KinoeError(
                    f"{dataset.index_path}: {dataset.documents} documents and "
                    f"{dataset.num_tokens} tokens, but {tally_path.name} reports {documents} "
                    f"and {tokens}"
                )
            shards.append({"prefix": prefix.name, "documents": documents, "tokens": tokens})
        assembled[directory.name] = write_shard_set_metadata(
            directory,
            source=directory.name,
            tokenizer_sha256=tokenizer_sha256,
            vocab_size=vocab_size,
            eos_id=eos_id,
            shards=shards,
            rehydration=rehydration,
        )
    if not assembled:
        raise KinoeError(f"{output_dir}: no encoded shards found (did the encode tasks run?)")
    return assembled


def _add_rehydration(
    total: dict[str, Any] | None, task: dict[str, Any], documents: int, tokens: int
) -> dict[str, Any]:
    """One task's rehydration tally added to the source's: documents by times written, and the
    documents and tokens written once (the task's own shard, before any repeat)."""
    if total is None:
        total = {
            "copies_by_cluster_size": task["copies_by_cluster_size"],
            "distinct_documents": 0,
            "distinct_tokens": 0,
            "documents_by_copies": {},
            "without_cluster_size": 0,
        }
    total["distinct_documents"] += documents
    total["distinct_tokens"] += tokens
    total["without_cluster_size"] += int(task["without_cluster_size"])
    by_copies = total["documents_by_copies"]
    for copies, count in task["documents_by_copies"].items():
        by_copies[copies] = by_copies.get(copies, 0) + int(count)
    total["documents_by_copies"] = dict(sorted(by_copies.items(), key=lambda item: int(item[0])))
    return total
