"""Japanese quality filters: character-level rules as datatrove filter steps, thresholds per source.

English-style filters split words on whitespace and look for ASCII punctuation, and remove
nearly all Japanese text. Every rule here works on characters instead: script fractions
(hiragana, katakana, kanji), sentences ended by 。！？, character n-gram repetition (Gopher's
word n-gram rules moved to characters), lines ending in an ellipsis, and the share of text
covered by NG words. Each rule is one step with its own thresholds per source (``PRESETS``
holds the web, Wikipedia and literature settings), writes its scores into
``metadata["filter_scores"][<step name>]`` and names the failing score in its reason.

Fractions are of non-whitespace characters unless a docstring says otherwise; "characters"
are Unicode code points.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from pydantic import Field, field_validator, model_validator

from common.config import Config

NG_WORDS_FILE = Path(__file__).with_name("ng_words_ja.txt")

# Character classes, as runs so that one match covers many characters.
_HIRAGANA = "\u3041-\u309f"  # ぁ-ゟ, with ゝゞ and the combining (semi-)voiced marks
_KATAKANA = "\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff\uff66-\uff9f"  # ァ-ヺ, ー, ヽヾ, ㇰ-ㇿ, ｦ-ﾟ
_KANJI = "\u3005-\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"  # 々〆〇
_JAPANESE_PUNCTUATION = (
    "\u3001-\u3004\u3008-\u303f"  # 、。〃〄 〈〉《》「」『』【】〒〔〕〜
    "\u30a0\u30fb"  # ゠ ・
    "\u2025\u2026\u2015"  # ‥ … ―
    "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"  # full-width ！（），．：？ and ｡｢｣､･
)
_HIRAGANA_RUNS = re.compile(f"[{_HIRAGANA}]+")
_KATAKANA_RUNS = re.compile(f"[{_KATAKANA}]+")
_JAPANESE_RUNS = re.compile(f"[{_HIRAGANA}{_KATAKANA}{_KANJI}{_JAPANESE_PUNCTUATION}]+")
# 。！？ and the ASCII !? that NFKC makes of ！？; a full stop ． (ASCII after NFKC), as used
# in academic Japanese, ends a sentence only after a non-ASCII character, not in 3.14 or URLs.
_SENTENCE_ENDS = re.compile(r"(?:[。！？!?．]|(?<![\x00-\x7f])\.)+")
_ELLIPSIS_LINE_END = re.compile(r"(?:…|‥|\.\.\.|・・・)[ \t\r\u3000]*$", re.MULTILINE)
# Any odd 64-bit constant with mixed bits makes the polynomial n-gram hash (mod 2^64).
_NGRAM_MULTIPLIER = np.uint64(0x100000001B3)


# ---------------------------------------------------------------------------------------
# Rule configs
# ---------------------------------------------------------------------------------------


class LengthRule(Config):
    """Document length; checked first, so that a huge document costs nothing more."""

    enabled: bool = True
    min_chars: int = Field(ge=0, description="Fewest characters a document may have (code points)")
    max_chars: int = Field(
        ge=1,
        description="Most characters a document may have (code points); longer ones are "
        "rejected before any other rule reads them",
    )

    @model_validator(mode="after")
    def _ordered(self) -> LengthRule:
        if self.min_chars > self.max_chars:
            raise ValueError(
                f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars}); "
                "lower min_chars or raise max_chars"
            )
        return self


class CharacterRule(Config):
    """Which scripts a document is written in: catches non-Japanese text and script spam."""

    enabled: bool = True
    min_japanese_fraction: float = Field(
        ge=0,
        le=1,
        description="Least share of hiragana + katakana + kanji + Japanese punctuation "
        "among non-whitespace characters (0-1); catches English, code and number tables",
    )
    min_hiragana_fraction: float = Field(
        ge=0,
        le=1,
        description="Least share of hiragana among non-whitespace characters (0-1); catches "
        "Chinese and kanji-only lists, which pass the Japanese share",
    )
    max_katakana_fraction: float = Field(
        ge=0,
        le=1,
        description="Largest share of katakana (with ー) among non-whitespace characters (0-1); "
        "catches katakana-only keyword spam",
    )


class RepetitionRule(Config):
    """Repeated lines, sentences and character n-grams (Gopher's rules, on characters)."""

    enabled: bool = True
    max_duplicate_line_fraction: float = Field(
        ge=0,
        le=1,
        description="Largest share of non-empty lines that repeat an earlier line (0-1)",
    )
    max_duplicate_line_char_fraction: float = Field(
        ge=0,
        le=1,
        description="Largest share of line characters inside lines that repeat an earlier line (0-1)",
    )
    max_duplicate_sentence_fraction: float = Field(
        ge=0,
        le=1,
        description="Largest share of sentences (see SentenceRule) that repeat an earlier one (0-1)",
    )
    max_top_ngram_char_fraction: dict[int, float] = Field(
        description="Per n (characters): largest share of non-whitespace characters covered by "
        "the most frequent character n-gram, counted when it occurs at least twice (0-1)"
    )
    max_duplicate_ngram_char_fraction: dict[int, float] = Field(
        description="Per n (characters): largest share of non-whitespace characters covered by "
        "character n-grams that occur more than once (0-1)"
    )
    ngram_min_chars: int = Field(
        ge=0,
        description="Documents with fewer non-whitespace characters skip the n-gram checks "
        "(and their scores): in a few dozen characters one repeated word is already a large "
        "share",
    )

    @field_validator("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction")
    @classmethod
    def _valid_ngrams(cls, thresholds: dict[int, float]) -> dict[int, float]:
        for n, fraction in thresholds.items():
            if n < 1:
                raise ValueError(f"n-gram size {n} must be at least 1 character")
            if not 0 <= fraction <= 1:
                raise ValueError(f"threshold {fraction} for {n}-grams must be between 0 and 1")
        return dict(sorted(thresholds.items()))


class SentenceRule(Config):
    """Sentence lengths measured between 。！？!? (line breaks do not count), so a page with no
    sentence end is one long sentence."""

    enabled: bool = True
    min_sentences: int = Field(ge=0, description="Fewest sentences a document may have")
    max_mean_sentence_chars: float = Field(
        gt=0, description="Largest mean sentence length (non-whitespace characters)"
    )
    max_sentence_chars: int = Field(
        gt=0,
        description="Longest sentence allowed (non-whitespace characters); catches run-on pages",
    )


class EllipsisRule(Config):
    """Lines cut off with an ellipsis: snippet lists, truncated feeds and teasers."""

    enabled: bool = True
    max_ellipsis_line_fraction: float = Field(
        ge=0,
        le=1,
        description="Largest share of non-empty lines ending in …, ‥, ... or ・・・ (0-1)",
    )


class NgWordRule(Config):
    """Density of spam, adult, gambling and scam vocabulary."""

    enabled: bool = True
    max_ng_char_fraction: float = Field(
        ge=0,
        le=1,
        description="Largest share of all characters (whitespace included) covered by NG-word "
        "matches (0-1)",
    )
    word_list: Path | None = Field(
        None,
        description="UTF-8 file, one word per line, '#' comments; None: data_prep/ng_words_ja.txt",
    )

    @field_validator("word_list")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(
                f"NG-word list {path} not found; give an existing file or null for the bundled list"
            )
        return path


class QualityConfig(Config):
    """Every quality rule's thresholds for one source."""

    length: LengthRule
    characters: CharacterRule
    repetition: RepetitionRule
    sentences: SentenceRule
    ellipsis: EllipsisRule
    ng_words: NgWordRule


# Gopher's word 2-gram threshold (Rae et al. 2021) for every n: a character 3- or 4-gram is
# about one Japanese word (レーザー), not a phrase, so Gopher's lower 3- and 4-gram values would
# remove pages that merely stay on topic.
_TOP_NGRAMS = {2: 0.20, 3: 0.20, 4: 0.20}
# Character n-grams repeat far more than word n-grams: on real web pages the share of characters
# in repeated 5-grams has a median of 0.24 and a 95th percentile of 0.50, so Gopher's 0.15-0.10
# would remove most of them. These sit at the top of the real distribution; a page made of
# a few repeated sentences scores above 0.9.
_DUPLICATE_NGRAMS = {5: 0.60, 7: 0.50, 10: 0.40}
# Web pages and encyclopedia articles repeat themselves alike; literature differs (below).
_PROSE_REPETITION = RepetitionRule(
    max_duplicate_line_fraction=0.30,
    max_duplicate_line_char_fraction=0.20,
    max_duplicate_sentence_fraction=0.30,
    max_top_ngram_char_fraction=_TOP_NGRAMS,
    max_duplicate_ngram_char_fraction=_DUPLICATE_NGRAMS,
    ngram_min_chars=200,
)

PRESETS: dict[str, QualityConfig] = {
    # Strict, for mC4-like web pages; calibrated so that real FineWeb-2 pages pass.
    "web": QualityConfig(
        length=LengthRule(min_chars=200, max_chars=100_000),
        characters=CharacterRule(
            min_japanese_fraction=0.50, min_hiragana_fraction=0.15, max_katakana_fraction=0.50
        ),
        repetition=_PROSE_REPETITION,
        sentences=SentenceRule(
            min_sentences=3, max_mean_sentence_chars=150, max_sentence_chars=400
        ),
        ellipsis=EllipsisRule(max_ellipsis_line_fraction=0.30),
        ng_words=NgWordRule(max_ng_char_fraction=0.03),
    ),
    # Relaxed: long encyclopedic sentences, katakana names and loanwords, one-line stubs.
    "wikipedia": QualityConfig(
        length=LengthRule(min_chars=10, max_chars=1_000_000),
        characters=CharacterRule(
            min_japanese_fraction=0.40, min_hiragana_fraction=0.05, max_katakana_fraction=0.80
        ),
        repetition=_PROSE_REPETITION,
        sentences=SentenceRule(
            min_sentences=1, max_mean_sentence_chars=300, max_sentence_chars=1000
        ),
        ellipsis=EllipsisRule(max_ellipsis_line_fraction=0.30),
        ng_words=NgWordRule(max_ng_char_fraction=0.15),
    ),
    # Aozora Bunko: whole works (long), dialogue in 「」, verse with refrains and many short
    # lines, ――― rules between sections, old kana usage and katakana-style prose (雨ニモマケズ).
    "literature": QualityConfig(
        length=LengthRule(min_chars=20, max_chars=2_000_000),
        characters=CharacterRule(
            min_japanese_fraction=0.70, min_hiragana_fraction=0.0, max_katakana_fraction=0.80
        ),
        repetition=RepetitionRule(
            max_duplicate_line_fraction=0.50,
            max_duplicate_line_char_fraction=0.50,
            max_duplicate_sentence_fraction=0.40,
            # Verse refrains and ――― rules reach 0.75 and 0.34 in real works; a file holding
            # the same work twice, or an extraction loop, is close to 1.
            max_top_ngram_char_fraction={2: 0.40, 3: 0.40, 4: 0.40},
            max_duplicate_ngram_char_fraction={5: 0.90, 7: 0.85, 10: 0.80},
            ngram_min_chars=200,
        ),
        # Classical prose (Higuchi Ichiyō) and verse run thousands of characters without 。.
        sentences=SentenceRule(
            enabled=False, min_sentences=1, max_mean_sentence_chars=300, max_sentence_chars=3000
        ),
        ellipsis=EllipsisRule(max_ellipsis_line_fraction=0.50),
        ng_words=NgWordRule(max_ng_char_fraction=0.05),
    ),
}


# ---------------------------------------------------------------------------------------
# Scores: pure functions of the text
# ---------------------------------------------------------------------------------------


def without_whitespace(text: str) -> str:
    """The text with every Unicode whitespace character (U+3000 included) removed."""
    return "".join(text.split())


def _run_chars(pattern: re.Pattern[str], text: str) -> int:
    return sum(map(len, pattern.findall(text)))


def character_fractions(text: str) -> dict[str, float]:
    """Shares of Japanese, hiragana and katakana among the non-whitespace characters (0-1)."""
    compact = without_whitespace(text)
    if not compact:
        return {"japanese_fraction": 0.0, "hiragana_fraction": 0.0, "katakana_fraction": 0.0}
    total = len(compact)
    return {
        "japanese_fraction": _run_chars(_JAPANESE_RUNS, compact) / total,
        "hiragana_fraction": _run_chars(_HIRAGANA_RUNS, compact) / total,
        "katakana_fraction": _run_chars(_KATAKANA_RUNS, compact) / total,
    }


def duplicate_line_fractions(text: str) -> tuple[float, float]:
    """(share of non-empty lines repeating an earlier line, share of line characters in them)."""
    lines = [line for line in map(str.strip, text.splitlines()) if line]
    if not lines:
        return 0.0, 0.0
    counts = Counter(lines)
    repeats = len(lines) - len(counts)
    repeated_chars = sum(len(line) * (count - 1) for line, count in counts.items() if count > 1)
    return repeats / len(lines), repeated_chars / sum(map(len, lines))


def sentences(text: str) -> list[str]:
    """Sentences: whitespace-free text split at 。！？!? and a full stop after a non-ASCII character;
    an unterminated last piece counts, and line breaks do not end a sentence."""
    return [piece for piece in _SENTENCE_ENDS.split(without_whitespace(text)) if piece]


def duplicate_sentence_fraction(text: str) -> float:
    """Share of sentences that repeat an earlier sentence (0-1)."""
    pieces = sentences(text)
    if not pieces:
        return 0.0
    return (len(pieces) - len(set(pieces))) / len(pieces)


def sentence_stats(text: str) -> dict[str, float]:
    """Number of sentences, their mean and largest length (non-whitespace characters)."""
    lengths = list(map(len, sentences(text)))
    if not lengths:
        return {"sentences": 0, "mean_sentence_chars": 0.0, "max_sentence_chars": 0}
    return {
        "sentences": len(lengths),
        "mean_sentence_chars": sum(lengths) / len(lengths),
        "max_sentence_chars": max(lengths),
    }


def _ngram_hashes(codes: np.ndarray, n: int) -> np.ndarray:
    """64-bit polynomial hash of every n-gram of ``codes`` (length len(codes) - n + 1).

    Exact for n <= 2; for longer n two different n-grams of a 100,000-character document
    collide with probability about 1e-9, far below what moves a score.
    """
    count = len(codes) - n + 1
    hashes = codes[:count].copy()
    for offset in range(1, n):
        hashes *= _NGRAM_MULTIPLIER
        hashes += codes[offset : offset + count]
    return hashes


def _covered_fraction(starts: np.ndarray, n: int, length: int) -> float:
    """Share of ``length`` positions covered by n-grams starting where ``starts`` is True."""
    # started[j] counts n-gram starts before position j; position i is covered when a start
    # lies in [i - n + 1, i], i.e. when started[i + 1] differs from started[i - n + 1].
    started = np.zeros(length + 1, dtype=np.int64)
    np.cumsum(starts, out=started[1 : len(starts) + 1])
    started[len(starts) + 1 :] = started[len(starts)]
    covered = np.count_nonzero(started[1:n]) + np.count_nonzero(started[n:] != started[:-n])
    return int(covered) / length  # a Python float, which JSON writers take as it is


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(without_whitespace(text).encode("utf-32-le"), dtype=np.uint32).astype(
        np.uint64
    )


def top_ngram_char_fractions(text: str, sizes: Iterable[int]) -> dict[int, float]:
    """Per n: share of non-whitespace characters covered by the most frequent character n-gram.

    0 when no n-gram occurs twice; overlapping occurrences (ああああ) are counted once per character.
    """
    codes = _codes(text)
    fractions: dict[int, float] = {}
    for n in sizes:
        if len(codes) <= n:  # fewer than two n-grams
            fractions[n] = 0.0
            continue
        hashes = _ngram_hashes(codes, n)
        ordered = np.sort(hashes)
        run_starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        run_lengths = np.diff(np.append(run_starts, len(ordered)))
        top = int(run_lengths.argmax())
        if run_lengths[top] < 2:
            fractions[n] = 0.0
            continue
        fractions[n] = _covered_fraction(hashes == ordered[run_starts[top]], n, len(codes))
    return fractions


def duplicate_ngram_char_fractions(text: str, sizes: Iterable[int]) -> dict[int, float]:
    """Per n: share of non-whitespace characters inside character n-grams occurring more than once."""
    codes = _codes(text)
    fractions: dict[int, float] = {}
    for n in sizes:
        if len(codes) <= n:  # fewer than two n-grams
            fractions[n] = 0.0
            continue
        hashes = _ngram_hashes(codes, n)
        order = np.argsort(hashes)
        ordered = hashes[order]
        same_as_next = ordered[1:] == ordered[:-1]
        repeated_in_order = np.zeros(len(hashes), dtype=bool)
        repeated_in_order[1:] = same_as_next
        repeated_in_order[:-1] |= same_as_next
        repeated = np.empty_like(repeated_in_order)
        repeated[order] = repeated_in_order
        fractions[n] = _covered_fraction(repeated, n, len(codes))
    return fractions


def ellipsis_line_fraction(text: str) -> float:
    """Share of non-empty lines ending in …, ‥, ... or ・・・ (trailing spaces ignored), 0-1."""
    lines = sum(1 for line in text.splitlines() if line.strip())
    if not lines:
        return 0.0
    return len(_ELLIPSIS_LINE_END.findall(text)) / lines


def load_ng_words(path: Path | None = None) -> list[str]:
    """The words of an NG-word list (one per line, '#' comments); None reads the bundled list."""
    path = NG_WORDS_FILE if path is None else Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"NG-word list {path} not found; fix filters.ng_words.word_list") from None
    except UnicodeDecodeError:
        raise ValueError(f"NG-word list {path} is not UTF-8; save it as UTF-8") from None
    words = [line.split("#", 1)[0].strip() for line in content.splitlines()]
    words = list(dict.fromkeys(word for word in words if word))
    if not words:
        raise ValueError(f"NG-word list {path} has no words; add one word per line")
    return words


