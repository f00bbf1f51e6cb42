"""JMMLU: four-way multiple choice over 53 subjects; the answer is the choice's letter.

Log-likelihood scores the four letters after the same prompt. Upstream has no train split:
the few-shot pool is taken from the seed-shuffled questions of all subjects (``train_from_test``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.tasks.base import LLM_JP_EVAL, PromptFormat, Sample, Task
from eval.tasks.readers import Read, Record, csv_reader

LETTERS = ("A", "B", "C", "D")
_read_csv = csv_reader(("question", *LETTERS, "answer"))


def _read(path: Path) -> Read:
    read = _read_csv(path)
    # The id names the subject and the line the question starts on in its upstream CSV.
    read.records = [
        Record(r.origin, {**r.fields, "id": f"{path.stem}:{r.origin.rsplit(':', 1)[1]}"})
        for r in read.records
    ]
    return read


def _render(record: dict[str, Any]) -> Sample:
    listed = ",".join(f"{letter}.{record[letter]}" for letter in LETTERS)
    return Sample(
        id=str(record["id"]),
        input=f"質問：{record['question']}\n選択肢：{listed}",
        output=record["answer"].strip(),
        choices=LETTERS,
    )


_FORMAT = PromptFormat(
    version=LLM_JP_EVAL,
    instruction=(
        "与えられた質問と選択肢から、最も適切な回答を選択してください。"
        "なお、回答には選択肢のアルファベット（例：A）のみを含め、他には何も含めないことを厳守してください。"
    ),
    render=_render,
)

TASK = Task(
    name="jmmlu",
    source="JMMLU (nlp-waseda/JMMLU), CC BY-SA subjects",
    license="CC BY-SA 4.0",
    folder="jmmlu",
    files={"test": "*.csv"},
    read=_read,
    output_length=5,
    metrics=("exact_match",),
    generation=_FORMAT,
    loglik=_FORMAT,
    train_from_test=32,
)
