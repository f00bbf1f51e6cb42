"""Attention backends on one CUDA GPU: SDPA with a dense mask, FlexAttention and flash-attn.

One attention layer of a 1B-like shape (default B=1, T=4096, H=16 query heads over G=8
key/value heads, K=128) in bf16, rows packed with documents of random lengths or plain
causal, with and without a sliding window. For each backend of models.attention:
the largest difference of its output and of its q/k/v gradients from a float32 SDPA
reference, the time to build the per-forward mask, the time of a forward plus backward,
the first call's time (FlexAttention compiles then), and peak extra memory. Prints a
Markdown table.

Usage: python benchmarks/attention_check.py [--batch 1] [--seq-len 4096] [--heads 16]
    [--kv-heads 8] [--head-dim 128] [--window 1024] [--mean-document 600] [--iterations 20]
Run from the repository root with kinoe installed (or PYTHONPATH=.). flash-attn is
measured when it imports (pip install 'kinoe[gpu]'), otherwise its rows say why not.
"""

from __future__ import annotations

import argparse
import platform
import time
import traceback
from collections.abc import Callable

import torch

from common.errors import KinoeError
from models.attention import attend, build_attention_mask


def document_ids(batch: int, seq_len: int, mean_length: float, seed: int) -> torch.Tensor:
    """Running document count (B, T), int32, of documents with exponential random lengths."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths: list[int] = []
        while sum(lengths) < seq_len:
            draw = torch.empty(1).exponential_(1 / mean_length, generator=generator)
            lengths.append(max(1, round(draw.item())))
        lengths[-1] -= sum(lengths) - seq_len
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows).to(torch.int32)


def cuda_seconds(step: Callable[[], None], iterations: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iterations


def measure(backend, inputs, reference, document_ids_BT, window, iterations) -> dict:
    """One backend on one case: differences from the float32 reference, times, memory."""
    q32_BHTK, k32_BGTK, v32_BGTK, grad32_BHTK = inputs
    B, _, T, _ = q32_BHTK.shape
    device = q32_BHTK.device

    def build():
        return build_attention_mask(backend, document_ids_BT, B, T, window, device)

    q_BHTK, k_BGTK, v_BGTK = (
        x.detach().to(torch.bfloat16).requires_grad_() for x in (q32_BHTK, k32_BGTK, v32_BGTK)
    )
    grad_BHTK = grad32_BHTK.to(torch.bfloat16)

    def step(mask) -> torch.Tensor:
        for x in (q_BHTK, k_BGTK, v_BGTK):
            x.grad = None
        out_BHTK = attend(q_BHTK, k_BGTK, v_BGTK, mask)
        out_BHTK.backward(grad_BHTK)
        return out_BHTK

    torch.cuda.synchronize()
    first = time.perf_counter()
    mask = build()
    out_BHTK = step(mask)
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - first

    out_diff = (out_BHTK.float() - reference[0]).abs().max().item()
    grad_diff = max(
        (x.grad.float() - ref).abs().max().item()
        for x, ref in zip((q_BHTK, k_BGTK, v_BGTK), reference[1:], strict=True)
    )
    for _ in range(3):
        step(mask)
    mask_s = cuda_seconds(build, max(3, iterations // 4))
    step_s = cuda_seconds(lambda: step(mask), iterations)

    del out_BHTK
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step(mask)
    torch.cuda.synchronize()
    peak_gib = (torch.cuda.max_memory_allocated() - baseline) / 2**30
    return dict(out=out_diff, grad=grad_diff, mask_ms=1e3 * mask_s, ms=1e3 * step_s,
                first_s=first_call_s, peak_gib=peak_gib)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--mean-document", type=float, default=600.0, help="tokens")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_check needs a CUDA GPU; torch.cuda.is_available() is False")
    device = torch.device("cuda")
    B, T, H, G, K = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
    if H % G:
        raise SystemExit(f"--kv-heads ({G}) must divide --heads ({H})")

    try:
        import flash_attn

        flash_version = flash_attn.__version__
    except ImportError as error:
        flash_version = f"not importable ({error})"
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"flash-attn {flash_version}, host {platform.node()}"
    )
    documents_BT = document_ids(B, T, args.mean_document, args.seed).to(device)
    lengths = torch.unique_consecutive(documents_BT[0], return_counts=True)[1].tolist()
    print(
        f"shape: B={B} T={T} H={H} G={G} K={K}, bf16; document lengths in row 0 {lengths} "
        f"(mean drawn {args.mean_document:g}); window {args.window}; "
        f"{args.iterations} timed forward+backward passes each"
    )
    print(
        "TFLOP/s counts only the query-key pairs the mask allows, forward + backward as "
        "3.5 x the forward's 4 H K per pair; differences are from float32 SDPA.\n"
    )

    cases = [
        ("documents", documents_BT, None),
        ("documents + window", documents_BT, args.window),
        ("causal", None, None),
        ("causal + window", None, args.window),
    ]
    print(
        "| case | backend | max abs diff out | max abs diff grad | mask build ms "
        "| fwd+bwd ms | TFLOP/s | first call s | peak extra GiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for case, document_ids_BT, window in cases:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        q32_BHTK = torch.randn(B, H, T, K, device=device, generator=generator)
        k32_BGTK = torch.randn(B, G, T, K, device=device, generator=generator)
        v32_BGTK = torch.randn(B, G, T, K, device=device, generator=generator)
        grad32_BHTK = torch.randn(B, H, T, K, device=device, generator=generator)
        inputs = (q32_BHTK, k32_BGTK, v32_BGTK, grad32_BHTK)

        dense = build_attention_mask("sdpa", document_ids_BT, B, T, window, device)
        if dense.allowed_B1TT is None:
            pairs = B * T * (T + 1) // 2
        else:
            pairs = int(dense.allowed_B1TT.sum()) * (B // dense.allowed_B1TT.shape[0])
        flops = 3.5 * 4 * H * K * pairs
        exact = tuple(x.detach().clone().requires_grad_() for x in inputs[:3])
        out32_BHTK = attend(*exact, dense)
        out32_BHTK.backward(grad32_BHTK)
        reference = (out32_BHTK.detach(), *(x.grad for x in exact))
        del exact, out32_BHTK, dense

        for backend in ("sdpa", "flex", "flash"):
            try:
                result = measure(
                    backend, inputs, reference, document_ids_BT, window, args.iterations
                )
            except Exception as error:  # one failing backend must not hide the others' rows
                reason = f"{type(error).__name__}: {error}".splitlines()[0][:160]
                print(f"| {case} | {backend} | failed: {reason} | | | | | | |")
                if not isinstance(error, KinoeError | RuntimeError):
                    traceback.print_exc()
                torch.cuda.empty_cache()
                continue
            tflops = flops / (result["ms"] / 1e3) / 1e12
            print(
                f"| {case} | {backend} | {result['out']:.2e} | {result['grad']:.2e} "
                f"| {result['mask_ms']:.2f} | {result['ms']:.2f} | {tflops:.0f} "
                f"| {result['first_s']:.1f} | {result['peak_gib']:.2f} |"
            )
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
