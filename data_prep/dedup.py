"""Deduplication on characters: exact (whole text) and MinHash over character n-grams.

datatrove's MinHash splits text into words with a per-language word tokenizer; Japanese has
no spaces, and a morphological analyser would be the slowest step of the pipeline. Here a
shingle is ``ngram`` consecutive characters of the normalised text, hashed with a vectorised
polynomial rolling hash, and the signature is computed in fixed-size chunks so a long
document never needs a (shingles x hashes) matrix in memory.

LSH bands only propose candidate pairs. Each candidate is then verified by the true Jaccard
similarity of the two documents' shingle sets (kept per task on disk by the signature step),
so the band curve can be generous without merging distinct documents, and documents shorter
than ``min_chars`` are left to exact dedup: two short leads share most of their few 5-grams
(a template sentence with another name) without being copies.

Clusters are formed by union-find over the verified pairs (``MinhashCluster``). A kept
document's ``minhash_cluster_size`` counts the input documents it stands for: the members of
its near-duplicate cluster and the exact copies each of them had (``duplicate_count``), as
FineWeb-2's MinHash, which saw exact copies too, counted them. Rehydration upsamples by it.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from data_prep.config import MinhashSettings

_SENTENCE_END = re.compile(r"(?<=[。！？!?])")
# Odd 64-bit multiplier of the rolling hash (any odd constant with mixed bits works).
_ROLL = np.uint64(0x9E3779B97F4A7C15)
# Rows of shingles per block when taking the minimum over hash functions; bounds memory
# at block x (bands x rows) x 8 bytes (about 7 MB for 8,192 x 112).
_BLOCK = 8192


class CharacterTokenizer(WordTokenizer):
    """Characters as "words": what datatrove's n-gram helpers see for Japanese here."""

    def __init__(self) -> None:
        super().__init__("ja-characters")

    def word_tokenize(self, text: str) -> list[str]:
        return list(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [sentence for sentence in _SENTENCE_END.split(text) if sentence]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(index, index + 1) for index in range(len(text))]


def document_bytes(doc: Document) -> bytes:
    """What exact dedup compares: the whole normalised text, as UTF-8 (xxhash 4 hashes bytes only)."""
    return doc.text.encode("utf-8")


# datatrove picks its hash function from this getter's return annotation, which postponed
# annotations (the __future__ import above) would leave as the string "bytes".
document_bytes.__annotations__["return"] = bytes


def exact_config() -> ExactDedupConfig:
    """Exact-dedup settings: 64-bit xxhash of the text, first occurrence kept."""
    return ExactDedupConfig(content_getter=document_bytes, hash_config=HashConfig(precision=64))


def minhash_config(settings: MinhashSettings) -> MinhashConfig:
    """datatrove's MinHash settings from ours (64-bit hashes)."""
    return MinhashConfig(
        n_grams=settings.ngram,
        num_buckets=settings.bands,
        hashes_per_bucket=settings.rows,
        seed=settings.seed,
        hash_config=HashConfig(precision=64),
    )


def character_shingles(text: str, n: int) -> np.ndarray:
    """Distinct hashes of the text's character n-grams; shape (S, 1), uint64.

    A text shorter than ``n`` is one shingle. Hashes are a polynomial rolling hash over
    Unicode code points followed by a 64-bit finaliser, computed for all positions at once.
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if codes.size == 0:
        return np.zeros((0, 1), dtype=np.uint64)
    n = min(n, codes.size)
    count = codes.size - n + 1
    with np.errstate(over="ignore"):
        hashes = np.zeros(count, dtype=np.uint64)
        for offset in range(n):
            hashes = hashes * _ROLL + codes[offset : offset + count]
        # splitmix64 finaliser: spreads the low-entropy polynomial into all 64 bits
        hashes ^= hashes >> np.uint64(30)
        hashes *= np.uint64(0xBF58476D1CE4E5B9)
        hashes ^= hashes >> np.uint64(27)
        hashes *= np.uint64(0x94D049BB133111EB)
        hashes ^= hashes >> np.uint64(31)
    return np.unique(hashes).reshape(-1, 1)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted arrays of distinct shingle hashes (0 when both are empty)."""
    union = a.size + b.size
    if union == 0:
        return 0.0
    shared = np.intersect1d(a, b, assume_unique=True).size
    return shared / (union - shared)


