"""Run the selected tasks on a loaded model: each dataset task in each scoring mode it supports, then bits per character.

A task whose records are all malformed is skipped with a warning (a result with ``skipped``
and no metrics) and the suite goes on; malformed records are logged one line each and counted.
Every (task, scoring) gives one result: its metrics, how many examples of how many, the split,
few-shot count, prompt version and the hash of the exact few-shot prompt, the decoding, the
count of prompts cut to fit, the batch size used and the wall time. Predictions go to
``predictions/<task>-<scoring>.jsonl`` and the first full prompt to ``prompts/<task>-<scoring>.txt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from common.progress import Progress
from eval.config import BPC_TASK, EvalConfig
from eval.data import TaskData, load_task, subset
from eval.model import Batcher, LoadedModel
from eval.tasks import REGISTRY
from eval.tasks.base import Task, few_shot_header, prompt


def plan(config: EvalConfig) -> list[tuple[str, str]]:
    """The (task, scoring) pairs this config runs, in order."""
    pairs = []
    for name in config.dataset_tasks:
        task = REGISTRY[name]
        pairs += [(name, s) for s in task.scorings() if s in config.scoring]
    if BPC_TASK in config.tasks:
        pairs.append((BPC_TASK, "bpc"))
    return pairs


def run_suite(
    config: EvalConfig, loaded: LoadedModel, run_dir: Path, logger: logging.Logger
) -> list[dict[str, Any]]:
    """Evaluate every planned (task, scoring); one result dict each."""
    pairs = plan(config)
    if not pairs:
        logger.warning("no task supports the selected scoring %s", config.scoring)
    results, reads = [], {}
    for task_name, scoring in pairs:
        started = time.monotonic()
        if scoring == "bpc":
            result = _bpc(config, loaded, logger)
        else:
            task = REGISTRY[task_name]
            result = _dataset(config, loaded, task, scoring, run_dir, logger, reads)
        if result.get("skipped"):
            results.append(result)
            continue
        result["wall_s"] = round(time.monotonic() - started, 3)
        result["examples_per_s"] = (
            round(result["examples"] / result["wall_s"], 3) if result["wall_s"] else None
        )
        logger.info(
            "%s %s: %s on %s examples in %.1f s",
            task_name,
            scoring,
            ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()),
            f"{result['examples']:,}",
            result["wall_s"],
        )
        results.append(result)
    return results


SHOWN_MALFORMED = 10


def _dataset(
    config: EvalConfig,
    loaded: LoadedModel,
    task: Task,
    scoring: str,
    run_dir: Path,
    logger: logging.Logger,
    reads: dict,
) -> dict[str, Any]:
    shots = config.shots_for(task.name)
    source = config.source_for(task.name)
    data = load_task(task, scoring, source, config.split, shots, config.seed, reads)
    for line in data.malformed[:SHOWN_MALFORMED]:
        logger.warning("%s: skipped a malformed record: %s", task.name, line)
    if len(data.malformed) > SHOWN_MALFORMED:
        logger.warning(
            "%s: %s more malformed records skipped (all in the report)",
            task.name,
            len(data.malformed) - SHOWN_MALFORMED,
        )
    dropped = {"malformed": len(data.malformed), "malformed_records": data.malformed}
    if data.excluded:
        dropped["excluded"] = data.excluded
    if not data.examples:
        logger.warning("%s %s: no valid record in %s; task skipped", task.name, scoring, data.split)
        return {
            "task": task.name,
            "scoring": scoring,
            "source": task.source,
            "split": data.split,
            "skipped": f"no valid record ({len(data.malformed)} malformed)",
            "metrics": {},
            **dropped,
        }
    chosen = subset(len(data.examples), config.limit, config.fraction, config.seed)
    examples = [data.examples[i] for i in chosen]
    prompt_format = task.prompt_format(scoring)
    header = few_shot_header(prompt_format.instruction, data.shots)
    prompts = [prompt(header, sample) for sample in examples]
    batcher = Batcher(config.batch_size, config.max_batch_size, logger)
    name = f"{task.name}-{scoring}"
    if prompts:
        (run_dir / "prompts").mkdir(exist_ok=True)
        (run_dir / "prompts" / f"{name}.txt").write_text(prompts[0], encoding="utf-8")
    with Progress(f"{task.name} {scoring}", total=len(examples), unit="questions") as progress:
        if scoring == "loglik":
            metrics, rows, extra, truncated = _loglik(loaded, examples, prompts, batcher, progress)
        else:
            limit = _answer_length(config, loaded, task, data, logger)
            metrics, rows, extra, truncated = _generation(
                loaded, task, examples, prompts, batcher, progress, limit
            )
    _write_jsonl(run_dir / "predictions" / f"{name}.jsonl", rows)
    if truncated:
        logger.warning(
            "%s %s: %s of %s prompts were longer than max_length %s and lost their start",
            task.name,
            scoring,
            truncated,
            len(prompts),
            loaded.max_length,
        )
    return {
        "task": task.name,
        "scoring": scoring,
        "source": task.source,
        **_described(data, len(examples), shots),
        "prompt_version": prompt_format.version,
        "prompt_sha256": hashlib.sha256(header.encode("utf-8")).hexdigest(),
        "metrics": metrics,
        **extra,
        "truncated_prompts": truncated,
        "max_length": loaded.max_length,
        "batch_size": batcher.size,
        **dropped,
    }


def _answer_length(config, loaded, task, data, logger):
    from eval.answer_length import answer_length

    golds = [sample.output for sample in [*data.examples, *data.shots]]
    limit = answer_length(
        loaded.encode_answers,
        golds,
        task.output_length,
        config.task_max_new_tokens.get(task.name),
    )
    if limit.golds_longer_than_limit:
        logger.warning(
            "%s: %s gold answers are longer than the generation limit of %s tokens "
            "(longest %s); raise task_max_new_tokens.%s",
            task.name,
            limit.golds_longer_than_limit,
            limit.max_new_tokens,
            limit.longest_gold_tokens,
            task.name,
        )
    return limit


def _described(data: TaskData, evaluated: int, shots: int) -> dict[str, Any]:
    return {"split": data.split, "examples": evaluated, "of": len(data.examples), "shots": shots}


def _loglik(loaded, examples, prompts, batcher, progress):
    from eval.loglik import build_requests, score_choices
    from eval.metrics import choice_accuracy

    requests = build_requests(loaded, prompts, [sample.choices for sample in examples])
    scores = score_choices(loaded, requests, batcher, progress.update)
    labels = [sample.choices.index(sample.output) for sample in examples]
    choices = [sample.choices for sample in examples]
    metrics = choice_accuracy(scores, choices, labels)
    rows = [
        {
            "id": sample.id,
            "gold": label,
            "predicted": max(range(len(s)), key=lambda i: (s[i], -i)),
            "logliks": [round(v, 6) for v in s],
            "continuation_tokens": [len(c) for c in request.continuations],
        }
        for sample, label, s, request in zip(examples, labels, scores, requests, strict=True)
    ]
    extra = {"decoding": {"kind": "log-likelihood of each choice, context run once per question"}}
    return metrics, rows, extra, sum(r.truncated for r in requests)


def _generation(loaded, task, examples, prompts, batcher, progress, limit):
    from eval.generate import Decoding, generate, prompt_ids
    from eval.metrics import ANSWER_END, GENERATION_METRICS, normalize_gold, normalize_prediction

    # The prediction ends at the first blank line (normalize_prediction), so a row stops there:
    # a trained model would otherwise go on to write the next few-shot example to the limit.
    decoding = Decoding(max_new_tokens=limit.max_new_tokens, stop_strings=(ANSWER_END,))
    encoded = prompt_ids(loaded, prompts, decoding.max_new_tokens)
    outputs = generate(loaded, [ids for ids, _ in encoded], decoding, batcher, progress.update)
    predictions = [normalize_prediction(text) for text in outputs]
    golds = [normalize_gold(sample.output) for sample in examples]
    metrics = {name: GENERATION_METRICS[name](predictions, golds) for name in task.metrics}
    rows = [
        {"id": sample.id, "gold": gold, "prediction": prediction, "output": output}
        for sample, gold, prediction, output in zip(
            examples, golds, predictions, outputs, strict=True
        )
    ]
    extra = {"decoding": decoding.summary(), "answer_length": limit.summary()}
    return metrics, rows, extra, sum(cut for _, cut in encoded)


def _bpc(config: EvalConfig, loaded: LoadedModel, logger: logging.Logger) -> dict[str, Any]:
    from eval.bpc import bits_per_character, prepare_windows, read_texts

    texts, malformed = read_texts(config.bpc.texts, config.bpc.max_documents)
    if malformed:
        logger.warning(
            "bpc: %s unreadable lines or damaged files in bpc.texts were skipped", malformed
        )
    if not texts:
        logger.warning("bpc: no readable document in bpc.texts; task skipped")
        return {
            "task": BPC_TASK,
            "scoring": "bpc",
            "source": ", ".join(str(p) for p in config.bpc.texts),
            "split": "held-out text",
            "skipped": f"no readable document ({malformed} unreadable)",
            "metrics": {},
            "figures": {"unreadable_lines": malformed},
        }
    prepared = prepare_windows(loaded, texts, config.bpc.stride)
    batcher = Batcher(config.batch_size, config.max_batch_size, logger)
    with Progress("bpc", total=len(prepared.rows), unit="windows") as progress:
        figures = bits_per_character(loaded, prepared, batcher, progress.update)
    bpc = figures.pop("bpc")
    return {
        "task": BPC_TASK,
        "scoring": "bpc",
        "source": ", ".join(str(p) for p in config.bpc.texts),
        "split": "held-out text",
        "examples": figures["documents"],
        "of": figures["documents"],
        "shots": 0,
        "prompt_version": "none",
        "metrics": {"bpc": bpc},
        "figures": {**figures, "unreadable_lines": malformed},
        "truncated_prompts": 0,
        "max_length": loaded.max_length,
        "batch_size": batcher.size,
    }


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
