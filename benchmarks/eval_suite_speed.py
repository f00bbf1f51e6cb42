"""The whole `kinoe eval run` suite on one GPU: wall time per task and scoring mode, and in all.

Usage (on a GPU node):
  python benchmarks/eval_suite_speed.py --tokenizer HF_TOKENIZER_DIR [--data-dir ../shared/data/eval]
      [--model DIR | --preset mistral_1b] [--config configs/eval/llm_jp_eval.yaml]
      [--work runs/bench/eval_suite] [--limit N] [--set KEY=VALUE ...] [--json FILE]

Runs this tree's `kinoe eval run` in its own process with ``--config`` (default: every
llm-jp-eval dataset kinoe has, each by generation and, where the answers are a closed set, by
log-likelihood; full files, no limit) on ``--model``, or on a random model of ``--preset``
written with ``--tokenizer`` when no model is given. A random model is the slow case for
generation: it rarely stops before the limit, so every answer runs to each task's
``max_new_tokens``, where a trained model stops at the end of its answer.

Wall time is measured from outside (process start to exit: imports, model loading, reading
every file, every task) and per task from the report's ``wall_s`` (reading the task's files,
tokenising, batching and the forward passes). Exits non-zero when the suite fails or a task
is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_EVAL = REPO.parent / "shared" / "data" / "eval"


def versions() -> str:
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a Hugging Face model directory")
    parser.add_argument("--preset", default="mistral_1b", help="the random model's shapes")
    parser.add_argument("--tokenizer", type=Path, help="HF tokenizer for the random model")
    parser.add_argument("--overrides", type=json.loads, default={},
                        help="the random model's shape overrides as JSON")  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=SHARED_EVAL)
    parser.add_argument("--config", type=Path, default=REPO / "configs/eval/llm_jp_eval.yaml")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/eval_suite"))
    parser.add_argument("--limit", type=int, help="the first N examples of each task")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for `kinoe eval run` (repeatable)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the suite")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    work = args.work.resolve()
    model = args.model
    if model is None:
        if args.tokenizer is None:
            parser.error("pass --model, or --tokenizer to write a random model of --preset")
        sys.path.insert(0, str(REPO / "benchmarks"))
        from finetune_throughput import write_model  # the fine-tuning benchmark's random model

        started = time.perf_counter()
        model = write_model(
            args.preset, args.tokenizer.resolve(), work / f"{args.preset}-random", args.overrides
        )
        print(f"random {args.preset} written in {time.perf_counter() - started:.1f} s", flush=True)
    data_dir = args.data_dir.resolve()
    command = [
        sys.executable, "-m", "launch.cli", "eval", "run", "-c", str(args.config.resolve()),
        f"model={model.resolve()}", f"data_dir={data_dir}", f"jglue_dir={data_dir / 'jglue'}",
        f"run.root={work}", "run.name=suite", *args.set,
    ]  # fmt: skip
    if args.limit:
        command.append(f"--limit={args.limit}")
    inherited = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), inherited) if p)}  # fmt: skip
    started = time.perf_counter()
    try:
        finished = subprocess.run(command, cwd=REPO, env=env, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        sys.exit(f"the suite ran past --timeout {args.timeout:.0f} s")
    wall = time.perf_counter() - started
    report_path = work / "eval" / "suite" / "run" / "report.json"
    if finished.returncode != 0 or not report_path.is_file():
        sys.exit(f"kinoe eval run exited {finished.returncode}; no report at {report_path}")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    results = report["results"]

    print(f"\n{versions()}; model {model}")
    print("| task | scoring | examples | max new tokens | batch | wall s | examples/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for result in results:
        if result.get("skipped"):
            print(f"| {result['task']} | {result['scoring']} | skipped: {result['skipped']} |||||")
            continue
        new_tokens = (result.get("answer_length") or {}).get("max_new_tokens", "-")
        print(
            f"| {result['task']} | {result['scoring']} | {result['examples']:,} | {new_tokens} | "
            f"{result['batch_size']} | {result['wall_s']:.1f} | {result['examples_per_s']:,.1f} |"
        )
    tasks_s = sum(r.get("wall_s", 0.0) for r in results)
    print(f"| **all tasks** | | {sum(r.get('examples', 0) for r in results):,} | | | "
          f"{tasks_s:.1f} | |")  # fmt: skip
    print(f"| **whole command** (start to exit, model loading included) | | | | | {wall:.1f} | |")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": wall, "results": results}, indent=1) + "\n")
    skipped = [r["task"] for r in results if r.get("skipped")]
    if skipped:
        sys.exit(f"skipped tasks: {', '.join(skipped)}")


if __name__ == "__main__":
    main()
