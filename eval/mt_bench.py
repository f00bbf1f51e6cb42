"""Japanese MT-Bench: the model answers two-turn questions, an OpenAI-compatible judge scores each turn 1-10.

Answers (``answers.jsonl``, FastChat's answer format plus ``sample``) are generated with the
model's own chat template, per-category temperatures and ``mt_bench.max_new_tokens`` per turn;
``mt_bench.samples`` answers per question, each sample with its own seed. The judge reads the
Japanese judge prompts (``single-v1``; ``single-math-v1`` with the reference answer for
``reference_categories``) and must answer with ``[[評価]]``, e.g. ``評価：[[5]]``; the score is
read as FastChat reads it (``[[n]]``, else ``[n]``), after NFKC so full-width brackets and digits
count. A reply with no score is kept and counted as unparsed, never fatal. Scores are averaged
per sample first, then over samples, whose spread the report gives.

Turn 2 is judged with the ``-multi-turn`` prompts when the prompt file has them (FastChat's
English set does); the Japanese file has only single-turn prompts, so then the single-turn
prompt gets the conversation so far as its question, and the report says so.

The input files are checked line by line (``eval.tasks.readers``: UTF-8, JSON, one object a
line) and field by field. A bad line in the questions or the reference answers stops the run in
one line naming the first, since judging a changed benchmark would give scores that compare with
nothing; a bad line in an answers file is left out, counted and named in a warning, and the
other answers are judged.

Both files are appended to as work finishes, so a run that stops (crash, preemption, the judge
endpoint down past its retries) continues where it stopped when run again. Records written
before samples existed have no ``sample`` and count as sample 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import statistics
import time
import unicodedata
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import KinoeError
from common.manifest import sha256_file
from common.progress import Progress
from eval.config import EvalConfig
from eval.mt_bench_files import (
    Appender,
    answer_problem,
    checked_lines,
    read_answers,
    read_jsonl,
    read_judge_prompts,
    read_questions,
    read_references,
    required_path,
    sample_of,
)

if TYPE_CHECKING:  # httpx is imported only when judging, not to generate answers on GPU nodes
    from eval.judge_client import JudgeClient

ANSWERS = "answers.jsonl"
JUDGMENTS = "judgments.jsonl"
_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
_TURN2_SINGLE_PROMPT = "{question_1}\n\n[アシスタントの1回目の回答]\n{answer_1}\n\n[ユーザーの2回目の質問]\n{question_2}"


def judge_pin(config: EvalConfig) -> dict[str, Any]:
    """What decides the judge's scores, by content: the model's name and the SHA-256 of its files.

    ``prompt_version`` names the prompt file, a prefix of its hash and the judge model, so two
    reports whose judges read other prompts or asked another model never compare as equal.
    """
    prompts = required_path(config.judge.prompts, "judge.prompts")
    digest = sha256_file(prompts)
    references = config.judge.references
    return {
        "model": config.judge.model,
        "prompts": prompts.name,
        "prompts_sha256": digest,
        "references": Path(references).name if references else None,
        "references_sha256": sha256_file(Path(references)) if references else None,
        "prompt_version": f"{prompts.stem}@sha256:{digest[:12]}+{config.judge.model}",
    }


def temperature_for(config: EvalConfig, category: str) -> float:
    """The sampling temperature of ``category`` (0: greedy)."""
    return config.mt_bench.temperatures.get(category, config.mt_bench.default_temperature)


def sample_seed(seed: int, sample: int, turn: int) -> int:
    """The generation seed of one sample's turn (0-based); sample 0 keeps the seeds of older runs."""
    # A question has far fewer than 1,000 turns (MT-Bench: two): no two samples share a seed.
    return seed + 1000 * sample + turn


