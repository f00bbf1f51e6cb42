"""JA MT-Bench's input files: questions, reference answers, answers to judge, judge prompts.

Questions and references are read strictly (a bad line stops the run: a benchmark with one left
out scores nothing comparable); a bad answer line is left out, counted and named.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import KinoeError
from eval.data import MAX_EXAMPLE_CHARACTERS
from eval.tasks.readers import read_json_lines


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSON-lines file (none if absent), and how many lines were not JSON objects."""
    if not Path(path).is_file():
        return [], 0
    read = read_json_lines(Path(path))
    return [record.fields for record in read.records], len(read.malformed)


def checked_lines(
    path: Path, problem: Callable[[dict[str, Any]], str | None]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of ``path`` that ``problem`` finds nothing wrong with, and one ``path:line: why``
    per line left out, in line order."""
    read = read_json_lines(Path(path))
    records, left_out = [], list(read.malformed)
    for record in read.records:
        why = problem(record.fields)
        if why is None:
            records.append(record.fields)
        else:
            left_out.append(f"{record.origin}: {why}")
    # Every entry starts "<path>:<line>:", so the first by line is the one to show.
    left_out.sort(key=lambda entry: int(entry[len(str(path)) + 1 :].split(":", 1)[0]))
    return records, left_out


def _is_id(value: Any) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _too_long(texts: list[str], what: str) -> str | None:
    size = sum(map(len, texts))
    if size > MAX_EXAMPLE_CHARACTERS:
        return (
            f"{size:,} characters, more than {what} may have "
            f"({MAX_EXAMPLE_CHARACTERS:,}: no model's context holds it)"
        )
    return None


def question_problem(record: dict[str, Any]) -> str | None:
    """Why ``record`` is not an MT-Bench question, or None."""
    if not _is_id(record.get("question_id")):
        return "question_id must be a number or a string"
    if not isinstance(record.get("category"), str):
        return "category must be a string"
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns:
        return "turns must be a list of the user's turns"
    if not all(isinstance(turn, str) and turn.strip() for turn in turns):
        return "every turn must be a non-empty string"
    return _too_long(turns, "a question")


def answer_problem(record: dict[str, Any]) -> str | None:
    """Why ``record`` is not an answer in FastChat's format (``choices[0].turns``), or None."""
    if not _is_id(record.get("question_id")):
        return "question_id must be a number or a string"
    if sample_of(record) is None:
        return "sample must be a whole number >= 0"
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "choices must be a list of objects, [{'turns': [...]}]"
    turns = choices[0].get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        return "choices[0].turns must be a non-empty list of strings"
    return _too_long(turns, "an answer")


def required_path(path: Path | None, key: str) -> Path:
    if path is None:
        raise KinoeError(f"{key} is not set; point it at the Japanese MT-Bench file")
    return Path(path)


def read_questions(path: Path) -> list[dict[str, Any]]:
    """Questions with ``question_id``, ``category`` and their ``turns``; one bad line stops the run."""
    records, left_out = checked_lines(path, question_problem)
    if left_out:
        raise KinoeError(
            f"mt_bench.questions: {len(left_out)} lines are not MT-Bench questions, the first "
            f"{left_out[0]}; fix the file or use question.jsonl of Japanese MT-Bench"
        )
    if not records:
        raise KinoeError(
            f"mt_bench.questions: {path} holds no question; use question.jsonl of Japanese MT-Bench"
        )
    return records


def read_references(path: Path | None) -> dict[Any, list[str]]:
    """Reference answers by question id (FastChat answer files: ``choices[0].turns``)."""
    if path is None:
        return {}
    records, left_out = checked_lines(path, answer_problem)
    if left_out:
        # A reference left out would silently switch its question to the judge prompt without one.
        raise KinoeError(
            f"judge.references: {len(left_out)} lines are not reference answers, the first "
            f"{left_out[0]}; fix the file or use gpt-4.jsonl of Japanese MT-Bench"
        )
    if not records:
        raise KinoeError(
            f"judge.references: {path} holds no reference answer; use gpt-4.jsonl of Japanese "
            "MT-Bench, or unset judge.references"
        )
    return {r["question_id"]: list(r["choices"][0]["turns"]) for r in records}


def read_answers(path: Path, logger: logging.Logger) -> tuple[list[dict[str, Any]], list[str]]:
    """The answers of ``path`` to judge, and the lines left out (warned about; the rest is judged)."""
    records, left_out = checked_lines(path, answer_problem)
    if left_out:
        logger.warning(
            "judge: %s lines of %s are not answers and are left out, the first %s; the other "
            "answers are judged",
            len(left_out),
            path,
            left_out[0],
        )
    if not records:
        first = f", the first {left_out[0]}" if left_out else ""
        raise KinoeError(
            f"judge: {path} holds no answer to judge ({len(left_out)} lines left out{first}); "
            "run `kinoe eval mt-bench` or point judge.answers at FastChat answers"
        )
    return records, left_out


def read_judge_prompts(path: Path) -> dict[str, dict[str, Any]]:
    """Judge prompts by name (``single-v1``, ``single-math-v1``, ...)."""
    records, _ = read_jsonl(path)
    prompts = {r["name"]: r for r in records if {"name", "prompt_template"} <= r.keys()}
    for needed in ("single-v1", "single-math-v1"):
        if needed not in prompts:
            raise KinoeError(f"{path} has no '{needed}' judge prompt; use judge_ja_prompts.jsonl")
    return prompts


def sample_of(record: dict[str, Any]) -> int | None:
    """The sample index of an answer or judgment: 0 when absent (older files), None when invalid."""
    sample = record.get("sample", 0)
    return (
        sample if isinstance(sample, int) and not isinstance(sample, bool) and sample >= 0 else None
    )


class Appender:
    """Appends JSON lines, first dropping a line a crash left unfinished, and syncs each one."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size:
            data = path.read_bytes()
            if not data.endswith(b"\n"):
                path.write_bytes(data[: data.rfind(b"\n") + 1])
        self.handle = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()
