"""Deduplication on characters: exact (whole text) and MinHash over character n-grams.

datatrove's MinHash splits text into words with a per-language word tokenizer; Japanese has
no spaces, and a morphological analyser would be the slowest step of the pipeline. Here a
shingle is ``ngram`` consecutive characters of the normalised text, hashed with a vectorised
polynomial rolling hash, and the signature is computed in fixed-size chunks so a long
document never needs a (shingles x hashes) matrix in memory.
"""

from __future__ import annotations

import re

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature, _mersenne_prime
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


class CharacterMinhashSignature(MinhashDedupSignature):
    """MinHash signatures over character n-grams, written in datatrove's format for its next steps."""

    name = "minhash_signature"

    def __init__(self, output_folder: str, settings: MinhashSettings):
        super().__init__(
            output_folder, config=minhash_config(settings), language=CharacterTokenizer()
        )

    def get_shingles(self, text: str) -> np.ndarray:
        return character_shingles(text, self.config.n_grams)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        """Per band, the minimum of each hash function over all shingles (computed block-wise)."""
        a, b = self.parameters
        minimum = np.full(self.num_hashes, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, shingles.shape[0], _BLOCK):
                block = (shingles[start : start + _BLOCK] * a + b) % _mersenne_prime
                np.minimum(minimum, block.min(axis=0), out=minimum)
        return [band.tolist() for band in np.split(minimum, self.config.num_buckets)]
