"""Training step time of `kinoe pretrain` and `kinoe finetune sft`, for this tree or others.

Each row is one process running a source tree's own CLI on the same data: pretraining of
``--preset`` (sequence ``--seq-len``, ZeRO-2, bf16, compiled blocks, FlexAttention with document
masks, as configs/pretrain/mistral_1b_ja.yaml trains) and full SFT of a random model of the same
preset. The driver times the run from outside, from when each record reaches the run's
``metrics.jsonl``: a tree that reads its figures once per log interval writes records only then,
so time is taken between flushes (steps at multiples of ``--log-interval``, where either kind of
loop has waited for the GPU), never from a step's own host-side timer. The first
``--warmup-steps`` steps (compilation included) are not timed; the process is stopped once the
last timed record is written, before its final checkpoint.

Per row: s/step (the median over the timed log intervals, each the interval's wall time over its
steps), tokens/s (the records' tokens over the timed wall time), and MFU = tokens/s x FLOPs per
token / 989e12 (dense bf16 peak of an H100/H200), FLOPs per token = 6 N + 12 L H K T (N:
non-embedding parameters plus the output projection; the attention term counts the whole T x T
score matrix, so the causal half and the cross-document tiles FlexAttention skips are counted as
work done).

With ``--checkpoint-interval N`` the rows save a checkpoint every N steps inside the timed
window, and a second table gives each save's wall time, size, and how long the rank waited for
the files' digests after its last write (the digests' share of the stall; the hashing
otherwise overlaps DeepSpeed's writes), from the trainer's log.

With ``--evaluation-interval N`` the pretraining rows evaluate while training
(``monitor.evaluation``: bits per character of held-out text, JCommonsenseQA and JNLI by
log-likelihood on 100 questions each) every N steps inside the timed window, and a third table
gives each evaluation's seconds and its cost against N steps of training at the row's step time.

    python benchmarks/step_time.py prepare --data DIR            # CPU, this tree: tokenizer, shards, SFT data
    python benchmarks/step_time.py run --data DIR --code before=OLD --code after=NEW --repeat 2
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PEAK_FLOPS = 989e12
# Checkpointer.save's log line: seconds, files, GB, and this rank's wait for the digests.
SAVED = r"saved in ([\d.]+) s: (\d+) files, ([\d.]+) GB; this rank waited ([\d.]+) s"
SHARED_DATA = REPO.parent / "shared" / "data"
PRETRAIN_SOURCES = {"wikipedia": "wikipedia_ja_leads", "web": "fineweb2_ja_web"}


# ---- data, made once on any machine with this tree ----


def prepare(data: Path, shared: Path, vocab_size: int) -> None:
    """Tokenizer (SentencePiece + HF directory with the chat template), token shards, SFT JSONL."""
    from common.run import run_stage
    from data_prep.normalise import normalise_text
    from data_prep.source_presets import source_preset
    from tokenizer.cli import STEPS
    from tokenizer.config import TokenizerConfig

    documents = data / "documents"
    documents.mkdir(parents=True, exist_ok=True)
    for name, file in PRETRAIN_SOURCES.items():
        with (
            gzip.open(shared / "corpus" / f"{file}.jsonl.gz", "rt", encoding="utf-8") as source,
            gzip.open(documents / f"{name}.jsonl.gz", "wt", encoding="utf-8") as target,
        ):
            for record in map(json.loads, source):
                text = normalise_text(record["text"], source_preset(name).normalise)
                if text:
                    document = {"id": record["id"], "text": text, "source": name, "metadata": {}}
                    target.write(json.dumps(document, ensure_ascii=False) + "\n")
    config = TokenizerConfig.model_validate(
        {
            "run": {"root": str(data / "runs"), "name": "step-time"},
            "sample": {"documents": str(documents), "character_budget": 300_000},
            "trainer": {"vocab_size": vocab_size, "character_coverage": 0.995, "num_threads": 2},
            "executor": {"tasks": 1, "workers": 1},
        }
    )
    for step in ("train", "export", "encode"):
        run_stage(STEPS[step], config)
    # Every JCommonsenseQA train question as a user/assistant conversation.
    lines = (shared / "eval" / "jglue" / "jcommonsenseqa-train.json").read_text("utf-8")
    with (data / "sft.jsonl").open("w", encoding="utf-8") as target:
        for line in lines.splitlines():
            question = json.loads(line)
            choices = [question[f"choice{index}"] for index in range(5)]
            listed = "、".join(f"{index}. {choice}" for index, choice in enumerate(choices))
            messages = [
                {"role": "user", "content": f"{question['question']}\n選択肢: {listed}"},
                {"role": "assistant", "content": f"答えは「{choices[question['label']]}」です。"},
            ]
            target.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def data_paths(data: Path) -> dict:
    from tokenizer.cli import hf_path, model_path, shards_path
    from tokenizer.config import TokenizerConfig

    config = TokenizerConfig.model_validate(
        {"run": {"root": str(data / "runs"), "name": "step-time"},
         "sample": {"documents": str(data / "documents")}}
    )  # fmt: skip
    shards = shards_path(config)
    return {
        "tokenizer": model_path(config),
        "held_out": model_path(config).parent / "held_out.jsonl",
        "hf_tokenizer": hf_path(config),
        "sources": {name: shards / name for name in PRETRAIN_SOURCES},
        "sft": data / "sft.jsonl",
    }


# ---- one row: a tree's CLI in its own process ----


def row_config(task: str, args: argparse.Namespace, paths: dict, root: Path, model: Path) -> dict:
    """The config both trees accept (their sections and keys are the same for these)."""
    engine = {"zero_stage": args.zero_stage, "precision": args.precision, "compile": args.compile}
    if args.expert_parallel > 1:  # only then: trees before the setting accept the config
        engine["expert_parallel"] = args.expert_parallel
    if getattr(args, "fp8", None):  # likewise
        engine["fp8"] = args.fp8
    monitor: dict = {"log_interval": args.log_interval}
    if getattr(args, "evaluation_interval", None):  # only then: older trees lack the section
        monitor["evaluation"] = {
            "interval": args.evaluation_interval,
            "tokenizer": str(paths["hf_tokenizer"]),
            "bpc_texts": [str(paths["held_out"])],
            "tasks": ["jcommonsenseqa", "jnli"],
            "jglue_dir": str(args.eval_data / "jglue"),
        }
    common = {
        "run": {"root": str(root), "name": "bench"},
        "engine": engine,
        # By default only the final one, which the driver never waits for.
        "checkpoint": {
            "interval": getattr(args, "checkpoint_interval", None) or 100_000,
            "keep_last": 1,
        },
        "monitor": monitor,
    }
    if task == "pretrain":
        seed = {"seed": args.seed} if getattr(args, "seed", None) is not None else {}
        return common | {
            "model": {"family": args.family, "preset": args.preset,
                      "overrides": {"attention": args.attention, **args.overrides}},
            "data": {
                "tokenizer": str(paths["tokenizer"]),
                "sources": {name: str(path) for name, path in paths["sources"].items()},
                "phases": [{"name": "pretrain", "start": 0.0,
                            "mixture": dict.fromkeys(paths["sources"], 1.0)}],
                "seq_len": args.seq_len,
                "num_workers": 2,
            },
            "train": {"steps": 1, "global_batch_size": args.global_batch,
                      "micro_batch_size": args.micro_batch, **seed},
            "optimizer": {"lr": 3e-4},
            "schedule": {"kind": "wsd", "warmup_steps": args.warmup_steps},
        }  # fmt: skip
    return common | {
        "model": {"path": str(model), "overrides": {"attention": args.attention}},
        "data": {"train": [str(paths["sft"])], "eval_fraction": 0.02,
                 "max_length": args.sft_max_length},
        "train": {"epochs": 3, "global_batch_size": args.global_batch,
                  "micro_batch_size": args.micro_batch, "eval_interval": 100_000},
        "optimizer": {"lr": 1e-5},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
    }  # fmt: skip


def _new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSON lines appended to ``path`` since ``offset``; the new offset."""
    if not path.is_file():
        return [], offset
    with path.open("rb") as handle:
        handle.seek(offset)
        chunk = handle.read()
    end = chunk.rfind(b"\n") + 1
    lines = chunk[:end].decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()], offset + end


