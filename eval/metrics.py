"""Scores: llm-jp-eval v1.x's generation metrics, and accuracy over log-likelihoods of choices.

Generation (llm-jp-eval v1.3's evaluator): the model's text is cut at the first blank line,
NFKC-normalised and stripped (``normalize_prediction``); the gold answer is NFKC-normalised.

- ``exact_match``: the share of predictions equal to the gold answer.
- ``char_f1``: the mean of ``fuzz.token_sort_ratio(pred, gold) / 100`` as llm-jp-eval v1.x
  computes it with fuzzywuzzy 0.18 backed by python-Levenshtein (its pinned dependencies),
  re-implemented here without either (``token_sort_ratio``).
- ``pearson``, ``spearman``: correlations between the gold numbers and the predictions read by
  llm-jp-eval's ``parse_float`` (digits and dots kept, -2.0 when that is not a number); a NaN
  correlation (constant predictions) counts as 0.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

_NON_WORD = re.compile(r"\W", re.UNICODE)
# fuzzywuzzy's asciidammit on Python 3 deletes exactly the code points 128-255.
_LATIN1 = dict.fromkeys(range(128, 256))
_NOT_NUMBER = re.compile(r"[^0-9.]")


# Where a generated answer ends: the blank line before the next few-shot example.
ANSWER_END = "\n\n"


def normalize_prediction(text: str) -> str:
    """The part of a generation llm-jp-eval scores: before the first blank line, NFKC, stripped."""
    return unicodedata.normalize("NFKC", text.split(ANSWER_END)[0]).strip()


def normalize_gold(text: str) -> str:
    """A gold answer as llm-jp-eval compares it: NFKC."""
    return unicodedata.normalize("NFKC", text)


def exact_match(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Share of predictions equal to their gold answer."""
    return _mean([float(p == g) for p, g in zip(predictions, golds, strict=True)])


def _process_and_sort(text: str) -> str:
    """fuzzywuzzy's full_process (force_ascii) then sorted whitespace tokens joined by one space."""
    text = text.translate(_LATIN1)
    text = _NON_WORD.sub(" ", text).lower().strip()
    return " ".join(sorted(text.split())).strip()


def _longest_common_subsequence(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for char in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if char == other else max(previous[j], current[-1]))
        previous = current
    return previous[-1]


def token_sort_ratio(prediction: str, gold: str) -> int:
    """fuzzywuzzy 0.18 ``fuzz.token_sort_ratio`` with python-Levenshtein: an integer 0-100.

    Both strings: code points 128-255 deleted, every non-word character (Unicode ``\\W``) made a
    space, lower-cased, split on whitespace, tokens sorted and joined by one space. Then equal
    strings score 100 (two empty ones too), one empty string 0, else
    ``round(100 * 2 * LCS / (len(a) + len(b)))`` with Python's round (half to even), where LCS
    is the longest common subsequence of code points (Levenshtein.ratio, the normalised InDel
    similarity).
    """
    a, b = _process_and_sort(prediction), _process_and_sort(gold)
    if a == b:
        return 100
    if not a or not b:
        return 0
    return round(100 * 2 * _longest_common_subsequence(a, b) / (len(a) + len(b)))


def char_f1(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Mean of ``token_sort_ratio / 100`` (llm-jp-eval v1.x's ``char_f1``)."""
    return _mean([token_sort_ratio(p, g) / 100 for p, g in zip(predictions, golds, strict=True)])


def parse_float(text: str) -> float:
    """llm-jp-eval's ``parse_float``: keep digits and dots; -2.0 when the rest is not a number."""
    try:
        return float(_NOT_NUMBER.sub("", str(text)))
    except ValueError:
        return -2.0


def pearson(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Pearson correlation of gold numbers and parsed predictions; NaN counts as 0."""
    from scipy.stats import pearsonr

    return _correlation(pearsonr, predictions, golds)


def spearman(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Spearman rank correlation of gold numbers and parsed predictions; NaN counts as 0."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, predictions, golds)


def _correlation(function, predictions: Sequence[str], golds: Sequence[str]) -> float:
    if len(predictions) < 2:
        return 0.0
    import warnings

    with warnings.catch_warnings():
        # A constant input has no correlation; scipy warns and returns NaN, which counts as 0.
        warnings.simplefilter("ignore")
        value = float(function([float(g) for g in golds], [parse_float(p) for p in predictions])[0])
    return 0.0 if math.isnan(value) else value


GENERATION_METRICS = {
    "exact_match": exact_match,
    "char_f1": char_f1,
    "pearson": pearson,
    "spearman": spearman,
}


def choice_accuracy(
    logliks: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], labels: Sequence[int]
) -> dict[str, float]:
    """``acc``: the highest log-likelihood is the gold choice; ``acc_norm``: the highest per character.

    ``acc_norm`` divides each choice's log-likelihood by its length in characters, as
    lm-evaluation-harness does, so long choices are not penalised for their length alone. Ties
    go to the first choice.
    """
    correct, correct_norm = [], []
    for scores, texts, label in zip(logliks, choices, labels, strict=True):
        correct.append(float(_argmax(scores) == label))
        normed = [score / max(len(text), 1) for score, text in zip(scores, texts, strict=True)]
        correct_norm.append(float(_argmax(normed) == label))
    return {"acc": _mean(correct), "acc_norm": _mean(correct_norm)}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda index: (values[index], -index))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
