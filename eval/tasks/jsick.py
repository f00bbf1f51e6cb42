"""JSICK: Japanese SICK, entailment between image-caption sentences (three labels)."""

from __future__ import annotations

from eval.tasks.base import Task
from eval.tasks.nli import nli_format
from eval.tasks.readers import read_tsv

LABELS = ("entailment", "contradiction", "neutral")

_FORMAT = nli_format(
    "前提と仮説の関係をentailment、contradiction、neutralの中から回答してください。"
    "それ以外には何も含めないことを厳守してください。\n\n"
    "制約：\n"
    "- 前提が真であるとき仮説が必ず真になる場合はentailmentと出力\n"
    "- 前提が真であるとき仮説が必ず偽になる場合はcontradictionと出力\n"
    "- そのいずれでもない場合はneutralと出力",
    LABELS,
    lambda r: (r["pair_ID"], r["sentence_A_Ja"], r["sentence_B_Ja"], r["entailment_label_Ja"]),
)

TASK = Task(
    name="jsick",
    source="JSICK (verypluming/JSICK)",
    license="CC BY-SA 4.0",
    folder="jsick",
    files={"train": "train.tsv", "test": "test.tsv"},
    read=read_tsv,
    output_length=3,
    metrics=("exact_match",),
    generation=_FORMAT,
    loglik=_FORMAT,
)
