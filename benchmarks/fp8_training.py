"""FP8 training (engine.fp8) against bf16: tokens/s on 7B-sized layers, and the loss over 300 steps.

Each row is `kinoe pretrain` on the real corpora `step_time.py prepare` tokenised (Japanese
Wikipedia leads and FineWeb-2 web text from ../shared/data), timed from outside as
`benchmarks/step_time.py` times a row. The model has mistral_7b's shapes (hidden 4096, 32 heads
of 128 sharing 8 KV heads, feed-forward 14336) with `--layers` of its 32 layers, so that one GPU
holds it under ZeRO-2; compiled blocks, FlexAttention with document masks. Rows:

- `bf16` with seed A and `bf16-seed` with seed B: the second measures the noise, what changing
  only the initialisation and data order does to the loss;
- `fp8-tensorwise` and `fp8-rowwise`, seed A.

Printed: tokens/s (steps after `--warmup-steps`), its ratio to bf16 (goal: 1.3x), MFU, and the
loss averaged over the last `--window` steps beside bf16's, with the seed-to-seed gap as the
yardstick. Both curves go to `--plot` (PNG).

MFU = tokens/s x FLOPs per token / 989e12 (dense bf16 peak of an H100/H200; the FP8 rows are
stated against the same bf16 peak, so the ratio between rows is the speed-up), FLOPs per token
= 6 N + 12 L H K T (N: non-embedding parameters plus the output projection; the attention term
counts the whole T x T score matrix, so the causal half and the cross-document tiles
FlexAttention skips are counted as work done).

    python benchmarks/step_time.py prepare --data DATA       # once, CPU
    python benchmarks/fp8_training.py --data DATA --plot docs/fp8_loss.png

Exits non-zero when any row could not run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from step_time import PEAK_FLOPS, _flops_per_token, data_paths, run_row  # noqa: E402

ROWS = {
    "bf16": {"fp8": None, "seed": 1234},
    "bf16-seed": {"fp8": None, "seed": 4321},
    "fp8-tensorwise": {"fp8": "tensorwise", "seed": 1234},
    "fp8-rowwise": {"fp8": "rowwise", "seed": 1234},
}


def losses(root: Path) -> dict[int, float]:
    """Step -> loss from a row's metrics.jsonl."""
    path = root / "pretrain" / "bench" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def plot(curves: dict[str, dict[int, float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, curve in curves.items():
        steps = sorted(curve)
        axis.plot(steps, [curve[s] for s in steps], label=name, linewidth=1)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title(title, fontsize=9)
    axis.legend()
    axis.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="what step_time.py prepare wrote")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--layers", type=int, default=4, help="of mistral_7b's 32")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/fp8"))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--attention", default="flex")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--timed-steps", type=int, default=280, help="300 steps in all by default")
    parser.add_argument("--window", type=int, default=50, help="last steps whose loss is averaged")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the loss curves")
    parser.add_argument("--row-timeout", type=float, default=600.0)
    return parser


def row_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """What `step_time.run_row` reads for the row ``name`` of ROWS."""
    return argparse.Namespace(
        **vars(args), **ROWS[name], family="mistral", preset="mistral_7b",
        overrides={"num_layers": args.layers}, gpus=1, zero_stage=2, expert_parallel=1,
        precision="bf16", compile=True, sft_max_length=0,
    )  # fmt: skip


def main() -> int:
    args = build_parser().parse_args()
    overrides = {"num_layers": args.layers}
    paths = data_paths(args.data.resolve())
    work = args.work.resolve()
    rows, failed, curves = [], [], {}
    for name in args.rows.split(","):
        root = work / name
        result = run_row("pretrain", REPO, row_args(args, name), paths, root, root / "unused")
        result |= {"row": name}
        print(
            "ROW " + json.dumps({k: v for k, v in result.items() if k != "intervals"}), flush=True
        )
        if "error" in result:
            failed.append(result)
            continue
        curves[name] = losses(root)
        rows.append(result)

    total = args.warmup_steps + args.timed_steps
    flops = _flops_per_token("mistral", "mistral_7b", args.seq_len, overrides)
    bf16 = next((row for row in rows if row["row"] == "bf16"), None)
    last = range(total - args.window + 1, total + 1)
    final = {name: statistics.fmean(curve[s] for s in last) for name, curve in curves.items()}
    noise = (
        abs(final["bf16"] - final["bf16-seed"]) if {"bf16", "bf16-seed"} <= final.keys() else None
    )
    print(f"\nmistral_7b shapes, {args.layers} layers; seq {args.seq_len}, micro-batch "
          f"{args.micro_batch}, global batch {args.global_batch}; ZeRO-2, compiled, {args.attention}; "
          f"steps {args.warmup_steps + 1}-{total} timed; loss: mean of steps {last.start}-{total}")  # fmt: skip
    print("| row | tokens/s | vs bf16 | MFU | peak GiB | loss (last steps) | vs bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ratio = f"{row['tokens_per_s'] / bf16['tokens_per_s']:.2f}x" if bf16 else "-"
        gap = f"{final[row['row']] - final['bf16']:+.4f}" if "bf16" in final else "-"
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        print(
            f"| {row['row']} | {row['tokens_per_s']:,.0f} | {ratio} | "
            f"{100 * row['tokens_per_s'] * flops / PEAK_FLOPS:.1f}% | {peak} | "
            f"{final[row['row']]:.4f} | {gap} |"
        )
    if noise is not None:
        print(f"seed-to-seed gap of bf16 (the noise): {noise:.4f}")
    else:
        # Without the second seed a gap has nothing to be judged against (a speed-only run).
        print("no bf16-seed row: the loss columns have no seed-to-seed yardstick; add "
              "bf16-seed to --rows to compare losses")  # fmt: skip
    if args.plot and curves:
        plot(curves, f"mistral_7b shapes, {args.layers} layers, seq {args.seq_len}", args.plot)
        print(f"loss curves: {args.plot}")
    for row in failed:
        print(f"FAILED {row['row']}: {row['error']}", file=sys.stderr)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
