"""Character n-gram MinHash: shingles, signatures and the similarity they detect, on real Japanese text."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

from data_prep.config import MinhashSettings
from data_prep.dedup import CharacterMinhashSignature, ShingleStore, character_shingles
from data_prep.dedup import jaccard as shingle_jaccard


@pytest.fixture
def leads(shared_data) -> list[str]:
    with gzip.open(
        shared_data / "corpus" / "wikipedia_ja_leads.jsonl.gz", "rt", encoding="utf-8"
    ) as handle:
        return [json.loads(line)["text"] for line in handle]


def jaccard(a: str, b: str, n: int = 5) -> float:
    x = {a[i : i + n] for i in range(len(a) - n + 1)}
    y = {b[i : i + n] for i in range(len(b) - n + 1)}
    return len(x & y) / len(x | y)


def test_shingles_are_distinct_character_ngrams():
    text = "すもももももももものうち"
    shingles = character_shingles(text, 3)
    assert shingles.shape == (len({text[i : i + 3] for i in range(len(text) - 2)}), 1)
    assert shingles.dtype == np.uint64
    assert character_shingles("", 5).shape == (0, 1)
    assert character_shingles("短い", 5).shape == (1, 1)  # shorter than n: one shingle
    assert not np.array_equal(character_shingles("東京都", 2), character_shingles("京都府", 2))


def test_block_signature_equals_the_direct_formula(tmp_path, leads):
    step = CharacterMinhashSignature(str(tmp_path), MinhashSettings())
    text = "".join(leads[:300])  # ~15k characters: more shingles than one block
    shingles = step.get_shingles(text)
    assert shingles.shape[0] > 8192
    a, b = step.parameters
    with np.errstate(over="ignore"):
        direct = (shingles * (a | np.uint64(1)) + b).min(axis=0)  # odd a: a bijection mod 2^64
    expected = [band.tolist() for band in np.split(direct, step.config.num_buckets)]
    assert step.get_signature(shingles) == expected
    assert isinstance(step, MinhashDedupSignature)


def test_signatures_find_near_copies_and_separate_distinct_documents(tmp_path, leads):
    settings = MinhashSettings()
    step = CharacterMinhashSignature(str(tmp_path), settings)
    original = max(leads, key=len)
    edited = original[:40] + "、そして" + original[44:-3] + "である。"  # a few characters changed
    other = sorted(leads, key=len)[-2]
    similarity = jaccard(original, edited)
    assert similarity > settings.threshold

    def bands(text):
        return step.get_signature(step.get_shingles(text))

    shared_with_copy = sum(x == y for x, y in zip(bands(original), bands(edited), strict=True))
    shared_with_other = sum(x == y for x, y in zip(bands(original), bands(other), strict=True))
    assert shared_with_copy >= 1 and shared_with_other == 0


def test_threshold_and_detection_probability():
    settings = MinhashSettings(bands=14, rows=8)
    assert settings.threshold == pytest.approx((1 / 14) ** (1 / 8))
    assert settings.detection_probability(0.9) > 0.99
    assert settings.detection_probability(0.5) < 0.06


def test_stored_shingles_give_the_true_jaccard_and_short_texts_no_signature(tmp_path, leads):
    settings = MinhashSettings(min_chars=100)
    step = CharacterMinhashSignature(str(tmp_path), settings)
    texts = [max(leads, key=len), sorted(leads, key=len)[-2], min(leads, key=len)]
    texts.append(texts[0][:200] + "そして" + texts[0][203:])
    writer = step.store.writer(3)
    step._writer = writer
    shingles = [step.get_shingles(text) for text in texts]
    writer.close()
    assert len(texts[2]) < 100 and shingles[2].size == 0  # left to exact dedup
    store = ShingleStore(tmp_path / "shingles")
    for i, j in ((0, 1), (0, 3)):
        assert shingle_jaccard(store.shingles(3, i), store.shingles(3, j)) == pytest.approx(
            jaccard(texts[i], texts[j]), abs=1e-6
        )
    assert store.shingles(3, 2).size == 0