def ng_word_pattern(words: Iterable[str]) -> re.Pattern[str]:
    """One alternation of the words, longest first so that a longer word wins over its prefix."""
    return re.compile("|".join(map(re.escape, sorted(set(words), key=lambda w: (-len(w), w)))))


def ng_char_fraction(text: str, pattern: re.Pattern[str]) -> float:
    """Share of all characters (whitespace included) covered by non-overlapping NG-word matches."""
    if not text:
        return 0.0
    return _run_chars(pattern, text) / len(text)


# ---------------------------------------------------------------------------------------
# datatrove steps
# ---------------------------------------------------------------------------------------


Verdict = bool | tuple[bool, str]


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def _above(name: str, value: float, limit: float) -> str | None:
    return f"{name} {_number(value)} > {_number(limit)}" if value > limit else None


def _below(name: str, value: float, limit: float) -> str | None:
    return f"{name} {_number(value)} < {_number(limit)}" if value < limit else None


def _first(*reasons: str | None) -> str | None:
    return next((reason for reason in reasons if reason), None)


class QualityFilter(BaseFilter):
    """One rule of ``QualityConfig`` as a datatrove filter, thresholds chosen by ``metadata["source"]``."""

    rule: ClassVar[str]  # the QualityConfig field this step reads

    def __init__(
        self,
        rules_by_source: Mapping[str, QualityConfig],
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(exclusion_writer)
        self.rules_by_source = dict(rules_by_source)

    def rule_for(self, doc: Document) -> Any:
        """This step's rule for the document's source; a clear error for an unknown source."""
        source = doc.metadata.get("source")
        try:
            config = self.rules_by_source[source]
        except (KeyError, TypeError):
            known = ", ".join(sorted(map(str, self.rules_by_source))) or "none"
            raise ValueError(
                f"document {doc.id!r} has source {source!r}, which has no quality rules "
                f"(known sources: {known}); tag documents with a configured source name"
            ) from None
        return getattr(config, self.rule)

    def filter(self, doc: Document) -> Verdict:
        rule = self.rule_for(doc)
        if not rule.enabled:
            return True
        scores, reason = self.evaluate(doc.text, rule, doc.metadata.get("source"))
        doc.metadata.setdefault("filter_scores", {})[self.name] = {
            key: round(value, 4) if isinstance(value, float) else value
            for key, value in scores.items()
        }
        return (False, reason) if reason else True

    @abstractmethod
    def evaluate(self, text: str, rule: Any, source: str) -> tuple[dict[str, float], str | None]:
        """The rule's scores for ``text`` and why they fail it (failing score first), or None."""

    def stat_update(self, *labels: str, value: int = 1, unit: str | None = None) -> None:
        # Reasons carry the measured value, and datatrove keeps one stat per distinct reason:
        # count removals per failing score instead, so the stats stay a handful of keys.
        labels = tuple(
            label.split(" ", 1)[0] if label.startswith("dropped_") else label for label in labels
        )
        super().stat_update(*labels, value=value, unit=unit)


class LengthFilter(QualityFilter):
    """Empty, too short and too long documents; the too-long check reads only ``len``."""

    name = "length"
    rule = "length"

    def evaluate(
        self, text: str, rule: LengthRule, source: str
    ) -> tuple[dict[str, float], str | None]:
        chars = len(text)
        scores = {"chars": chars}
        # Too long comes first so that a 50 MB document leaves without being scanned.
        if chars > rule.max_chars:
            return scores, f"too_long {chars} chars > {rule.max_chars}"
        if not text.strip():
            return scores, "empty text (no non-whitespace character)"
        if chars < rule.min_chars:
            return scores, f"too_short {chars} chars < {rule.min_chars}"
        return scores, None


class CharacterFilter(QualityFilter):
    """Too little Japanese (English, code, tables), too little hiragana (Chinese), too much katakana."""

    name = "japanese_characters"
    rule = "characters"

    def evaluate(
        self, text: str, rule: CharacterRule, source: str
    ) -> tuple[dict[str, float], str | None]:
        scores = character_fractions(text)
        return scores, _first(
            _below("japanese_fraction", scores["japanese_fraction"], rule.min_japanese_fraction),
            _below("hiragana_fraction", scores["hiragana_fraction"], rule.min_hiragana_fraction),
            _above("katakana_fraction", scores["katakana_fraction"], rule.max_katakana_fraction),
        )


class RepetitionFilter(QualityFilter):
    """Repeated lines, sentences and character n-grams."""

    name = "repetition"
    rule = "repetition"

    def evaluate(
        self, text: str, rule: RepetitionRule, source: str
    ) -> tuple[dict[str, float], str | None]:
        line_fraction, line_char_fraction = duplicate_line_fractions(text)
        scores: dict[str, float] = {
            "duplicate_line_fraction": line_fraction,
            "duplicate_line_char_fraction": line_char_fraction,
            "duplicate_sentence_fraction": duplicate_sentence_fraction(text),
        }
        limits = {
            "duplicate_line_fraction": rule.max_duplicate_line_fraction,
            "duplicate_line_char_fraction": rule.max_duplicate_line_char_fraction,
            "duplicate_sentence_fraction": rule.max_duplicate_sentence_fraction,
        }
        # Below ngram_min_chars the n-gram shares are noise (one repeated word is 20% of a
        # 20-character stub), so they are neither checked nor computed.
        if len(without_whitespace(text)) >= rule.ngram_min_chars:
            top = top_ngram_char_fractions(text, rule.max_top_ngram_char_fraction)
            repeated = duplicate_ngram_char_fractions(text, rule.max_duplicate_ngram_char_fraction)
            for n, limit in rule.max_top_ngram_char_fraction.items():
                scores[f"top_{n}gram_char_fraction"] = top[n]
                limits[f"top_{n}gram_char_fraction"] = limit
            for n, limit in rule.max_duplicate_ngram_char_fraction.items():
                scores[f"duplicate_{n}gram_char_fraction"] = repeated[n]
                limits[f"duplicate_{n}gram_char_fraction"] = limit
        return scores, _first(*(_above(key, scores[key], limit) for key, limit in limits.items()))


class SentenceFilter(QualityFilter):
    """Too few sentences, or sentences too long on average or at most (run-on text)."""

    name = "sentence_length"
    rule = "sentences"

    def evaluate(
        self, text: str, rule: SentenceRule, source: str
    ) -> tuple[dict[str, float], str | None]:
        scores = sentence_stats(text)
        return scores, _first(
            _above("max_sentence_chars", scores["max_sentence_chars"], rule.max_sentence_chars),
            _above(
                "mean_sentence_chars", scores["mean_sentence_chars"], rule.max_mean_sentence_chars
            ),
            _below("sentences", scores["sentences"], rule.min_sentences),
        )


class EllipsisFilter(QualityFilter):
    """Many lines cut off with an ellipsis."""

    name = "ellipsis_lines"
    rule = "ellipsis"

    def evaluate(
        self, text: str, rule: EllipsisRule, source: str
    ) -> tuple[dict[str, float], str | None]:
        fraction = ellipsis_line_fraction(text)
        return {"ellipsis_line_fraction": fraction}, _above(
            "ellipsis_line_fraction", fraction, rule.max_ellipsis_line_fraction
        )


class NgWordFilter(QualityFilter):
    """Spam, adult, gambling and scam vocabulary covering too much of the text."""

    name = "ng_words"
    rule = "ng_words"

    def __init__(
        self,
        rules_by_source: Mapping[str, QualityConfig],
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(rules_by_source, exclusion_writer)
        # Lists are read here, when the pipeline is built, so that a bad path fails at once.
        by_file: dict[Path | None, re.Pattern[str]] = {}
        self.patterns: dict[str, re.Pattern[str]] = {}
        for source, config in self.rules_by_source.items():
            path = config.ng_words.word_list
            if config.ng_words.enabled:
                if path not in by_file:
                    by_file[path] = ng_word_pattern(load_ng_words(path))
                self.patterns[source] = by_file[path]

    def evaluate(
        self, text: str, rule: NgWordRule, source: str
    ) -> tuple[dict[str, float], str | None]:
        fraction = ng_char_fraction(text, self.patterns[source])
        return {"ng_char_fraction": fraction}, _above(
            "ng_char_fraction", fraction, rule.max_ng_char_fraction
        )


# Length first, so that nothing else reads an oversized document; then whether the text is
# Japanese at all, before the rules that assume it is; the costly n-gram counts last.
STEP_ORDER: tuple[type[QualityFilter], ...] = (
    LengthFilter,
    CharacterFilter,
    EllipsisFilter,
    SentenceFilter,
    NgWordFilter,
    RepetitionFilter,
)


def quality_steps(
    rules_by_source: Mapping[str, QualityConfig],
    exclusion_writer_for: Callable[[str], DiskWriter | None],
) -> list[QualityFilter]:
    """Every rule as a datatrove step, in pipeline order; removed documents go to
    ``exclusion_writer_for(step name)`` (None: not written)."""
    return [step(rules_by_source, exclusion_writer_for(step.name)) for step in STEP_ORDER]
