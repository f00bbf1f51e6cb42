"""JNLI: natural language inference between a premise and a hypothesis (JGLUE).

llm-jp-eval v1.3's instruction asks for one of three English labels; log-likelihood scores the
same three labels after the same prompt, so both modes read an identical prompt.
"""

from __future__ import annotations

from typing import Any

from eval.tasks.base import LLM_JP_EVAL, PromptFormat, Sample, Task
from eval.tasks.readers import read_json_lines

LABELS = ("entailment", "contradiction", "neutral")


def _pair(record: dict[str, Any]) -> Sample:
    return Sample(
        id=str(record["sentence_pair_id"]),
        input=f"前提：{record['sentence1']}\n仮説：{record['sentence2']}",
        output=str(record["label"]),
        choices=LABELS,
    )


_FORMAT = PromptFormat(
    version=LLM_JP_EVAL,
    instruction=(
        "前提と仮説の関係をentailment、contradiction、neutralの中から回答してください。"
        "それ以外には何も含めないことを厳守してください。\n\n"
        "制約：\n"
        "- 前提から仮説が、論理的知識や常識的知識を用いて導出可能である場合はentailmentと出力\n"
        "- 前提と仮説が両立しえない場合はcontradictionと出力\n"
        "- そのいずれでもない場合はneutralと出力"
    ),
    render=_pair,
)

TASK = Task(
    name="jnli",
    source="JGLUE v1.3 JNLI",
    folder="jglue",
    license="CC BY-SA 4.0",
    files={"train": "jnli-train.json", "test": "jnli-valid.json"},
    read=read_json_lines,
    output_length=3,
    metrics=("exact_match",),
    generation=_FORMAT,
    loglik=_FORMAT,
)
