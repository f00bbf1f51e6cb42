"""The shape every NLI dataset shares: a premise and a hypothesis in, one label out.

llm-jp-eval gives each NLI dataset the same input (``前提：…\\n仮説：…``) and asks for one label
from a closed set; log-likelihood scores those labels after the same prompt, so both modes read
an identical prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eval.tasks.base import LLM_JP_EVAL, PromptFormat, Sample


def nli_format(
    instruction: str,
    labels: tuple[str, ...],
    fields: Callable[[dict[str, Any]], tuple[str, str, str, str]],
) -> PromptFormat:
    """A prompt format whose render reads (id, premise, hypothesis, label) through ``fields``."""

    def render(record: dict[str, Any]) -> Sample:
        record_id, premise, hypothesis, label = fields(record)
        return Sample(
            id=str(record_id),
            input=f"前提：{premise}\n仮説：{hypothesis}",
            output=str(label).strip(),
            choices=labels,
        )

    return PromptFormat(version=LLM_JP_EVAL, instruction=instruction, render=render)
