"""Japanese quality filters as datatrove steps, one per rule, thresholds chosen per source.

Each step reads its rule from the document's source (``QualityConfig`` in
``data_prep/filter_rules.py``), computes the rule's scores (``data_prep/text_scores.py``),
writes them into ``metadata["filter_scores"][<step name>]`` and names the failing score in
its reason.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from data_prep.filter_rules import (
    CharacterRule,
    EllipsisRule,
    LengthRule,
    NgWordRule,
    QualityConfig,
    RepetitionRule,
    SentenceRule,
)
from data_prep.text_scores import (
    character_fractions,
    duplicate_line_fractions,
    duplicate_ngram_char_fractions,
    duplicate_sentence_fraction,
    ellipsis_line_fraction,
    level1_kanji_fraction,
    load_ng_words,
    ng_char_fraction,
    ng_word_pattern,
    sentence_stats,
    top_ngram_char_fractions,
    without_whitespace,
)

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
    """Too little Japanese (English, code, tables), too little hiragana (Chinese; in a short
    text katakana counts too, and without kana its kanji must be Japanese ones), too much
    katakana."""

    name = "japanese_characters"
    rule = "characters"

    def evaluate(
        self, text: str, rule: CharacterRule, source: str
    ) -> tuple[dict[str, float], str | None]:
        scores = character_fractions(text)
        kana = "hiragana_fraction"
        if scores["chars"] < rule.kana_below_chars:
            kana = "kana_fraction"
            scores[kana] = scores["hiragana_fraction"] + scores["katakana_fraction"]
        kana_reason = _below(kana, scores[kana], rule.min_hiragana_fraction)
        if kana_reason and kana == "kana_fraction":
            # Short Japanese can be kanji only (通称世陸、世界陸上。); the script is Chinese's
            # too, the character set is not. Scored only here, so long texts pay nothing.
            level1 = scores["level1_kanji_fraction"] = level1_kanji_fraction(text)
            kanji_reason = _below("level1_kanji_fraction", level1, rule.min_level1_kanji_fraction)
            kana_reason = kanji_reason and f"{kana_reason}, {kanji_reason}"
        return scores, _first(
            _below("japanese_fraction", scores["japanese_fraction"], rule.min_japanese_fraction),
            kana_reason,
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
