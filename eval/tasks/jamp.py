"""Jamp: controlled Japanese temporal NLI (three labels)."""

from __future__ import annotations

from eval.tasks.base import Task
from eval.tasks.nli import nli_format
from eval.tasks.readers import read_tsv

LABELS = ("entailment", "contradiction", "neutral")

_FORMAT = nli_format(
    "前提と仮説の関係をentailment、contradiction、neutralの中から回答してください。"
    "それ以外には何も含めないことを厳守してください。\n\n"
    "制約：\n"
    "- 前提から仮説が、時間関係上導出可能である場合はentailmentと出力\n"
    "- 前提と仮説が両立しえない場合はcontradictionと出力\n"
    "- そのいずれでもない場合はneutralと出力",
    LABELS,
    lambda r: (r["num"], r["premise"], r["hypothesis"], r["gold_label"]),
)

TASK = Task(
    name="jamp",
    source="Jamp (tomo-ut/temporalNLI_dataset)",
    license="CC BY-SA 4.0",
    folder="jamp",
    files={"train": "train_all.tsv", "test": "test_2.tsv"},
    read=read_tsv,
    output_length=3,
    metrics=("exact_match",),
    generation=_FORMAT,
    loglik=_FORMAT,
)
