"""Japanese MT-Bench: the model answers two-turn questions, an OpenAI-compatible judge scores each turn 1-10.

Answers (``answers.jsonl``, FastChat's answer format) are generated with the model's own chat
template, per-category temperatures and ``mt_bench.max_new_tokens`` per turn. The judge reads
the Japanese judge prompts (``single-v1``; ``single-math-v1`` with the reference answer for
``reference_categories``) and must answer with ``[[評価]]``, e.g. ``評価：[[5]]``; the score is
read as FastChat reads it (``[[n]]``, else ``[n]``), after NFKC so full-width brackets and digits
count. A reply with no score is kept and counted as unparsed, never fatal.

Turn 2 is judged with the ``-multi-turn`` prompts when the prompt file has them (FastChat's
English set does); the Japanese file has only single-turn prompts, so then the single-turn
prompt gets the conversation so far as its question, and the report says so.

Both files are appended to as work finishes, so a run that stops (crash, preemption, the judge
endpoint down past its retries) continues where it stopped when run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import KinoeError
from common.progress import Progress
from eval.config import EvalConfig

if TYPE_CHECKING:  # httpx is imported only when judging, not to generate answers on GPU nodes
    from eval.judge_client import JudgeClient

ANSWERS = "answers.jsonl"
JUDGMENTS = "judgments.jsonl"
_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
_TURN2_SINGLE_PROMPT = "{question_1}\n\n[アシスタントの1回目の回答]\n{answer_1}\n\n[ユーザーの2回目の質問]\n{question_2}"


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSON-lines file, and how many lines were not JSON objects (a cut-off last line)."""
    records, malformed = [], 0
    if not Path(path).is_file():
        return records, malformed
    with Path(path).open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                malformed += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                malformed += 1
    return records, malformed


def _required(path: Path | None, key: str) -> Path:
    if path is None:
        raise KinoeError(f"{key} is not set; point it at the Japanese MT-Bench file")
    return Path(path)


def read_questions(path: Path) -> list[dict[str, Any]]:
    """Questions with ``question_id``, ``category`` and two ``turns``."""
    records, malformed = read_jsonl(path)
    bad = [r for r in records if not {"question_id", "category", "turns"} <= r.keys()]
    if malformed or bad or not records:
        raise KinoeError(
            f"{path}: {malformed + len(bad)} lines are not MT-Bench questions "
            "(question_id, category, turns); use question.jsonl of Japanese MT-Bench"
        )
    return records


def read_references(path: Path | None) -> dict[Any, list[str]]:
    """Reference answers by question id (FastChat answer files: ``choices[0].turns``)."""
    if path is None:
        return {}
    records, _ = read_jsonl(path)
    return {r["question_id"]: list(r["choices"][0]["turns"]) for r in records if r.get("choices")}


def read_judge_prompts(path: Path) -> dict[str, dict[str, Any]]:
    """Judge prompts by name (``single-v1``, ``single-math-v1``, ...)."""
    records, _ = read_jsonl(path)
    prompts = {r["name"]: r for r in records if {"name", "prompt_template"} <= r.keys()}
    for needed in ("single-v1", "single-math-v1"):
        if needed not in prompts:
            raise KinoeError(f"{path} has no '{needed}' judge prompt; use judge_ja_prompts.jsonl")
    return prompts


class _Appender:
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


def temperature_for(config: EvalConfig, category: str) -> float:
    """The sampling temperature of ``category`` (0: greedy)."""
    return config.mt_bench.temperatures.get(category, config.mt_bench.default_temperature)


