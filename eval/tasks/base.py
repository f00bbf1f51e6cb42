"""What a task is: its data files, how a record becomes a prompt's input and answer, its output length and metrics.

Prompts follow llm-jp-eval v1.3 (``get_evaluation_prompt`` for Japanese, no custom template):
a fixed header, the dataset's instruction, then each few-shot example and the question as
``### 入力:`` / ``### 応答:`` blocks. A task may give a second format for log-likelihood
scoring when its generation format asks for something other than the choices themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import KinoeError
from eval.tasks.readers import Reader

HEADER = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
LLM_JP_EVAL = "llm-jp-eval-1.3"


@dataclass(frozen=True)
class Sample:
    """One example as a prompt sees it: its input text, the gold answer, and the choices to score."""

    id: str
    input: str
    output: str
    choices: tuple[str, ...] = ()  # log-likelihood continuations; output is one of them


@dataclass(frozen=True)
class PromptFormat:
    """An instruction and the way a raw record becomes a ``Sample`` under it."""

    version: str
    instruction: str
    render: Callable[[dict[str, Any]], Sample]


@dataclass(frozen=True)
class Task:
    """A dataset: its files per split, its formats, output length (tokens) and generation metrics.

    ``files`` maps "test" and, where upstream has one, "train" to a file name or glob pattern in
    the dataset's folder (upstream names; ``task_files`` in the config overrides them). Few-shot
    examples are the first of the seed-shuffled train records, whose last ``dev_share`` is the
    dev split. A dataset without a train file sets ``train_from_test``: that many records of the
    shuffled test file become the few-shot pool and leave the test split.
    """

    name: str
    source: str
    folder: str  # the dataset's folder under data_dir ("jglue": jglue_dir)
    files: dict[str, str]
    read: Reader
    output_length: int  # llm-jp-eval's, in llm-jp's tokens: the floor of the generation limit
    metrics: tuple[str, ...]
    generation: PromptFormat
    loglik: PromptFormat | None = None
    license: str = ""
    dev_share: float = 0.1
    train_from_test: int = 0

    def scorings(self) -> tuple[str, ...]:
        """The scoring modes this task supports."""
        return ("loglik", "generation") if self.loglik is not None else ("generation",)

    def prompt_format(self, scoring: str) -> PromptFormat:
        """The format used for ``scoring``."""
        if scoring == "loglik":
            if self.loglik is None:
                raise KinoeError(f"{self.name} has no choices to score; use scoring=[generation]")
            return self.loglik
        return self.generation


def few_shot_header(instruction: str, shots: list[Sample]) -> str:
    """Everything of a prompt before the question: header, instruction and the few-shot examples."""
    text = f"{HEADER}\n\n### 指示:\n{instruction}"
    for shot in shots:
        text += f"\n\n### 入力:\n{shot.input}\n\n### 応答:\n{shot.output}"
    return text


def prompt(header: str, sample: Sample) -> str:
    """The full prompt for ``sample``: ``header`` then its input, ending where the answer starts."""
    return f"{header}\n\n### 入力:\n{sample.input}\n\n### 応答:\n"
