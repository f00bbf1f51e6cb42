"""How many new tokens a task's generation may take, counted in the evaluated model's own tokens.

llm-jp-eval's output lengths are counted in llm-jp's tokenizer: 3 tokens hold ``entailment``
there, while a tokenizer trained by ``kinoe tokenizer`` needs 5-10, so with the fixed value
every JNLI answer would be cut short and score 0 whatever the model. The limit here is the
longest gold answer of the task (every example of the split and the few-shot answers) in the
model's tokens plus ``MARGIN``, and never below llm-jp-eval's value, so a model whose
tokenizer packs answers tighter generates exactly as llm-jp-eval lets it. A fixed limit
(``task_max_new_tokens``) is honoured, and the gold answers longer than it are counted and warned
about.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Tokens beyond the longest gold answer: a tokenizer may split differently after "### 応答:\n"
# than in the answer alone, and a stop (blank line or end token) may follow.
MARGIN = 2


@dataclass(frozen=True)
class AnswerLength:
    """A task's generation limit and how it was chosen."""

    max_new_tokens: int
    longest_gold_tokens: int
    llm_jp_eval_tokens: int
    fixed: bool  # set by task_max_new_tokens rather than from the tokenizer
    golds_longer_than_limit: int

    def summary(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "rule": "task_max_new_tokens"
            if self.fixed
            else f"max(llm-jp-eval's {self.llm_jp_eval_tokens}, longest gold + {MARGIN})",
            "longest_gold_tokens": self.longest_gold_tokens,
            "golds_longer_than_limit": self.golds_longer_than_limit,
        }


def answer_length(
    encode: Callable[[list[str]], list[list[int]]],
    golds: Sequence[str],
    llm_jp_eval_tokens: int,
    fixed: int | None = None,
) -> AnswerLength:
    """The limit for answers ``golds`` under ``encode`` (texts -> each one's ids where an answer starts)."""
    frequency = Counter(golds)
    unique = list(frequency)
    counts = {gold: len(ids) for gold, ids in zip(unique, encode(unique), strict=True)}
    longest = max(counts.values(), default=0)
    limit = fixed if fixed is not None else max(llm_jp_eval_tokens, longest + MARGIN)
    return AnswerLength(
        max_new_tokens=limit,
        longest_gold_tokens=longest,
        llm_jp_eval_tokens=llm_jp_eval_tokens,
        fixed=fixed is not None,
        golds_longer_than_limit=sum(frequency[g] for g, count in counts.items() if count > limit),
    )