def _chat_prompt(loaded, messages: list[dict[str, str]]) -> list[int]:
    tokenizer = loaded.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise KinoeError(
            f"{loaded.info['tokenizer']} has no chat_template; MT-Bench needs the model's chat "
            "format (kinoe's tokenizer export writes one)"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Templates that write BOS themselves must not get a second one from the tokenizer.
    with_bos = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    return list(tokenizer(text, add_special_tokens=with_bos)["input_ids"])


def generate_answers(
    loaded, config: EvalConfig, run_dir: Path, logger: logging.Logger
) -> dict[str, Any]:
    """Answer every question not yet in ``answers.jsonl``; append each as both its turns are done."""
    from eval.generate import Decoding, generate_batch
    from eval.model import Batcher, truncate_left

    questions = read_questions(_required(config.mt_bench.questions, "mt_bench.questions"))
    path = run_dir / ANSWERS
    existing, malformed = read_jsonl(path)
    done = {r["question_id"] for r in existing if "question_id" in r}
    pending = [q for q in questions if q["question_id"] not in done]
    if done:
        logger.info("mt-bench: %s answers already in %s; %s to go", len(done), path, len(pending))
    model_id = config.run.name
    truncated = 0
    batcher = Batcher(config.batch_size, config.max_batch_size, logger)
    appender = _Appender(path)
    started = time.monotonic()

    def prompt_for(messages):
        nonlocal truncated
        ids, cut = truncate_left(
            _chat_prompt(loaded, messages),
            max(loaded.max_length - config.mt_bench.max_new_tokens, 1),
            loaded.bos_id,
        )
        truncated += cut
        return ids

    def answer(chunk: list[dict[str, Any]]) -> list[None]:
        temperature = temperature_for(config, chunk[0]["category"])
        decoding = Decoding(config.mt_bench.max_new_tokens, temperature)
        conversations = [[] for _ in chunk]
        turns: list[list[str]] = [[] for _ in chunk]
        for turn in range(max(len(q["turns"]) for q in chunk)):
            active = [i for i, q in enumerate(chunk) if turn < len(q["turns"])]
            for i in active:
                conversations[i].append({"role": "user", "content": chunk[i]["turns"][turn]})
            prompts = [prompt_for(conversations[i]) for i in active]
            outputs = generate_batch(loaded, prompts, decoding, seed=config.seed + turn)
            for i, text in zip(active, outputs, strict=True):
                text = text.strip()
                turns[i].append(text)
                conversations[i].append({"role": "assistant", "content": text})
        for question, answered in zip(chunk, turns, strict=True):
            digest = hashlib.sha256(json.dumps(answered, ensure_ascii=False).encode()).hexdigest()
            appender.write(
                {
                    "question_id": question["question_id"],
                    "answer_id": digest[:22],
                    "model_id": model_id,
                    "choices": [{"index": 0, "turns": answered}],
                    "category": question["category"],
                    "decoding": decoding.summary(),
                    "tstamp": time.time(),
                }
            )
        return [None] * len(chunk)

    # One batch holds questions of one temperature, so each batch has one decoding.
    by_temperature: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for question in pending:
        by_temperature[temperature_for(config, question["category"])].append(question)
    try:
        with Progress("mt-bench answers", total=len(pending), unit="questions") as progress:
            for group in by_temperature.values():
                batcher.run(group, answer, progress.update)
    finally:
        appender.close()
    if truncated:
        logger.warning(
            "mt-bench: %s prompts were longer than max_length and lost their start", truncated
        )
    return {
        "questions": len(questions),
        "answered_now": len(pending),
        "answered_before": len(done),
        "unreadable_lines": malformed,
        "truncated_prompts": truncated,
        "max_new_tokens": config.mt_bench.max_new_tokens,
        "wall_s": round(time.monotonic() - started, 3),
        "batch_size": batcher.size,
    }


def parse_score(judgment: str) -> float | None:
    """The ``[[n]]`` score of a judgment (``[n]`` as a fallback), or None when there is none."""
    text = unicodedata.normalize("NFKC", judgment)
    match = _SCORE.search(text) or _SCORE_BACKUP.search(text)
    return float(match.group(1)) if match else None


def judge_requests(
    questions: Iterable[dict[str, Any]],
    answers: dict[Any, dict[str, Any]],
    prompts: dict[str, dict[str, Any]],
    references: dict[Any, list[str]],
    config: EvalConfig,
) -> list[dict[str, Any]]:
    """What to send for each (question, turn): prompt name, system and user message."""
    requests = []
    for question in questions:
        answer = answers.get(question["question_id"])
        if answer is None:
            continue
        turns = answer["choices"][0]["turns"]
        with_reference = question["category"] in config.judge.reference_categories
        reference = references.get(question["question_id"], [])
        for turn in config.judge.turns:
            if turn > min(len(question["turns"]), len(turns)):
                continue
            base = "single-math-v1" if with_reference and reference else "single-v1"
            fields = {
                "question": question["turns"][turn - 1],
                "answer": turns[turn - 1],
                "question_1": question["turns"][0],
                "answer_1": turns[0],
                "question_2": question["turns"][1] if len(question["turns"]) > 1 else "",
                "answer_2": turns[1] if len(turns) > 1 else "",
                "ref_answer_1": reference[0] if reference else "",
                "ref_answer_2": reference[1] if len(reference) > 1 else "",
            }
            name = label = base
            if turn == 2 and f"{base}-multi-turn" in prompts:
                name = label = f"{base}-multi-turn"
            elif turn == 2:
                label = f"{base} (turn 2: conversation as the question)"
                fields["question"] = _TURN2_SINGLE_PROMPT.format(**fields)
                fields["ref_answer_1"] = fields["ref_answer_2"]
            template = prompts[name]
            requests.append(
                {
                    "question_id": question["question_id"],
                    "category": question["category"],
                    "turn": turn,
                    "model": answer.get("model_id"),
                    "prompt": label,
                    "system": template.get("system_prompt", ""),
                    "user": template["prompt_template"].format_map(fields),
                }
            )
    return requests


def run_judge(
    config: EvalConfig,
    answers_path: Path,
    run_dir: Path,
    logger: logging.Logger,
    client: JudgeClient | None = None,
) -> dict[str, Any]:
    """Judge every (question, turn) not yet in ``judgments.jsonl``; summarise all of them."""
    from eval.judge_client import JudgeClient, JudgeError, JudgeRedirected

    questions = read_questions(_required(config.mt_bench.questions, "mt_bench.questions"))
    prompts = read_judge_prompts(_required(config.judge.prompts, "judge.prompts"))
    references = read_references(config.judge.references)
    answer_records, _ = read_jsonl(answers_path)
    answers = {r["question_id"]: r for r in answer_records if r.get("choices")}
    missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if missing:
        logger.warning("judge: %s questions have no answer in %s", len(missing), answers_path)
    path = run_dir / JUDGMENTS
    existing, _ = read_jsonl(path)
    done = {(r["question_id"], r["turn"]) for r in existing if "turn" in r}
    requests = [
        r
        for r in judge_requests(questions, answers, prompts, references, config)
        if (r["question_id"], r["turn"]) not in done
    ]
    own_client = client is None
    client = client or JudgeClient(config.judge_endpoint, config.judge, logger)
    failures: list[str] = []
    appender = _Appender(path)
    try:
        with (
            Progress("mt-bench judge", total=len(requests), unit="judgments") as progress,
            ThreadPoolExecutor(config.judge_endpoint.parallel) as pool,
        ):
            futures = {pool.submit(client.chat, r["system"], r["user"]): r for r in requests}
            for future in as_completed(futures):
                request = futures[future]
                progress.update()
                try:
                    reply = future.result()
                except JudgeError as error:
                    failures.append(
                        f"question {request['question_id']} turn {request['turn']}: {error}"
                    )
                    continue
                except JudgeRedirected:
                    # Nothing more goes out: requests not yet started are dropped.
                    for pending in futures:
                        pending.cancel()
                    raise
                appender.write(
                    {
                        "question_id": request["question_id"],
                        "category": request["category"],
                        "turn": request["turn"],
                        "model": request["model"],
                        "judge": [config.judge.model, request["prompt"]],
                        "served_model": reply.model,
                        "user_prompt": request["user"],
                        "judgment": reply.text,
                        "score": parse_score(reply.text),
                        "tstamp": time.time(),
                    }
                )
    finally:
        appender.close()
        if own_client:
            client.close()
    judgments, _ = read_jsonl(path)
    summary = summarize(judgments, questions)
    summary.update(
        answers_missing=len(missing), failed=len(failures), retries=getattr(client, "retries", 0)
    )
    if failures:
        summary["failures"] = failures[:10]
    return summary


def summarize(judgments: list[dict[str, Any]], questions: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean scores per category and turn, and overall; unparsed judgments counted, not scored."""
    by_category: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    unparsed = 0
    latest = {(j["question_id"], j["turn"]): j for j in judgments}
    for judgment in latest.values():
        if judgment.get("score") is None:
            unparsed += 1
            continue
        by_category[judgment["category"]][judgment["turn"]].append(float(judgment["score"]))
    order = list(dict.fromkeys(q["category"] for q in questions))
    categories = {}
    for category in order + sorted(set(by_category) - set(order)):
        turns = by_category.get(category, {})
        scores = [s for values in turns.values() for s in values]
        categories[category] = {
            "score": _mean(scores),
            **{f"turn_{t}": _mean(turns.get(t, [])) for t in (1, 2)},
            "judged": len(scores),
        }
    every = [s for turns in by_category.values() for values in turns.values() for s in values]
    per_turn = {
        f"turn_{t}": _mean([s for turns in by_category.values() for s in turns.get(t, [])])
        for t in (1, 2)
    }
    return {
        "overall": {"score": _mean(every), **per_turn, "judged": len(every)},
        "categories": categories,
        "judgments": len(latest),
        "unparsed": unparsed,
    }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
