"""MAWPS-ja: arithmetic word problems; the answer is the number, scored by exact match.

The few-shot examples are upstream's eight ``shot_example.json`` problems, whose text is
``問題：…\\n解答：<chain of thought>…答えは<N>です。``: the question is the part before
``\\n解答：`` and, because the instruction asks for the number only, the answer is N.
"""

from __future__ import annotations

import re
from typing import Any

from eval.tasks.base import LLM_JP_EVAL, PromptFormat, Sample, Task
from eval.tasks.readers import read_json_array

QA_DELIMITER = "\n解答："
_FINAL_ANSWER = re.compile(r"答えは\s*([-0-9.,]+)\s*です")


def _render(record: dict[str, Any]) -> Sample:
    if "shot_example" in record:
        text = str(record["shot_example"])
        question, _, reasoning = text.partition(QA_DELIMITER)
        found = _FINAL_ANSWER.findall(reasoning)
        if not found:
            raise ValueError("a shot example needs a final 答えは<N>です")
        return Sample(id=question[:20], input=question, output=found[-1].replace(",", ""))
    question = str(record["question"]).split(QA_DELIMITER)[0]
    return Sample(id=str(record["idx"]), input=question, output=str(record["answer"]).strip())


TASK = Task(
    name="mawps",
    source="MAWPS-ja (nlp-waseda/chain-of-thought-ja-dataset)",
    license="Apache-2.0",
    folder="mawps_ja",
    files={"train": "shot_example.json", "test": "test.json"},
    read=read_json_array,
    output_length=10,
    metrics=("exact_match",),
    generation=PromptFormat(
        version=LLM_JP_EVAL,
        instruction=(
            "与えられた計算問題に対する答えを整数または小数で出力してください。"
            "数値のみを出力し、それ以外には何も含めないことを厳守してください。"
        ),
        render=_render,
    ),
    dev_share=0.0,
)
