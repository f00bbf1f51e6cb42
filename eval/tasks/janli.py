"""JaNLI: Japanese adversarial NLI (entailment / non-entailment).

Upstream is one file, ``janli.tsv``, whose ``split`` column says train or test; a file that
serves both splits is divided by that column (``eval.data``), one given for a single split is
read whole.
"""

from __future__ import annotations

from eval.tasks.base import Task
from eval.tasks.nli import nli_format
from eval.tasks.readers import read_tsv

LABELS = ("entailment", "non-entailment")

_FORMAT = nli_format(
    "前提と仮説の関係をentailment、non-entailmentの中から回答してください。"
    "それ以外には何も含めないことを厳守してください。\n\n"
    "制約：\n"
    "- 前提に対して仮説が同じ意味を含む場合は、entailmentと出力\n"
    "- 前提に対して仮説が異なる意味を含む場合は、non-entailmentと出力",
    LABELS,
    lambda r: (r[""], r["sentence_A_Ja"], r["sentence_B_Ja"], r["entailment_label_Ja"]),
)

TASK = Task(
    name="janli",
    source="JaNLI (verypluming/JaNLI)",
    license="CC BY-SA 4.0",
    folder="janli",
    files={"train": "janli.tsv", "test": "janli.tsv"},
    read=read_tsv,
    output_length=7,
    metrics=("exact_match",),
    generation=_FORMAT,
    loglik=_FORMAT,
)
