"""NIILC: encyclopedic question answering, generation scored by char_f1.

Upstream's dev file is the few-shot pool (train) and its test file the test split. A question
with several gold answers has them joined with 、 as its one gold answer, and a question whose
only answer is ``-`` (none found) is left out, as llm-jp-eval's processor does as far as it
could be recalled here (docs/eval.md).
"""

from __future__ import annotations

from typing import Any
from xml.etree.ElementTree import Element

from eval.tasks.base import LLM_JP_EVAL, PromptFormat, Sample, Task
from eval.tasks.readers import element_text, xml_reader


def _question(element: Element) -> dict[str, Any] | None:
    found = element.find("answers")
    answers = [element_text(a) for a in (found.findall("answer") if found is not None else [])]
    if answers == ["-"]:
        return None  # annotated as having no answer in Wikipedia: not a question to score
    return {"id": element.get("id"), "text": element_text(element.find("text")), "answers": answers}


def _render(record: dict[str, Any]) -> Sample:
    answers = [a for a in record["answers"] if a]
    if not record["text"] or not answers:
        raise ValueError("a question needs its text and at least one answer")
    return Sample(id=str(record["id"]), input=f"質問：{record['text']}", output="、".join(answers))


TASK = Task(
    name="niilc",
    source="NIILC (mynlp/niilc-qa)",
    license="CC BY-SA 4.0",
    folder="niilc",
    files={"train": "NIILC-ECQA2015_dev.xml", "test": "NIILC-ECQA2015_test.xml"},
    read=xml_reader("question", _question),
    output_length=180,
    metrics=("char_f1",),
    generation=PromptFormat(
        version=LLM_JP_EVAL,
        instruction="質問に対する答えを出力してください。回答の他には何も含めないことを厳守してください。",
        render=_render,
    ),
)
