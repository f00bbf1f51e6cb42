"""JEMHopQA: Japanese explainable multi-hop question answering, generation scored by char_f1."""

from __future__ import annotations

from typing import Any

from eval.tasks.base import LLM_JP_EVAL, PromptFormat, Sample, Task
from eval.tasks.readers import read_json_array


def _question(record: dict[str, Any]) -> Sample:
    return Sample(
        id=str(record["qid"]), input=f"質問：{record['question']}", output=str(record["answer"])
    )


TASK = Task(
    name="jemhopqa",
    source="JEMHopQA v1.1 (aiishii/JEMHopQA), © RIKEN",
    license="CC BY-SA 4.0",
    folder="jemhopqa",
    files={"train": "train_ver1.1.json", "test": "dev_ver1.1.json"},
    read=read_json_array,
    output_length=15,
    metrics=("char_f1",),
    generation=PromptFormat(
        version=LLM_JP_EVAL,
        instruction=(
            "質問を入力とし、回答を出力してください。回答の他には何も含めないことを厳守してください。"
            "回答が'はい'と'いいえ'で答えることができる場合、'YES'と'NO'で答えてください。"
        ),
        render=_question,
    ),
)
