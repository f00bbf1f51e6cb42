"""Character-level scores of Japanese text: pure functions that the quality filter steps compare
with their thresholds.

English-style scores split words on whitespace and look for ASCII punctuation, which Japanese
lacks. These work on characters instead: script fractions (hiragana, katakana, kanji),
sentences ended by 。！？, character n-gram repetition (Gopher's word n-gram rules moved to
characters), lines ending in an ellipsis, and the share of text covered by NG words.

Fractions are of non-whitespace characters unless a docstring says otherwise; "characters"
are Unicode code points.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

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
# Iteration and closing marks written among kanji; JIS X 0208 lists them with its symbols.
_KANJI_MARKS = "\u3005\u3006\u3007"  # 々〆〇
_HIRAGANA_RUNS = re.compile(f"[{_HIRAGANA}]+")
_KATAKANA_RUNS = re.compile(f"[{_KATAKANA}]+")
_KANJI_RUNS = re.compile(f"[{_KANJI}]+")
_JAPANESE_RUNS = re.compile(f"[{_HIRAGANA}{_KATAKANA}{_KANJI}{_JAPANESE_PUNCTUATION}]+")
# 。！？ and the ASCII !? that NFKC makes of ！？; a full stop ． (ASCII after NFKC), as used
# in academic Japanese, ends a sentence only after a non-ASCII character, not in 3.14 or URLs.
_SENTENCE_ENDS = re.compile(r"(?:[。！？!?．]|(?<![\x00-\x7f])\.)+")
_ELLIPSIS_LINE_END = re.compile(r"(?:…|‥|\.\.\.|・・・)[ \t\r\u3000]*$", re.MULTILINE)
# Any odd 64-bit constant with mixed bits makes the polynomial n-gram hash (mod 2^64).
_NGRAM_MULTIPLIER = np.uint64(0x100000001B3)


def without_whitespace(text: str) -> str:
    """The text with every Unicode whitespace character (U+3000 included) removed."""
    return "".join(text.split())


def _run_chars(pattern: re.Pattern[str], text: str) -> int:
    return sum(map(len, pattern.findall(text)))


def character_fractions(text: str) -> dict[str, float]:
    """Shares of Japanese, hiragana and katakana among the non-whitespace characters (0-1),
    and their count (``chars``)."""
    compact = without_whitespace(text)
    if not compact:
        return {
            "chars": 0,
            "japanese_fraction": 0.0,
            "hiragana_fraction": 0.0,
            "katakana_fraction": 0.0,
        }
    total = len(compact)
    return {
        "chars": total,
        "japanese_fraction": _run_chars(_JAPANESE_RUNS, compact) / total,
        "hiragana_fraction": _run_chars(_HIRAGANA_RUNS, compact) / total,
        "katakana_fraction": _run_chars(_KATAKANA_RUNS, compact) / total,
    }


@functools.cache
def _level1_kanji() -> re.Pattern[str]:
    """Runs of JIS X 0208 level-1 kanji (第一水準, 2,965 characters) and 々〆〇.

    Python's EUC-JP codec encodes JIS X 0208 rows 16-47, the level-1 kanji, with a first byte
    of 0xB0-0xCF; the set is read from it once per process (about 20 ms) rather than shipped.
    """
    level1 = []
    for code in range(0x4E00, 0xA000):
        try:
            encoded = chr(code).encode("euc_jp")
        except UnicodeEncodeError:
            continue
        if len(encoded) == 2 and 0xB0 <= encoded[0] <= 0xCF:
            level1.append(chr(code))
    return re.compile(f"[{''.join(level1)}{_KANJI_MARKS}]+")


def level1_kanji_fraction(text: str) -> float:
    """Share of the kanji (CJK ideographs and 々〆〇) that are JIS X 0208 level-1 kanji (0-1);
    0 when the text has no kanji.

    Japanese written without kana uses everyday kanji; Chinese shares the script but not this
    set: simplified forms (们, 这, 华) are in no JIS standard, traditional ones (國, 說, 灣) are
    level 2 at best.
    """
    kanji = _run_chars(_KANJI_RUNS, text)
    return _run_chars(_level1_kanji(), text) / kanji if kanji else 0.0


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