class ShingleStore:
    """Each task's documents' shingle sets, in input order: ``<rank>.u32`` holds the sorted
    distinct low 32 bits of every shingle hash, ``<rank>.offsets.npy`` where each document starts,
    ``<rank>.copies.npy`` how many input documents each stands for (itself and its exact copies).

    32 bits halve the disk (4 bytes per character, about the UTF-8 size of Japanese text);
    two distinct shingles collide with probability 2^-32, which moves a Jaccard similarity of
    100,000-shingle documents by about 1e-5.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def writer(self, rank: int) -> _ShingleWriter:
        return _ShingleWriter(self.folder, rank)

    def shingles(self, rank: int, index: int) -> np.ndarray:
        """The shingle set of the ``index``-th document of task ``rank`` (sorted uint32)."""
        if rank not in self._cache:
            self._cache[rank] = (
                np.load(self.folder / f"{rank:05d}.offsets.npy"),
                np.memmap(self.folder / f"{rank:05d}.u32", dtype=np.uint32, mode="r")
                if (self.folder / f"{rank:05d}.u32").stat().st_size
                else np.zeros(0, dtype=np.uint32),
            )
        offsets, values = self._cache[rank]
        return np.asarray(values[offsets[index] : offsets[index + 1]])

    def ranks(self) -> list[int]:
        """The tasks whose documents were stored, in order."""
        return sorted(int(path.name.split(".")[0]) for path in self.folder.glob("*.copies.npy"))

    def copies(self, rank: int) -> np.ndarray:
        """Input documents each document of task ``rank`` stands for (uint32, one per document)."""
        return np.load(self.folder / f"{rank:05d}.copies.npy")


class _ShingleWriter:
    def __init__(self, folder: Path, rank: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{rank:05d}.u32"
        self.offsets_path = folder / f"{rank:05d}.offsets.npy"
        self.copies_path = folder / f"{rank:05d}.copies.npy"
        self.handle = self.path.open("wb")
        self.offsets = [0]
        self.copies: list[int] = []

    def add(self, shingles: np.ndarray) -> None:
        low = np.unique(shingles.ravel().astype(np.uint32))  # astype keeps the low 32 bits
        self.handle.write(low.tobytes())
        self.offsets.append(self.offsets[-1] + low.size)

    def close(self) -> None:
        self.handle.close()
        np.save(self.offsets_path, np.asarray(self.offsets, dtype=np.int64))
        np.save(self.copies_path, np.asarray(self.copies, dtype=np.uint32))


class CharacterMinhashSignature(MinhashDedupSignature):
    """MinHash signatures over character n-grams, written in datatrove's format for its next
    steps; documents under ``min_chars`` get none, and every document's shingles are stored
    for verification."""

    name = "minhash_signature"

    def __init__(self, output_folder: str, settings: MinhashSettings):
        super().__init__(
            output_folder, config=minhash_config(settings), language=CharacterTokenizer()
        )
        self.min_chars = settings.min_chars
        self.store = ShingleStore(Path(output_folder) / "shingles")
        self._writer: _ShingleWriter | None = None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        self._writer = self.store.writer(rank)
        try:
            super().run(self._counting_copies(data, self._writer), rank, world_size)
        finally:
            self._writer.close()
            self._writer = None

    @staticmethod
    def _counting_copies(data: DocumentsPipeline, writer: _ShingleWriter) -> DocumentsPipeline:
        for doc in data:
            # Exact dedup ran before and left how many copies of this text it removed.
            writer.copies.append(1 + int(doc.metadata.get("duplicate_count", 0)))
            yield doc

    def get_shingles(self, text: str) -> np.ndarray:
        # datatrove calls this once per document, in input order, which is the order the
        # store's offsets follow; an empty array means "no signature" to its run().
        if len(text) < self.min_chars:
            shingles = np.zeros((0, 1), dtype=np.uint64)
        else:
            shingles = character_shingles(text, self.config.n_grams)
        if self._writer is not None:
            self._writer.add(shingles)
        return shingles

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        """Per band, the minimum of each hash function over all shingles (computed block-wise).

        A hash function is x -> a*x + b mod 2^64 with a odd, a bijection of 64-bit values.
        datatrove's formula wraps the product mod 2^64 too and then takes it mod 2^61 - 1,
        which adds nothing to shingles that are already uniform 64-bit hashes and cost a
        third of the step; candidates are verified by their true Jaccard in any case.
        """
        a, b = self.parameters
        a = a | np.uint64(1)
        minimum = np.full(self.num_hashes, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, shingles.shape[0], _BLOCK):
                block = shingles[start : start + _BLOCK] * a
                block += b
                np.minimum(minimum, block.min(axis=0), out=minimum)
        return [band.tolist() for band in np.split(minimum, self.config.num_buckets)]


class MinhashVerify(PipelineStep):
    """Keeps only the LSH candidate pairs whose true shingle Jaccard similarity reaches
    ``min_jaccard``; writes them in datatrove's ``.dups`` format for its cluster step."""

    type = "🫂 - DEDUP"
    name = "minhash_verify"

    def __init__(
        self, buckets_folder: str, signatures_folder: str, output_folder: str, min_jaccard: float
    ):
        super().__init__()
        self.buckets_folder = Path(buckets_folder)
        self.store = ShingleStore(Path(signatures_folder) / "shingles")
        self.output_folder = Path(output_folder)
        self.min_jaccard = min_jaccard

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        files = sorted(self.buckets_folder.glob("*.dups"))[rank::world_size]
        self.output_folder.mkdir(parents=True, exist_ok=True)
        counts = {"candidates": 0, "verified": 0, "rejected": 0}
        seen: dict[tuple[int, int, int, int], bool] = {}
        with self.track_time():
            for path in files:
                with path.open("rb") as source, (self.output_folder / path.name).open("wb") as out:
                    for pair in read_tuples_from_file(source, "4I", lines_to_buffer=1024):
                        if pair not in seen:
                            a = self.store.shingles(pair[0], pair[1])
                            b = self.store.shingles(pair[2], pair[3])
                            seen[pair] = jaccard(a, b) >= self.min_jaccard
                            counts["candidates"] += 1
                            counts["verified" if seen[pair] else "rejected"] += 1
                        if seen[pair]:
                            out.write(struct.pack("<4I", *pair))
        for key, value in counts.items():
            self.stat_update(key, value=value)
        tally = self.output_folder / "tally"
        tally.mkdir(exist_ok=True)
        (tally / f"{rank:05d}.json").write_text(json.dumps(counts))


