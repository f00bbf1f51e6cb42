"""JSTS: semantic similarity of a sentence pair on a 0-5 scale (JGLUE), generation only.

The gold answer is the label as JGLUE writes it (``3.8``); predictions are read as numbers by
llm-jp-eval's ``parse_float`` and scored with Pearson and Spearman correlations.
"""

from __future__ import annotations

from typing import Any

from eval.tasks.base import LLM_JP_EVAL, PromptFormat, Sample, Task
from eval.tasks.readers import read_json_lines


def _pair(record: dict[str, Any]) -> Sample:
    return Sample(
        id=str(record["sentence_pair_id"]),
        input=f"文1：{record['sentence1']}\n文2：{record['sentence2']}",
        output=str(record["label"]),
    )


TASK = Task(
    name="jsts",
    source="JGLUE v1.3 JSTS",
    folder="jglue",
    license="CC BY-SA 4.0",
    files={"train": "jsts-train.json", "test": "jsts-valid.json"},
    read=read_json_lines,
    output_length=3,
    metrics=("pearson", "spearman"),
    generation=PromptFormat(
        version=LLM_JP_EVAL,
        instruction=(
            "日本語の文ペアの意味がどのくらい近いかを判定し、類似度を0.0〜5.0までの間の値で付与してください。"
            "0.0に近いほど文ペアの意味が異なり、5.0に近いほど文ペアの意味が似ていることを表しています。"
            "整数値のみを返し、それ以外には何も含めないことを厳守してください。"
        ),
        render=_pair,
    ),
)