def check_sampling(config: EvalConfig) -> None:
    """Refuse several samples per question where a category is answered greedily (all alike)."""
    from eval.generate import Decoding

    samples = config.mt_bench.samples
    if samples == 1:
        return
    questions = read_questions(required_path(config.mt_bench.questions, "mt_bench.questions"))
    greedy = [
        category
        for category in dict.fromkeys(q["category"] for q in questions)
        if not Decoding(1, temperature_for(config, category)).do_sample
    ]
    if greedy:
        raise KinoeError(
            f"mt_bench.samples={samples}, but {', '.join(greedy)} are answered greedily "
            "(temperature 0), so their samples would repeat one answer; give them a temperature "
            "above 0 in mt_bench.temperatures (a table given replaces FastChat's; categories not in "
            "it take mt_bench.default_temperature, so mt_bench.temperatures={} samples all at it), "
            "or set mt_bench.samples=1"
        )


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
    loaded,
    config: EvalConfig,
    questions: list[dict[str, Any]],
    run_dir: Path,
    logger: logging.Logger,
) -> dict[str, Any]:
    """Answer every (question, sample) not yet in ``answers.jsonl``; append each as both its turns are done.

    ``questions`` are ``read_questions``'s, read before the model is loaded so a bad file costs no load.
    """
    from eval.generate import Decoding, generate_batch
    from eval.model import Batcher, truncate_left

    path = run_dir / ANSWERS
    existing, left_out = checked_lines(path, answer_problem) if path.is_file() else ([], [])
    malformed = len(left_out)
    done = {(r["question_id"], sample_of(r)) for r in existing}
    samples = config.mt_bench.samples
    pending = [
        (sample, q)
        for sample in range(samples)
        for q in questions
        if (q["question_id"], sample) not in done
    ]
    if done:
        logger.info("mt-bench: %s answers already in %s; %s to go", len(done), path, len(pending))
    model_id = config.run.name
    truncated = 0
    batcher = Batcher(config.batch_size, config.max_batch_size, logger)
    appender = Appender(path)
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

    def answer(items: list[tuple[int, dict[str, Any]]]) -> list[None]:
        sample = items[0][0]
        chunk = [question for _, question in items]
        temperature = temperature_for(config, chunk[0]["category"])
        decoding = Decoding(config.mt_bench.max_new_tokens, temperature)
        conversations = [[] for _ in chunk]
        turns: list[list[str]] = [[] for _ in chunk]
        for turn in range(max(len(q["turns"]) for q in chunk)):
            active = [i for i, q in enumerate(chunk) if turn < len(q["turns"])]
            for i in active:
                conversations[i].append({"role": "user", "content": chunk[i]["turns"][turn]})
            prompts = [prompt_for(conversations[i]) for i in active]
            seed = sample_seed(config.seed, sample, turn)
            outputs = generate_batch(loaded, prompts, decoding, seed=seed)
            for i, text in zip(active, outputs, strict=True):
                text = text.strip()
                turns[i].append(text)
                conversations[i].append({"role": "assistant", "content": text})
        for question, answered in zip(chunk, turns, strict=True):
            digest = hashlib.sha256(json.dumps(answered, ensure_ascii=False).encode()).hexdigest()
            seeded = {"seed": sample_seed(config.seed, sample, 0)} if decoding.do_sample else {}
            appender.write(
                {
                    "question_id": question["question_id"],
                    "answer_id": digest[:22],
                    "model_id": model_id,
                    "choices": [{"index": 0, "turns": answered}],
                    "category": question["category"],
                    "sample": sample,
                    "decoding": {**decoding.summary(), **seeded},
                    "tstamp": time.time(),
                }
            )
        return [None] * len(chunk)

    # One batch holds one sample's questions of one temperature: one decoding and one seed each.
    groups: dict[tuple[int, float], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for sample, question in pending:
        groups[sample, temperature_for(config, question["category"])].append((sample, question))
    try:
        with Progress("mt-bench answers", total=len(pending), unit="answers") as progress:
            for group in groups.values():
                batcher.run(group, answer, progress.update)
    finally:
        appender.close()
    if truncated:
        logger.warning(
            "mt-bench: %s prompts were longer than max_length and lost their start", truncated
        )
    return {
        "questions": len(questions),
        "samples": samples,
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
    questions: list[dict[str, Any]],
    answers: dict[tuple[Any, int], dict[str, Any]],
    prompts: dict[str, dict[str, Any]],
    references: dict[Any, list[str]],
    config: EvalConfig,
) -> list[dict[str, Any]]:
    """What to send for each (question, sample, turn): prompt name, system and user message."""
    requests = []
    for sample in range(config.mt_bench.samples):
        for question in questions:
            answer = answers.get((question["question_id"], sample))
            if answer is not None:
                requests += _turn_requests(question, sample, answer, prompts, references, config)
    return requests


def _turn_requests(
    question: dict[str, Any],
    sample: int,
    answer: dict[str, Any],
    prompts: dict[str, dict[str, Any]],
    references: dict[Any, list[str]],
    config: EvalConfig,
) -> list[dict[str, Any]]:
    turns = answer["choices"][0]["turns"]
    with_reference = question["category"] in config.judge.reference_categories
    reference = references.get(question["question_id"], [])
    requests = []
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
                "sample": sample,
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
    """Judge every (question, sample, turn) not yet in ``judgments.jsonl``; summarise all of them."""
    from eval.judge_client import JudgeClient, JudgeError, JudgeRedirected

    questions = read_questions(required_path(config.mt_bench.questions, "mt_bench.questions"))
    prompts = read_judge_prompts(required_path(config.judge.prompts, "judge.prompts"))
    references = read_references(config.judge.references)
    samples = config.mt_bench.samples
    answer_records, answers_left_out = read_answers(answers_path, logger)
    answers = {(r["question_id"], sample_of(r)): r for r in answer_records}
    missing = [
        (q["question_id"], sample)
        for sample in range(samples)
        for q in questions
        if (q["question_id"], sample) not in answers
    ]
    if missing:
        logger.warning(
            "judge: %s of %s (question, sample) pairs have no answer in %s",
            len(missing),
            len(questions) * samples,
            answers_path,
        )
    path = run_dir / JUDGMENTS
    existing, _ = read_jsonl(path)
    done = {(r["question_id"], sample_of(r), r["turn"]) for r in existing if "turn" in r}
    requests = [
        r
        for r in judge_requests(questions, answers, prompts, references, config)
        if (r["question_id"], r["sample"], r["turn"]) not in done
    ]
    own_client = client is None
    client = client or JudgeClient(config.judge_endpoint, config.judge, logger)
    failures: list[str] = []
    appender = Appender(path)
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
                        f"question {request['question_id']} sample {request['sample']} "
                        f"turn {request['turn']}: {error}"
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
                        "sample": request["sample"],
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
    summary = summarize(judgments, questions, samples)
    summary.update(
        answers_missing=len(missing),
        answers_left_out=len(answers_left_out),
        failed=len(failures),
        retries=getattr(client, "retries", 0),
    )
    if answers_left_out:
        summary["answers_left_out_first"] = answers_left_out[:10]
    if failures:
        summary["failures"] = failures[:10]
    return summary


def summarize(
    judgments: list[dict[str, Any]], questions: list[dict[str, Any]], samples: int = 1
) -> dict[str, Any]:
    """Scores per category and turn, and overall: each sample's mean, then the mean over samples.

    ``score_std`` is the standard deviation of the per-sample means (None with one sample),
    ``samples`` how many samples have a score. Unparsed judgments are counted, not scored.
    """
    latest: dict[tuple[Any, int, int], dict[str, Any]] = {}
    for judgment in judgments:
        sample = sample_of(judgment)
        if "turn" in judgment and sample is not None and sample < samples:
            latest[judgment["question_id"], sample, judgment["turn"]] = judgment
    # scores[category][sample][turn]: the parsed scores of one sample's judgments
    scores: dict[str, dict[int, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    unparsed = 0
    for (_, sample, turn), judgment in latest.items():
        if judgment.get("score") is None:
            unparsed += 1
            continue
        scores[judgment["category"]][sample][turn].append(float(judgment["score"]))
    order = list(dict.fromkeys(q["category"] for q in questions))
    categories = {
        category: _figures(scores.get(category, {}))
        for category in order + sorted(set(scores) - set(order))
    }
    every: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for by_sample in scores.values():
        for sample, turns in by_sample.items():
            for turn, values in turns.items():
                every[sample][turn] += values
    per_sample = _sample_means(every)
    return {
        "overall": _figures(every),
        "categories": categories,
        "samples": samples,
        "sample_scores": [_rounded(per_sample.get(k)) for k in range(samples)],
        "judgments": len(latest),
        "unparsed": unparsed,
        "served_models": sorted(
            {j["served_model"] for j in latest.values() if j.get("served_model")}
        ),
    }


def _sample_means(
    by_sample: dict[int, dict[int, list[float]]], turn: int | None = None
) -> dict[int, float]:
    """Each sample's mean score (of one turn, or of all); samples without a score left out."""
    means = {}
    for sample, turns in by_sample.items():
        values = [s for t, scored in turns.items() if turn in (None, t) for s in scored]
        if values:
            means[sample] = sum(values) / len(values)
    return means


def _figures(by_sample: dict[int, dict[int, list[float]]]) -> dict[str, Any]:
    """Mean over samples of the score and of each turn's score, the spread of the scores, counts."""
    means = list(_sample_means(by_sample).values())
    return {
        "score": _rounded(_average(means)),
        "score_std": _rounded(statistics.stdev(means)) if len(means) > 1 else None,
        **{
            f"turn_{t}": _rounded(_average(list(_sample_means(by_sample, t).values())))
            for t in (1, 2)
        },
        "samples": len(means),
        "judged": sum(len(scored) for turns in by_sample.values() for scored in turns.values()),
    }


def _average(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
