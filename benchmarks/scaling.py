"""Multi-GPU scaling of `kinoe pretrain` on one host: ZeRO over 1-8 GPUs and expert parallelism.

Each row is `kinoe pretrain` under torchrun with one process per GPU, timed from outside as
`benchmarks/step_time.py` times a row (its `run_row`: records' arrival in metrics.jsonl after
the warm-up steps, the run stopped before its final checkpoint). Weak scaling: every GPU keeps
`--micro-batch` sequences of `--seq-len` tokens and `--accumulation` micro-batches per step, so
the global batch grows with the GPUs. Cases, each on as many GPUs as the machine has (at most 8):

- `dense`: mistral_1b, ZeRO-2, at 1, 2, 4 and 8 GPUs; tokens/s per GPU and the share of the
  1-GPU figure each keeps (goal: 95% at 8);
- `7b`: mistral_7b, ZeRO-3 with partitioned construction, on all GPUs; MFU (goal: 50%);
- `moe`: mixtral_1b_active, ZeRO-2 without expert parallelism, then EP = 2, 4, 8, all on all
  GPUs (goal: 1.3x tokens/s per GPU at 8);
- `big`: Mixtral 8x7B's shapes cut to 14 of 32 layers (20.2B parameters), EP = all GPUs with
  ZeRO-2, 20 steps; its peak memory is to be set beside `kinoe preflight --estimate-only`'s.

MFU = tokens/s per GPU x FLOPs per token / 989e12 (dense bf16 peak of an H100/H200), FLOPs per
token = 6 N + 12 L H K T with N the parameters a token passes through (Mixtral: attention,
router, its top-k experts; the output layer included); the attention term counts the whole
T x T score matrix, so the tiles FlexAttention's document masks skip count as work done.

    python benchmarks/step_time.py prepare --data DATA          # once, CPU
    python benchmarks/scaling.py --data DATA                    # every case
    python benchmarks/scaling.py --data DATA --cases moe --gpus 2,4

Exits non-zero when any row could not run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from step_time import PEAK_FLOPS, _flops_per_token, data_paths, run_row  # noqa: E402

BIG = {"num_layers": 14}


def plan(case: str, gpus: list[int]) -> list[dict]:
    """The rows of one case: family, preset, GPUs, ZeRO stage, EP and model overrides."""
    most = max(gpus)
    if case == "dense":
        return [dict(family="mistral", preset="mistral_1b", gpus=n, zero_stage=2) for n in gpus]
    if case == "7b":
        return [dict(family="mistral", preset="mistral_7b", gpus=most, zero_stage=3)]
    if case == "moe":
        eps = [1, *[e for e in (2, 4, 8) if e <= most and most % e == 0]]
        return [
            dict(family="mixtral", preset="mixtral_1b_active", gpus=most, zero_stage=2,
                 expert_parallel=ep)
            for ep in eps
        ]  # fmt: skip
    if case == "big":
        return [dict(family="mixtral", preset="mixtral_8x7b", gpus=most, zero_stage=2,
                     expert_parallel=most, overrides=BIG, timed_steps=20)]  # fmt: skip
    raise SystemExit(f"unknown case {case!r}: choose from dense, 7b, moe, big")


def row_args(args: argparse.Namespace, spec: dict) -> argparse.Namespace:
    """What `step_time.run_row` reads for one row of `plan`: weak scaling, so the global batch
    grows with the row's GPUs."""
    return argparse.Namespace(
        **{**vars(args), "expert_parallel": 1, "overrides": {}, **spec},
        global_batch=args.micro_batch * spec["gpus"] * args.accumulation,
        sft_max_length=0,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="what step_time.py prepare wrote")
    parser.add_argument("--cases", default="dense,7b,moe,big")
    parser.add_argument("--gpus", default=None, help="e.g. 1,2,4,8 (default: up to the GPUs here)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/scaling"))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--attention", default="flex")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--timed-steps", type=int, default=20)
    parser.add_argument("--row-timeout", type=float, default=900.0)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.gpus:
        gpus = [int(n) for n in args.gpus.split(",")]
    else:
        import torch

        available = torch.cuda.device_count()
        gpus = [n for n in (1, 2, 4, 8) if n <= available]
    if not gpus:
        print("scaling: no GPU here; pass --gpus to run on CPU processes", file=sys.stderr)
        return 1
    paths = data_paths(args.data.resolve())
    work = args.work.resolve()
    rows, failed = [], []
    for case in args.cases.split(","):
        for index, spec in enumerate(plan(case, gpus)):
            root = work / f"{case}-{index}"
            result = run_row("pretrain", REPO, row_args(args, spec), paths, root, root / "unused")
            result |= {"case": case, **spec}
            print("ROW " + json.dumps(result), flush=True)
            (failed if "error" in result else rows).append(result)

    one_gpu = {r["preset"]: r["tokens_per_s"] for r in rows if r["gpus"] == 1}
    print(f"\nseq {args.seq_len}, micro-batch {args.micro_batch} x {args.accumulation} per GPU, "
          f"{args.precision}, compile {args.compile}, {args.attention}")  # fmt: skip
    print("| case | model | GPUs | ZeRO | EP | tokens/s | per GPU | of 1 GPU | MFU | peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        per_gpu = row["tokens_per_s"] / row["gpus"]
        flops = _flops_per_token(row["family"], row["preset"], args.seq_len, row.get("overrides"))
        kept = f"{100 * per_gpu / one_gpu[row['preset']]:.1f}%" if row["preset"] in one_gpu else "-"
        print(
            f"| {row['case']} | {row['preset']} | {row['gpus']} | {row['zero_stage']} | "
            f"{row.get('expert_parallel', 1)} | {row['tokens_per_s']:,.0f} | {per_gpu:,.0f} | "
            f"{kept} | {100 * per_gpu * flops / PEAK_FLOPS:.1f}% | {row['peak_gib'] or '-'} |"
        )
    for row in failed:
        print(f"FAILED {row['case']} {row['preset']} on {row['gpus']}: {row['error']}",
              file=sys.stderr)  # fmt: skip
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