class MinhashCluster(PipelineStep):
    """Union-find over the verified pairs: each cluster keeps its earliest document (lowest task,
    then position) and every member gets the cluster's size in input documents; written as
    datatrove's ``<task>.remove`` and ``<task>.sizes`` for its filter step.

    datatrove's own cluster step counts only the documents near dedup saw, so a page whose exact
    copies were removed before looked unique, and a task with nothing to remove got no sizes
    file, so its documents carried no ``minhash_cluster_size``. Here every task gets both files.
    """

    type = "🫂 - DEDUP"
    name = "minhash_cluster"

    def __init__(self, verified_folder: str, signatures_folder: str, output_folder: str):
        super().__init__()
        self.verified_folder = Path(verified_folder)
        self.store = ShingleStore(Path(signatures_folder) / "shingles")
        self.output_folder = Path(output_folder)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        # A node is task << 32 | position: an int orders like (task, position) and hashes fast.
        parent: dict[int, int] = {}

        def root(node: int) -> int:
            top = node
            while parent[top] != top:
                top = parent[top]
            while parent[node] != top:  # path compression keeps later finds short
                parent[node], node = top, parent[node]
            return top

        with self.track_time():
            for path in sorted(self.verified_folder.glob("*.dups")):
                with path.open("rb") as source:
                    for task_a, doc_a, task_b, doc_b in read_tuples_from_file(
                        source, "4I", lines_to_buffer=1024
                    ):
                        a, b = task_a << 32 | doc_a, task_b << 32 | doc_b
                        parent.setdefault(a, a)
                        parent.setdefault(b, b)
                        a, b = root(a), root(b)
                        if a != b:
                            parent[max(a, b)] = min(a, b)  # the earlier document stays the root
            members_by_task: dict[int, list[int]] = {}
            for node in parent:
                members_by_task.setdefault(node >> 32, []).append(node)
            size: dict[int, int] = {}
            for task, members in members_by_task.items():
                copies = self.store.copies(task)
                for node in members:
                    top = root(node)
                    size[top] = size.get(top, 0) + int(copies[node & 0xFFFFFFFF])
            self.output_folder.mkdir(parents=True, exist_ok=True)
            for task in self.store.ranks():
                self._write_task(task, members_by_task.get(task, []), root, size)
            self.stat_update("clusters", value=len(size))
            self.stat_update("to_remove", value=sum(node != root(node) for node in parent))

    def _write_task(self, task: int, members: list[int], root, size: dict[int, int]) -> None:
        """``<task>.remove`` (positions, ascending) and ``<task>.sizes`` (position, size) for every
        document whose size is not 1: cluster members, and documents with exact copies."""
        copies = self.store.copies(task)
        with_copies = np.flatnonzero(copies > 1)
        sizes = dict(zip(with_copies.tolist(), copies[with_copies].tolist(), strict=True))
        removed = []
        for node in members:
            position = node & 0xFFFFFFFF
            sizes[position] = size[root(node)]
            if root(node) != node:
                removed.append(position)
        with (self.output_folder / f"{task:06d}.remove").open("wb") as out:
            out.write(b"".join(struct.pack("<I", position) for position in sorted(removed)))
        with (self.output_folder / f"{task:06d}.sizes").open("wb") as out:
            out.write(b"".join(struct.pack("<II", p, sizes[p]) for p in sorted(sizes)))


def verification_counts(verified_folder: Path) -> dict[str, int]:
    """Candidate pairs proposed by the bands, and how many verification kept and rejected
    (a pair found in several bands counts once per band task that saw it)."""
    total = {"candidates": 0, "verified": 0, "rejected": 0}
    for path in sorted((Path(verified_folder) / "tally").glob("*.json")):
        for key, value in json.loads(path.read_text()).items():
            total[key] += value
    return total
