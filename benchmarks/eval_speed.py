"""JCommonsenseQA valid (1,119 questions) by log-likelihood and by generation: wall time and questions/s.

Usage (on a GPU node, any Hugging Face causal LM directory):
  python benchmarks/eval_speed.py --model DIR [--jglue ../shared/data/eval/jglue] [--device cuda]
      [--dtype bfloat16] [--batch-size auto] [--shots 4] [--limit N] [--recompute] [--json FILE]

Each mode runs kinoe's own code (``kinoe eval run``'s scorers) on the same questions, after one
untimed warm-up batch, with the model loaded once and checked to sit wholly on the device:

- ``loglik``: the five choice texts scored after the prompt, the prompt run once per question
  and its key/value cache shared by the choices (``eval/loglik.py``);
- ``loglik-recompute`` (with ``--recompute``): the same scores the plain way, one row per
  (question, choice) holding prompt and choice, to measure what sharing the context saves;
- ``generation``: llm-jp-eval's prompt and greedy generation of its one-token answer.

Wall time covers tokenization, batching and the forward passes, not model loading. The table
gives questions/s, the score, the batch size used and the peak GPU memory of each mode.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from eval.config import EvalConfig
from eval.data import load_task
from eval.generate import Decoding, generate, prompt_ids
from eval.loglik import build_requests, score_choices
from eval.metrics import choice_accuracy, exact_match, normalize_gold, normalize_prediction
from eval.model import Batcher, load_model
from eval.tasks import REGISTRY
from eval.tasks.base import few_shot_header, prompt

LOGGER = logging.getLogger("eval_speed")
TASK = REGISTRY["jcommonsenseqa"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(loaded, run, count: int) -> dict:
    device = loaded.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    started = time.perf_counter()
    figures = run()
    _sync(device)
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "questions": count,
        "wall_s": wall,
        "questions_per_s": count / wall,
        "peak_gib": peak,
        **figures,
    }


def _loglik(loaded, args, samples, shots, warmup: bool = False):
    header = few_shot_header(TASK.loglik.instruction, shots)
    batcher = Batcher(args.batch_size, args.max_batch_size, LOGGER)

    def run():
        requests = build_requests(
            loaded, [prompt(header, s) for s in samples], [s.choices for s in samples]
        )
        scores = score_choices(loaded, requests, batcher)
        labels = [s.choices.index(s.output) for s in samples]
        return {
            **choice_accuracy(scores, [s.choices for s in samples], labels),
            "batch_size": batcher.size,
        }

    return run() if warmup else _timed(loaded, run, len(samples))


@torch.inference_mode()
def _recompute_rows(loaded, rows):
    """Log-likelihood of each (context, continuation) row, context recomputed in every row."""
    width = max(len(c) + len(x) for c, x in rows)
    ids = torch.full((len(rows), width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (context, continuation) in enumerate(rows):
        tokens = context + continuation
        ids[r, width - len(tokens) :] = torch.tensor(tokens)
        mask[r, width - len(tokens) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = loaded.model(
        input_ids=ids.to(loaded.device),
        attention_mask=mask.to(loaded.device),
        position_ids=positions.to(loaded.device),
    ).logits
    scores = []
    for r, (_, continuation) in enumerate(rows):
        n = len(continuation)
        logprobs = logits[r, width - n - 1 : width - 1].float().log_softmax(-1)
        target = torch.tensor(continuation, device=loaded.device)[:, None]
        scores.append(logprobs.gather(-1, target).sum().item())
    return scores


def _loglik_recompute(loaded, args, samples, shots):
    header = few_shot_header(TASK.loglik.instruction, shots)
    batcher = Batcher(args.batch_size, args.max_batch_size, LOGGER)

    def run():
        requests = build_requests(
            loaded, [prompt(header, s) for s in samples], [s.choices for s in samples]
        )
        rows = [(r.context, c) for r in requests for c in r.continuations]
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        # Batch sizes count questions elsewhere; here five rows make one question's worth.
        per_row = Batcher(args.batch_size, args.max_batch_size * 5, LOGGER)
        if not per_row.auto:
            per_row.size = batcher.size * 5
        flat = per_row.run([rows[i] for i in order], lambda chunk: _recompute_rows(loaded, chunk))
        scores = [0.0] * len(rows)
        for position, index in enumerate(order):
            scores[index] = flat[position]
        grouped = [scores[i * 5 : i * 5 + 5] for i in range(len(samples))]
        labels = [s.choices.index(s.output) for s in samples]
        figures = choice_accuracy(grouped, [s.choices for s in samples], labels)
        return {**figures, "batch_size": f"{per_row.size} rows"}

    return _timed(loaded, run, len(samples))


def _generation(loaded, args, samples, shots, warmup: bool = False):
    header = few_shot_header(TASK.generation.instruction, shots)
    decoding = Decoding(max_new_tokens=TASK.output_length)
    batcher = Batcher(args.batch_size, args.max_batch_size, LOGGER)

    def run():
        texts = [prompt(header, s) for s in samples]
        ids = [ids for ids, _ in prompt_ids(loaded, texts, decoding.max_new_tokens)]
        outputs = generate(loaded, ids, decoding, batcher)
        predictions = [normalize_prediction(text) for text in outputs]
        golds = [normalize_gold(s.output) for s in samples]
        return {"exact_match": exact_match(predictions, golds), "batch_size": batcher.size}

    return run() if warmup else _timed(loaded, run, len(samples))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--jglue", type=Path, default=Path("../shared/data/eval/jglue"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch-size", default="auto", help="questions per batch, or auto")
    parser.add_argument("--max-batch-size", type=int, default=64, help="where auto starts")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--limit", type=int, help="the first N questions (default: all 1,119)")
    parser.add_argument("--recompute", action="store_true", help="also time loglik without sharing")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.batch_size = "auto" if args.batch_size == "auto" else int(args.batch_size)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    config = EvalConfig(model=args.model, device=args.device, dtype=args.dtype)
    started = time.perf_counter()
    loaded = load_model(config, LOGGER)
    load_s = time.perf_counter() - started
    by_mode = {}
    for mode in ("loglik", "generation"):
        data = load_task(TASK, mode, args.jglue, "test", args.shots, 42)
        by_mode[mode] = (data.examples[: args.limit] if args.limit else data.examples, data.shots)

    results = {}
    for mode, run in (("loglik", _loglik), ("generation", _generation)):
        samples, shots = by_mode[mode]
        run(loaded, args, samples[:8], shots, warmup=True)
        LOGGER.info("%s: timing %s questions", mode, len(samples))
        results[mode] = run(loaded, args, samples, shots)
    if args.recompute:
        samples, shots = by_mode["loglik"]
        LOGGER.info("loglik-recompute: timing %s questions", len(samples))
        results["loglik-recompute"] = _loglik_recompute(loaded, args, samples, shots)

    device_name = (
        torch.cuda.get_device_name(loaded.device)
        if loaded.device.type == "cuda"
        else platform.processor() or "cpu"
    )
    print()
    print(
        f"JCommonsenseQA valid, {args.shots}-shot, {loaded.info['architecture']} "
        f"{loaded.info['parameters'] / 1e9:.2f}B, {args.dtype} on {device_name}; "
        f"torch {torch.__version__}; model load {load_s:.1f} s"
    )
    print("| mode | questions | wall s | questions/s | score | batch | peak GiB |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for mode, r in results.items():
        score = (
            f"exact_match {r['exact_match']:.4f}"
            if "exact_match" in r
            else f"acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f}"
        )
        peak = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(
            f"| {mode} | {r['questions']:,} | {r['wall_s']:.1f} | {r['questions_per_s']:.1f} "
            f"| {score} | {r['batch_size']} | {peak} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"device": device_name, "model": loaded.info, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
