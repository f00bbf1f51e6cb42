"""JCommonsenseQA: five-way commonsense multiple choice (JGLUE).

Generation follows llm-jp-eval v1.3: the choices are numbered and the answer is the number
(one token). Log-likelihood scores the choice texts themselves, which needs a prompt whose
answers are texts: the instruction and input of llm-jp-eval v1.0.0's JCommonsenseQA (which
answered with the text), in the v1.3 layout, so few-shot answers and scored choices agree.
"""

from __future__ import annotations

from typing import Any

from eval.tasks.base import LLM_JP_EVAL, PromptFormat, Sample, Task
from eval.tasks.readers import read_json_lines

CHOICES = 5


def _choices(record: dict[str, Any]) -> list[str]:
    return [str(record[f"choice{index}"]) for index in range(CHOICES)]


def _numbered(record: dict[str, Any]) -> Sample:
    listed = ",".join(f"{index}.{choice}" for index, choice in enumerate(_choices(record)))
    return Sample(
        id=str(record["q_id"]),
        input=f"質問：{record['question']}\n選択肢：{listed}",
        output=str(record["label"]),
    )


def _texts(record: dict[str, Any]) -> Sample:
    choices = _choices(record)
    return Sample(
        id=str(record["q_id"]),
        input=f"質問：{record['question']}\n選択肢：{','.join(choices)}",
        output=choices[int(record["label"])],
        choices=tuple(choices),
    )


TASK = Task(
    name="jcommonsenseqa",
    source="JGLUE v1.3 JCommonsenseQA",
    folder="jglue",
    license="CC BY-SA 4.0",
    files={"train": "jcommonsenseqa-train.json", "test": "jcommonsenseqa-valid.json"},
    read=read_json_lines,
    output_length=1,
    metrics=("exact_match",),
    generation=PromptFormat(
        version=LLM_JP_EVAL,
        instruction=(
            "質問と回答の選択肢を入力として受け取り、選択肢から回答を選択してください。"
            "なお、回答は選択肢の番号（例：0）でするものとします。 "
            "回答となる数値をint型で返し、他には何も含めないことを厳守してください。"
        ),
        render=_numbered,
    ),
    loglik=PromptFormat(
        version=f"{LLM_JP_EVAL}+choice-text",
        instruction=(
            "質問と回答の選択肢を入力として受け取り、選択肢から回答を選択してください。"
            "回答の他には何も含めないことを厳守してください。"
        ),
        render=_texts,
    ),
)
