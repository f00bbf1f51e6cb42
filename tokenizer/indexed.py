"""Token shards: Megatron-LM compatible indexed datasets (``MMIDIDX`` version 1) and shard sets.

One dataset is a pair of files sharing a prefix, all little-endian:

``<prefix>.bin``
    The token ids of every sequence, concatenated, in the dataset's dtype.
``<prefix>.idx``
    ``b"MMIDIDX\\x00\\x00"``; version ``<Q`` (1); dtype code ``<B``; sequence count ``<Q`` (N);
    document-index count ``<Q`` (D); ``sequence_lengths`` int32[N]; ``sequence_pointers``
    int64[N] (byte offset of each sequence in ``.bin``); ``document_indices`` int64[D] (the
    first sequence of each document, from 0 to N).

In kinoe a document is one sequence that ends with the EOS id, so ``document_indices`` is
``0, 1, ..., N``. Ids are uint16 when the vocabulary has fewer than 65,500 pieces, else int32.

A shard set is a directory of such datasets for one source plus ``shards.json``, which names
the tokenizer (SHA-256 of its ``.model`` file) the shards were encoded with: opening a shard
set with another tokenizer fails instead of training on ids that mean something else.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import KinoeError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document-index count
HEADER = struct.Struct("<9sQBQQ")

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<u1"),
    2: np.dtype("<i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f4"),
    8: np.dtype("<u2"),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

# Megatron's own rule: uint16 below this vocabulary size, int32 from it on.
UINT16_VOCAB_LIMIT = 65_500
INT32_MAX = 2**31 - 1

SHARD_SET_FORMAT = "megatron-mmidx-v1"
SHARD_SET_FILE = "shards.json"
# The ids in shard-set error messages: enough to tell tokenizers apart, short enough to read.
SHORT_HASH = 12
REENCODE_HINT = "re-encode with `kinoe tokenizer encode` or use the matching tokenizer"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id of a ``vocab_size`` vocabulary fits comfortably, else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    if vocab_size > INT32_MAX:
        raise ValueError(f"vocabulary size {vocab_size} does not fit int32 ids")
    return np.dtype("<u2") if vocab_size < UINT16_VOCAB_LIMIT else np.dtype("<i4")


def dtype_code(dtype: np.dtype | type | str) -> int:
    """The ``.idx`` code of a numpy dtype (ValueError for a dtype the format cannot name)."""
    normalised = np.dtype(dtype).newbyteorder("<")
    if normalised not in _CODE_OF_DTYPE:
        raise ValueError(f"dtype {np.dtype(dtype)} has no Megatron indexed-dataset code")
    return _CODE_OF_DTYPE[normalised]


def data_path(prefix: Path) -> Path:
    """``<prefix>.bin``: the prefix is a name, not a file, so the suffix is appended, never swapped."""
    return Path(f"{prefix}.bin")


def index_path(prefix: Path) -> Path:
    """``<prefix>.idx``."""
    return Path(f"{prefix}.idx")


def _temporary(path: Path) -> Path:
    """A hidden name next to ``path`` that no reader mistakes for a finished file."""
    return path.with_name(f".{path.name}.tmp")


class IndexedDatasetWriter:
    """Writes one ``<prefix>.bin``/``<prefix>.idx`` pair, one document (= one sequence) at a time.

    Tokens go to a hidden temporary ``.bin`` through a large buffer as documents arrive; the
    lengths stay in memory (4 bytes a document) until :meth:`finalize` writes the index and
    renames both files into place, the index last. Until then no file with the final names
    exists, so a crash never leaves a pair that looks valid. As a context manager it finalizes
    on success and removes the temporary files when the block raises.
    """

    def __init__(self, prefix: Path, vocab_size: int, buffer_bytes: int = 8 * 2**20):
        self.prefix = Path(prefix)
        self.vocab_size = int(vocab_size)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.documents = 0
        self.tokens = 0
        self._lengths = array("i")
        self._finalized = False
        self._bin_temporary = _temporary(data_path(self.prefix))
        self._idx_temporary = _temporary(index_path(self.prefix))
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self._bin_temporary, "wb", buffering=buffer_bytes)  # noqa: SIM115

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document's ids as given (the caller appends EOS).

        ValueError for an id outside ``[0, vocab_size)``, a non-integer array or one that is not
        one-dimensional; nothing is written for a refused document.
        """
        if self._finalized or self._handle.closed:
            raise ValueError(f"{self.prefix}: writer is already finalized or aborted")
        values = np.asarray(ids)
        if values.ndim != 1:
            raise ValueError(f"a document is a 1-D sequence of ids, got shape {values.shape}")
        if values.size:
            if values.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got dtype {values.dtype}")
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"token id {bad} is outside the vocabulary [0, {self.vocab_size}) "
                    f"(document {self.documents} of {self.prefix})"
                )
        if values.size > INT32_MAX:
            raise ValueError(f"a document of {values.size} tokens does not fit an int32 length")
        self._handle.write(values.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(values.size)
        self.documents += 1
        self.tokens += values.size

    def finalize(self) -> None:
        """Write the index and move both files to their final names (the index last)."""
        if self._finalized:
            return
        if self._handle.closed:
            raise ValueError(f"{self.prefix}: writer was aborted")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

        lengths = np.frombuffer(self._lengths, dtype=np.int32) if self.documents else np.empty(0)
        lengths = lengths.astype("<i4", copy=False)
        pointers = np.zeros(self.documents, dtype="<i8")
        if self.documents > 1:
            np.cumsum(lengths[:-1], dtype="<i8", out=pointers[1:])
        pointers *= self.dtype.itemsize
        document_indices = np.arange(self.documents + 1, dtype="<i8")
        with open(self._idx_temporary, "wb") as handle:
            handle.write(
                HEADER.pack(
                    MAGIC, VERSION, dtype_code(self.dtype), self.documents, len(document_indices)
                )
            )
            handle.write(lengths.tobytes())
            handle.write(pointers.tobytes())
            handle.write(document_indices.tobytes())
            handle.flush()
            os.fsync(handle.fileno())

        final_idx = index_path(self.prefix)
        # An index left from an earlier run must not pair with the new data for a moment.
        final_idx.unlink(missing_ok=True)
        self._bin_temporary.replace(data_path(self.prefix))
        self._idx_temporary.replace(final_idx)
        self._finalized = True

    def abort(self) -> None:
        """Close and remove the temporary files; the final names are never touched."""
        if self._finalized:
            return
        self._handle.close()
        self._bin_temporary.unlink(missing_ok=True)
        self._idx_temporary.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """A read-only view of one ``<prefix>.bin``/``<prefix>.idx`` pair.

    Both files are memory-mapped: opening reads only the 34-byte header, and the index arrays
    are numpy views of the mapped index, so opening costs the same for ten sequences or ten
    million. ``dataset[i]`` is a view of sequence ``i`` in ``.bin`` (no copy).
    """

    def __init__(self, prefix: Path):
        self.prefix = Path(prefix)
        self.index_path = index_path(self.prefix)
        self.data_path = data_path(self.prefix)
        for path in (self.index_path, self.data_path):
            if not path.is_file():
                raise KinoeError(f"{path}: token shard file missing")

        index_size = self.index_path.stat().st_size
        with open(self.index_path, "rb") as handle:
            header = handle.read(HEADER.size)
        if len(header) < HEADER.size or header[: len(MAGIC)] != MAGIC:
            raise KinoeError(
                f"{self.index_path}: not a Megatron indexed-dataset index "
                f"(magic {header[: len(MAGIC)]!r}, expected {MAGIC!r})"
            )
        _, version, code, sequences, document_count = HEADER.unpack(header)
        if version != VERSION:
            raise KinoeError(
                f"{self.index_path}: index version {version} is not supported (kinoe reads {VERSION})"
            )
        if code not in DTYPE_CODES:
            raise KinoeError(f"{self.index_path}: unknown dtype code {code} in the index header")
        self.dtype: np.dtype = DTYPE_CODES[code]
        expected = HEADER.size + sequences * (4 + 8) + document_count * 8
        if index_size != expected:
            raise KinoeError(
                f"{self.index_path}: {index_size} bytes but its header promises {expected} "
                f"({sequences} sequences, {document_count} document indices); truncated or corrupt"
            )

        self._index = np.memmap(self.index_path, dtype=np.uint8, mode="r")
        offset = HEADER.size
        self.sequence_lengths: np.ndarray = np.frombuffer(
            self._index, dtype="<i4", count=sequences, offset=offset
        )
        offset += sequences * 4
        self.sequence_pointers: np.ndarray = np.frombuffer(
            self._index, dtype="<i8", count=sequences, offset=offset
        )
        offset += sequences * 8
        self.document_indices: np.ndarray = np.frombuffer(
            self._index, dtype="<i8", count=document_count, offset=offset
        )
        if document_count == 0 or self.document_indices[0] != 0:
            raise KinoeError(f"{self.index_path}: document indices do not start at sequence 0")
        if self.document_indices[-1] != sequences:
            raise KinoeError(
                f"{self.index_path}: document indices end at {self.document_indices[-1]}, "
                f"not at the sequence count {sequences}"
            )

        data_size = self.data_path.stat().st_size
        expected_data = (
            int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            if sequences
            else 0
        )
        if data_size != expected_data:
            raise KinoeError(
                f"{self.data_path}: {data_size} bytes but its index describes {expected_data}; "
                f"the .bin and .idx do not belong together or one is truncated"
            )
        self.num_tokens = data_size // self.dtype.itemsize
        self._data = (
            np.memmap(self.data_path, dtype=self.dtype, mode="r")
            if data_size
            else np.empty(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def _locate(self, index: int) -> tuple[int, int]:
        """(first token, length) of sequence ``index``; negative indices count from the end."""
        size = len(self)
        position = int(index)
        if position < 0:
            position += size
        if not 0 <= position < size:
            raise IndexError(f"sequence {index} out of range for {size} sequences in {self.prefix}")
        start = int(self.sequence_pointers[position]) // self.dtype.itemsize
        return start, int(self.sequence_lengths[position])

    def __getitem__(self, index: int) -> np.ndarray:
        start, length = self._locate(index)
        return self._data[start : start + length]

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Part of sequence ``index``: ``length`` tokens from ``offset`` (to its end by default)."""
        start, size = self._locate(index)
        if not 0 <= offset <= size:
            raise IndexError(f"offset {offset} outside sequence {index} of {size} tokens")
        if length is None:
            length = size - offset
        if length < 0 or offset + length > size:
            raise IndexError(
                f"{length} tokens from offset {offset} run past sequence {index} of {size} tokens"
            )
        return self._data[start + offset : start + offset + length]

    @property
    def documents(self) -> int:
        """Documents in the dataset (one fewer than the entries of ``document_indices``)."""
        return len(self.document_indices) - 1

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({str(self.prefix)!r}, sequences={len(self)}, "
            f"tokens={self.num_tokens}, dtype={self.dtype.name})"
        )


def tokenizer_sha256(model_path: Path) -> str:
    """SHA-256 (hex) of a SentencePiece ``.model`` file's bytes: the tokenizer's identity."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise KinoeError(f"{model_path}: tokenizer model file not found")
    digest = hashlib.sha256()
    with open(model_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard_set_metadata(
    directory: Path,
    *,
    source: str,
    tokenizer_sha256: str,
    vocab_size: int,
    eos_id: int,
    shards: Sequence[dict[str, Any]],
    rehydration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<directory>/shards.json`` (atomically) and return what was written.

    ``shards``: ``{"prefix", "documents", "tokens"}`` per dataset, prefixes relative to
    ``directory``, in the order a reader should concatenate them. ``rehydration``: how the
    documents were repeated (``tokenizer.encode``); left out of the file when None.
    """
    directory = Path(directory)
    entries = [
        {
            "prefix": str(shard["prefix"]),
            "documents": int(shard["documents"]),
            "tokens": int(shard["tokens"]),
        }
        for shard in shards
    ]
    metadata = {
        "format": SHARD_SET_FORMAT,
        "source": source,
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": int(vocab_size),
        "eos_id": int(eos_id),
        "dtype": dtype_for_vocab(vocab_size).name,
        "shards": entries,
        "documents": sum(entry["documents"] for entry in entries),
        "tokens": sum(entry["tokens"] for entry in entries),
    }
    if rehydration is not None:
        metadata["rehydration"] = rehydration
    directory.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(directory / SHARD_SET_FILE)
    temporary.write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
    temporary.replace(directory / SHARD_SET_FILE)
    return metadata


def read_shard_set_metadata(directory: Path) -> dict[str, Any]:
    """The parsed ``shards.json`` of a shard set (KinoeError when missing or malformed)."""
    path = Path(directory) / SHARD_SET_FILE
    if not path.is_file():
        raise KinoeError(
            f"{directory}: no {SHARD_SET_FILE}, so not a finished token shard set "
            "(encode it with `kinoe tokenizer encode`)"
        )
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KinoeError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != SHARD_SET_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise KinoeError(f"{path}: format {found!r} is not {SHARD_SET_FORMAT!r}")
    missing = [
        key for key in ("tokenizer_sha256", "vocab_size", "dtype", "shards") if key not in metadata
    ]
    if missing:
        raise KinoeError(f"{path}: missing {', '.join(missing)}")
    return metadata


def open_shard_set(directory: Path, tokenizer_sha256: str) -> list[IndexedDataset]:
    """The datasets of a shard set, in ``shards.json`` order, after checking they fit the tokenizer.

    Refuses (KinoeError) a shard set encoded with another tokenizer, a listed shard that is
    missing, and a shard whose counts or dtype differ from what ``shards.json`` says.
    """
    directory = Path(directory)
    metadata = read_shard_set_metadata(directory)
    encoded_with = str(metadata["tokenizer_sha256"])
    if encoded_with != tokenizer_sha256:
        raise KinoeError(
            f"{directory}: token shards were encoded with tokenizer {encoded_with[:SHORT_HASH]} "
            f"but this run uses tokenizer {tokenizer_sha256[:SHORT_HASH]}; {REENCODE_HINT}"
        )
    datasets = []
    for shard in metadata["shards"]:
        prefix = directory / shard["prefix"]
        for path in (data_path(prefix), index_path(prefix)):
            if not path.is_file():
                raise KinoeError(
                    f"{path}: listed in {directory / SHARD_SET_FILE} but missing; "
                    "the shard set is incomplete (re-encode it)"
                )
        dataset = IndexedDataset(prefix)
        if dataset.dtype.name != metadata["dtype"]:
            raise KinoeError(
                f"{dataset.index_path}: dtype {dataset.dtype.name}, "
                f"but {SHARD_SET_FILE} says {metadata['dtype']}"
            )
        if len(dataset) != shard["documents"] or dataset.num_tokens != shard["tokens"]:
            raise KinoeError(
                f"{dataset.index_path}: {len(dataset)} documents and {dataset.num_tokens} tokens, "
                f"but {SHARD_SET_FILE} says {shard['documents']} and {shard['tokens']}"
            )
        datasets.append(dataset)
    return datasets
