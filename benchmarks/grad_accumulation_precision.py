"""How much a bf16 gradient sum over K micro-batches loses against an fp32 one, on real text.

DeepSpeed's ZeRO-1 and ZeRO-2, as kinoe runs them in bf16, accumulate a step's micro-batch
gradients in bf16: each micro-batch's bf16 gradient is added into a bf16 sum, rounded at every
add (ZeRO-1 in each parameter's ``.grad``, ZeRO-2 in its partition). Megatron, and DeepSpeed's
BF16_Optimizer (`data_types.grad_accum_dtype: fp32`, which kinoe refuses, docs/pretrain.md),
keep the sum in fp32. This measures what the bf16 sum costs, next to what it should be
compared with: the sampling noise of the gradient itself.

A kinoe Mistral (``--preset`` with ``--overrides``) is first trained ``--train-steps`` steps in
fp32 on the text, so the gradients are those of a model that has started to learn, then cast
to bf16 as bf16 training holds it. For 2 x max(K) micro-batches of real text it computes each
micro-batch's bf16 gradient (loss averaged over its tokens) and keeps, for the first max(K),
three running sums: in fp64 (the reference), in fp32 and in bf16. The other max(K) give a
second fp64 sum over different text, the yardstick. For each K (powers of two, so dividing by K
is exact in every dtype) it prints, over all parameters as one vector:

- the relative error ``|sum - ref| / |ref|`` of the bf16 and the fp32 sum;
- the share of elements whose sign differs from the reference (AdamW's first step moves each
  weight by about the sign of its gradient);
- the relative difference between the reference sums of the two halves of the text: how much
  the gradient changes with the text it is computed on.

    python benchmarks/grad_accumulation_precision.py --tokenizer TOKENIZER.model \\
        --documents ../shared/data/corpus/wikipedia_ja_leads.jsonl.gz \\
        ../shared/data/corpus/fineweb2_ja_web.jsonl.gz

CPU is enough (the sums are the same on any device; the per-micro-batch gradients differ a
little between CPU and GPU kernels, not in what is measured).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models import FAMILIES  # noqa: E402
from training.losses import next_token_losses  # noqa: E402

# A small Mistral that a CPU runs in minutes: mistral_1b's proportions at a quarter the width.
DEFAULT_OVERRIDES = {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4,
                     "intermediate_size": 1792}  # fmt: skip


def token_stream(processor: Any, documents: list[Path], limit: int) -> torch.Tensor:
    """Up to ``limit`` token ids of the documents' ``text`` fields, end to end, each document
    followed by the end-of-sequence id (int64, 1-D); ``processor`` a SentencePieceProcessor."""
    ids: list[int] = []
    for path in documents:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                ids += [*processor.encode(json.loads(line)["text"]), processor.eos_id()]
                if len(ids) >= limit:
                    return torch.tensor(ids[:limit])
    return torch.tensor(ids)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter's gradient, in its own dtype, as one vector (a copy)."""
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def relative(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def sign_flips(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((torch.sign(a.double()) != torch.sign(ref)).double().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model")
    parser.add_argument("--documents", type=Path, nargs="+", required=True, help=".jsonl.gz")
    parser.add_argument("--preset", default="mistral_1b")
    parser.add_argument("--overrides", type=json.loads, default=DEFAULT_OVERRIDES)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--max-k", type=int, default=32, help="a power of two")
    parser.add_argument("--train-steps", type=int, default=40, help="fp32 AdamW steps first")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if args.max_k < 1 or args.max_k & (args.max_k - 1):
        parser.error(f"--max-k must be a power of two, got {args.max_k}")

    torch.manual_seed(args.seed)
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(args.tokenizer))
    vocab = processor.vocab_size()
    family = FAMILIES["mistral"]
    preset = family.presets[args.preset]()
    model_args = type(preset).model_validate(
        {**preset.model_dump(), **args.overrides, "vocab_size": vocab,
         "max_seq_len": max(args.seq_len, preset.max_seq_len)}
    )  # fmt: skip
    model = family.model_type(model_args)

    rows_needed = args.micro_batch * (args.train_steps + 2 * args.max_k)
    stream = token_stream(processor, args.documents, rows_needed * (args.seq_len + 1))
    rows = stream.numel() // (args.seq_len + 1)
    if rows < rows_needed:
        sys.exit(
            f"the documents give {rows} sequences of {args.seq_len + 1} tokens, {rows_needed} are "
            f"needed; add documents or lower --train-steps, --max-k or --seq-len"
        )
    # Distinct sequences for every micro-batch: no text is seen twice.
    batches = (
        stream[: rows * (args.seq_len + 1)].view(rows, args.seq_len + 1).split(args.micro_batch)
    )

    def backward(batch: torch.Tensor) -> float:
        loss = next_token_losses(model(batch[:, :-1]), batch[:, 1:]).mean()
        loss.backward()
        return float(loss)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    for step in range(args.train_steps):
        optimizer.zero_grad(set_to_none=True)
        loss = backward(batches[step])
        if step % 10 == 0 or step == args.train_steps - 1:
            print(f"fp32 training step {step + 1}/{args.train_steps}: loss {loss:.3f}",
                  file=sys.stderr, flush=True)  # fmt: skip
    del optimizer
    model = model.to(torch.bfloat16)

    # Running sums of the first max(K) micro-batches, each in its own dtype so that every add
    # rounds as accumulation in that dtype does; and an fp64 sum of the next max(K).
    sums: dict[str, torch.Tensor | None] = {"fp64": None, "fp32": None, "bf16": None}
    other: torch.Tensor | None = None
    reference_at: dict[int, torch.Tensor] = {}
    report: dict[int, dict[str, float]] = {}
    measured = batches[args.train_steps : args.train_steps + 2 * args.max_k]
    measuring = time.perf_counter()
    for k, batch in enumerate(measured, start=1):
        model.zero_grad(set_to_none=True)
        backward(batch)
        grad = flat_grad(model)  # bf16, as autograd leaves it for a bf16 model
        if k <= args.max_k:
            for name, dtype in (("fp64", torch.float64), ("fp32", torch.float32),
                                ("bf16", torch.bfloat16)):  # fmt: skip
                total = sums[name]
                sums[name] = grad.to(dtype) if total is None else total + grad.to(dtype)
            if k & (k - 1) == 0:  # a power of two
                reference = reference_at[k] = sums["fp64"].clone()
                report[k] = {
                    "bf16": relative(sums["bf16"], reference),
                    "fp32": relative(sums["fp32"], reference),
                    "bf16_flips": sign_flips(sums["bf16"], reference),
                    "fp32_flips": sign_flips(sums["fp32"], reference),
                }
        else:
            j = k - args.max_k
            other = grad.double() if other is None else other + grad.double()
            if j & (j - 1) == 0:
                report[j]["sampling"] = relative(other, reference_at[j])
        elapsed, total = time.perf_counter() - measuring, 2 * args.max_k
        print(f"micro-batch {k}/{total}, {k / elapsed:.2f}/s, elapsed {elapsed:.0f} s, "
              f"ETA {(total - k) * elapsed / k:.0f} s", file=sys.stderr, flush=True)  # fmt: skip

    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"\nmistral ({args.preset} with {json.dumps(args.overrides)}), {parameters:,} parameters, "
        f"vocab {vocab}; {args.train_steps} fp32 steps first; micro-batch {args.micro_batch} x "
        f"{args.seq_len} tokens; gradients in bf16"
    )
    print("| micro-batches K | bf16 sum: relative error | fp32 sum: relative error | "
          "bf16 sum: signs flipped | fp32 sum: signs flipped | "
          "another K micro-batches of text: relative difference |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for k in sorted(report):
        row = report[k]
        print(
            f"| {k} | {row['bf16']:.2e} | {row['fp32']:.2e} | {100 * row['bf16_flips']:.3f}% | "
            f"{100 * row['fp32_flips']:.3f}% | {row['sampling']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
