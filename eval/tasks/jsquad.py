"""JSQuAD: extractive reading comprehension on Wikipedia paragraphs (JGLUE), generation only.

As in llm-jp-eval v1.3 the gold answer is the first listed answer, and the paragraph is used
as JGLUE writes it (title, `` [SEP] ``, text).
"""

from __future__ import annotations

from typing import Any

from eval.tasks.base import LLM_JP_EVAL, PromptFormat, Sample, Task
from eval.tasks.readers import read_squad


def _question(record: dict[str, Any]) -> Sample:
    return Sample(
        id=str(record["id"]),
        input=f"文章：{record['context']}\n質問：{record['question']}",
        output=str(record["answers"][0]["text"]),
    )


TASK = Task(
    name="jsquad",
    source="JGLUE v1.3 JSQuAD",
    folder="jglue",
    license="CC BY-SA 4.0",
    files={"train": "jsquad-train.json", "test": "jsquad-valid.json"},
    read=read_squad,
    output_length=25,
    metrics=("char_f1",),
    generation=PromptFormat(
        version=LLM_JP_EVAL,
        instruction=(
            "質問に対する回答を文章から一言で抽出してください。回答は名詞で答えてください。 "
            "それ以外には何も含めないことを厳守してください。"
        ),
        render=_question,
    ),
)