def run_row(task: str, code: Path, args: argparse.Namespace, paths: dict, root: Path,
            model: Path) -> dict:  # fmt: skip
    """Run one tree's CLI for ``task``; the arrival time of each step's record."""
    root.mkdir(parents=True)
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(row_config(task, args, paths, root, model),
                                          allow_unicode=True))  # fmt: skip
    total = args.warmup_steps + args.timed_steps
    command = [sys.executable, "-m", "launch.cli"]
    if args.gpus > 1:  # one process per GPU, as on a node of the cluster
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*torchrun, f"--nproc_per_node={args.gpus}", "-m", "launch.cli"]
    if task == "pretrain":
        command += ["pretrain", "-c", str(config_path), f"train.steps={total}"]
        metrics = root / "pretrain" / "bench" / "metrics.jsonl"
    else:
        command += ["finetune", "sft", "-c", str(config_path)]
        metrics = root / "finetune" / "bench" / "sft" / "metrics.jsonl"
    # The tree's own packages first; nothing of this checkout (an editable install of it is
    # still on sys.path, after them, but the trees name the same packages).
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if p and Path(p).resolve() != REPO]  # fmt: skip
    # NVLink multicast stays off on the lent machines (their notes say why).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), *inherited]),
           "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0"}  # fmt: skip
    arrivals: dict[int, tuple[float, int]] = {}
    offset, deadline = 0, time.monotonic() + args.row_timeout
    with (root / "output.log").open("w") as log:
        process = subprocess.Popen(command, cwd=code, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            while process.poll() is None and time.monotonic() < deadline:
                records, offset = _new_records(metrics, offset)
                now = time.perf_counter()
                for record in records:
                    arrivals[record["step"]] = (now, record["tokens"])
                if total in arrivals:
                    break
                time.sleep(0.005)
            records, offset = _new_records(metrics, offset)  # written just before an exit
            arrivals.update({r["step"]: (time.perf_counter(), r["tokens"]) for r in records})
        finally:
            # Stops the run and its data workers before the final checkpoint: a row needs
            # only its timed records, and writing 14 GB of optimizer state would only cost time.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = (root / "output.log").read_text(errors="replace")
    if total not in arrivals:
        return {"error": f"{len(arrivals)} of {total} steps recorded; log {root / 'output.log'}:"
                         f"\n{text[-3000:]}"}  # fmt: skip
    marks = list(range(args.warmup_steps, total + 1, args.log_interval))
    intervals = [(arrivals[b][0] - arrivals[a][0]) / (b - a) for a, b in itertools.pairwise(marks)]
    seconds = arrivals[total][0] - arrivals[args.warmup_steps][0]
    tokens = sum(arrivals[s][1] for s in range(args.warmup_steps + 1, total + 1))
    peaks = [float(m) for m in re.findall(r"max allocated ([\d.]+) GiB", text)]
    saves = [tuple(map(float, found)) for found in re.findall(SAVED, text)]
    evaluations = root / "pretrain" / "bench" / "evaluation.jsonl"
    evaluated = [json.loads(line) for line in evaluations.read_text().splitlines()
                 if line.strip()] if evaluations.is_file() else []  # fmt: skip
    return {"step_s": statistics.median(intervals), "intervals": intervals,
            "tokens_per_s": tokens / seconds, "peak_gib": max(peaks, default=None),
            "saves": saves, "evaluation_s": [e["eval/seconds"] for e in evaluated]}  # fmt: skip


# ---- the driver ----


def _flops_per_token(family: str, preset: str, length: int, overrides: dict | None = None) -> float:
    from models import FAMILIES

    args = FAMILIES[family].presets[preset]()
    args = type(args).model_validate({**args.model_dump(), **(overrides or {})})
    return args.flops_per_token(length)


def run(args: argparse.Namespace) -> int:
    # A driver stopped by `timeout` must still stop the row it runs (in a session of its own).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    codes = dict(item.split("=", 1) for item in args.code) if args.code else {"this": str(REPO)}
    codes = {name: Path(path).resolve() for name, path in codes.items()}
    paths = data_paths(args.data.resolve())
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"{args.preset}-random"
    if "sft" in args.tasks:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from finetune_throughput import write_model  # the fine-tuning benchmark's random model

        write_model(args.preset, paths["hf_tokenizer"], model)
    rows, failed = [], []
    # Interleaved (task, then each tree, then again): drift of the machine shows as noise
    # between repeats instead of as a difference between trees.
    for repeat in range(args.repeat):
        for task in args.tasks.split(","):
            for name, code in codes.items():
                root = work / "rows" / f"{task}-{name}-{repeat}"
                started = time.perf_counter()
                result = run_row(task, code, args, paths, root, model)
                result |= {"task": task, "code": name, "repeat": repeat,
                           "wall_s": time.perf_counter() - started}  # fmt: skip
                print("ROW " + json.dumps(result), flush=True)
                (failed if "error" in result else rows).append(result)
    print(f"\n{args.preset}; pretraining seq {args.seq_len}, SFT max length {args.sft_max_length};"
          f" micro-batch {args.micro_batch}, global batch {args.global_batch}; ZeRO-{args.zero_stage} "
          f"{args.precision}, compile {args.compile}, {args.attention}; steps "
          f"{args.warmup_steps + 1}-{args.warmup_steps + args.timed_steps} timed")  # fmt: skip
    print("| task | code | repeat | s/step (median) | tokens/s | MFU | peak GiB | row wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        length = args.seq_len if row["task"] == "pretrain" else args.sft_max_length
        mfu = (
            row["tokens_per_s"]
            * _flops_per_token(args.family, args.preset, length, args.overrides)
            / PEAK_FLOPS
        )
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        print(
            f"| {row['task']} | {row['code']} | {row['repeat']} | {row['step_s']:.4f} | "
            f"{row['tokens_per_s']:,.0f} | {100 * mfu:.1f}% | {peak} | {row['wall_s']:.0f} |"
        )
    saved = [row for row in rows if row["saves"]]
    if saved:
        print("\nCheckpoints written inside the timed steps (from the trainer's log):")
        print("| task | code | repeat | checkpoints | GB each | files | save s (median) | "
              "of which waiting for digests s |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for row in saved:
            seconds, files, gigabytes, waited = zip(*row["saves"], strict=True)
            print(
                f"| {row['task']} | {row['code']} | {row['repeat']} | {len(seconds)} | "
                f"{gigabytes[-1]:.2f} | {files[-1]:.0f} | {statistics.median(seconds):.2f} | "
                f"{statistics.median(waited):.2f} |"
            )
    evaluated = [row for row in rows if row.get("evaluation_s")]
    if evaluated:
        interval = args.evaluation_interval
        print(f"\nEvaluation while training (monitor.evaluation every {interval} steps: bits per"
              " character of 50 held-out documents, JCommonsenseQA and JNLI log-likelihood on 100"
              " questions each), from evaluation.jsonl:")  # fmt: skip
        print("| task | code | repeat | evaluations | seconds each (median) | step s without | "
              f"cost at every {interval} steps |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|")
        for row in evaluated:
            seconds = statistics.median(row["evaluation_s"])
            step = min(row["intervals"])  # an interval holding no evaluation
            print(
                f"| {row['task']} | {row['code']} | {row['repeat']} | {len(row['evaluation_s'])} |"
                f" {seconds:.2f} | {step:.4f} | {100 * seconds / (seconds + interval * step):.2f}% |"
            )
    for row in failed:
        print(f"FAILED {row['task']} {row['code']} {row['repeat']}: {row['error']}",
              file=sys.stderr)  # fmt: skip
    return 1 if failed or not rows else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("prepare", help="tokenizer, token shards and SFT data (CPU)")
    make.add_argument("--data", type=Path, required=True)
    make.add_argument("--shared", type=Path, default=SHARED_DATA, help="../shared/data")
    make.add_argument("--vocab-size", type=int, default=8192)
    rows = commands.add_parser("run", help="the rows, one process each")
    rows.add_argument("--data", type=Path, required=True, help="what `prepare` wrote")
    rows.add_argument("--code", action="append", metavar="NAME=DIR",
                      help="a source tree to run (repeatable); default: this one")  # fmt: skip
    rows.add_argument("--tasks", default="pretrain,sft")
    rows.add_argument("--repeat", type=int, default=2)
    rows.add_argument("--work", type=Path, default=Path("runs/bench/step_time"))
    rows.add_argument("--family", default="mistral", help="mixtral: pretraining only")
    rows.add_argument("--gpus", type=int, default=1, help="processes (torchrun) per row")
    rows.add_argument("--zero-stage", type=int, default=2, choices=(1, 2, 3))
    rows.add_argument("--expert-parallel", type=int, default=1)
    rows.add_argument("--fp8", choices=("tensorwise", "rowwise"), default=None)
    rows.add_argument(
        "--overrides",
        type=json.loads,
        default={},
        help="model overrides as JSON, e.g. '{\"num_layers\": 14}'",
    )
    rows.add_argument("--preset", default="mistral_1b")
    rows.add_argument("--seq-len", type=int, default=4096)
    rows.add_argument("--sft-max-length", type=int, default=2048)
    rows.add_argument("--micro-batch", type=int, default=4)
    rows.add_argument("--global-batch", type=int, default=16)
    rows.add_argument("--precision", default="bf16")
    rows.add_argument("--attention", default="flex")
    rows.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    rows.add_argument("--log-interval", type=int, default=10)
    rows.add_argument("--warmup-steps", type=int, default=10)
    rows.add_argument("--timed-steps", type=int, default=30)
    rows.add_argument("--checkpoint-interval", type=int, default=None,
                      help="save every N steps (keep_last 1) and report each save's time")  # fmt: skip
    rows.add_argument("--evaluation-interval", type=int, default=None,
                      help="evaluate while training every N steps; report its cost")  # fmt: skip
    rows.add_argument("--eval-data", type=Path, default=SHARED_DATA / "eval",
                      help="the folder holding jglue/ for --evaluation-interval")  # fmt: skip
    rows.add_argument("--row-timeout", type=float, default=600.0, help="seconds per row")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.data, args.shared, args.vocab_size)
        print(json.dumps({k: str(v) for k, v in data_paths(args.data).items()}, indent=1))
        return
    if args.timed_steps % args.log_interval or args.warmup_steps % args.log_interval:
        parser.error("--warmup-steps and --timed-steps must be multiples of --log-interval")
    sys.exit(run(args))


if __name__ == "__main__":
    main()
