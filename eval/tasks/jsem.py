"""JSeM: the Japanese semantic test suite, entailment judged yes / no / unknown / undef.

Upstream has no train or test split: the few-shot pool is taken from the seed-shuffled
problems (``train_from_test``). Problems answered with acceptability judgements
(``unacceptable``, ``weakacceptable``, ``infelicitous``) are not entailment problems and are
left out, as llm-jp-eval keeps only the four entailment answers. Several premises are joined
in order.
"""

from __future__ import annotations

from typing import Any
from xml.etree.ElementTree import Element

from eval.tasks.base import Task
from eval.tasks.nli import nli_format
from eval.tasks.readers import element_text, xml_reader

LABELS = ("yes", "no", "unknown", "undef")
_ACCEPTABILITY = {"unacceptable", "weakacceptable", "infelicitous"}


def _problem(element: Element) -> dict[str, Any] | None:
    answer = element.get("answer", "").strip()
    if answer in _ACCEPTABILITY:
        return None
    premises = [element_text(p.find("script")) for p in element.findall("p")]
    hypothesis = element.find("h")
    return {
        "jsem_id": element.get("jsem_id"),
        "premise": "".join(premises),
        "hypothesis": element_text(hypothesis.find("script") if hypothesis is not None else None),
        "answer": answer,
    }


_FORMAT = nli_format(
    "前提と仮説の関係をyes、no、unknown、undefの中から回答してください。"
    "それ以外には何も含めないことを厳守してください。\n\n"
    "制約：\n"
    "- 前提が仮説を含意する場合はyesと出力\n"
    "- 前提が仮説の否定を含意する場合はnoと出力\n"
    "- 前提が仮説を含意せず、その否定も含意しない場合はunknownと出力\n"
    "- 与えられた情報のみからは判断ができない場合はundefと出力",
    LABELS,
    lambda r: (r["jsem_id"], r["premise"], r["hypothesis"], r["answer"]),
)

TASK = Task(
    name="jsem",
    source="JSeM v1.0 (DaisukeBekki/JSeM)",
    license="BSD-3-Clause",
    folder="jsem",
    files={"test": "*.xml"},
    read=xml_reader("problem", _problem),
    output_length=3,
    metrics=("exact_match",),
    generation=_FORMAT,
    loglik=_FORMAT,
    train_from_test=32,
)
