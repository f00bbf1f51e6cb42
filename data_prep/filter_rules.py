"""The quality rules' typed thresholds: one config per rule, ``QualityConfig`` for one source.

Each rule is checked by one filter step (``data_prep/filter_steps.py``). The values a source
starts from, and why, are its preset's (``data_prep/presets/*.yaml``, read by
``data_prep/source_presets.py``); these classes hold no defaults for thresholds, so a preset
must give every one.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from common.config import Config


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
    kana_below_chars: int = Field(
        ge=0,
        description="Documents with fewer non-whitespace characters meet min_hiragana_fraction "
        "with hiragana and katakana together (kana_fraction), or failing that with kanji alone "
        "(min_level1_kanji_fraction): a one-line lead of names and loanwords (JRNフルネット局。) "
        "or of kanji terms (通称世陸、世界陸上。) is Japanese without hiragana, a long text "
        "without any is a list",
    )
    min_level1_kanji_fraction: float = Field(
        ge=0,
        le=1,
        description="A document under kana_below_chars without enough kana is Japanese when at "
        "least this share of its kanji are JIS X 0208 level-1 kanji (0-1); Chinese written in "
        "simplified (们, 华) or traditional (國, 說) forms falls below",
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
