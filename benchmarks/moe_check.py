"""One Mixtral MoE layer on one CUDA GPU: grouped GEMM vs the per-expert loop, in bf16.

Agreement: at the chosen shape, with the router pointed so that the last expert gets no
token, the bf16 output and gradients (input, router, expert weights) of each implementation
against a float32 run of the loop on the same weights, as the largest difference relative to
the reference's largest entry; the empty expert's gradients must be exactly zero. Timing: a
forward, and a forward plus backward, of the whole layer (router, sort, experts, combine) on
random tokens with the freshly initialised router, for each implementation, with and
without a capacity factor, and a dense reference: the same expert FLOPs as one SwiGLU over
all assignments, what a grouped GEMM at best approaches. Prints Markdown tables.

Usage: python benchmarks/moe_check.py [--tokens 16384] [--hidden 2048] [--intermediate 3584]
    [--experts 8] [--top-k 2] [--capacity-factor 1.0] [--iterations 20]
Run from the repository root with kinoe installed (or PYTHONPATH=.). Defaults: the
mixtral_1b_active layer at 4 rows of 4096 tokens.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from models.mixtral.args import MixtralArgs, mixtral_1b_active
from models.mixtral.moe import MoE


def cuda_seconds(step: Callable[[], None], iterations: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iterations


def build(args: MixtralArgs, device: torch.device, dtype: torch.dtype, seed: int) -> MoE:
    """The layer initialised as ``Mixtral.init_weights`` does it (16 layers' residual scale)."""
    torch.manual_seed(seed)
    moe = MoE(args).to(device)
    with torch.no_grad():
        moe.router.weight.normal_(0, args.init_std)
        moe.w_gate_up_E2FD.normal_(0, args.init_std)
        moe.w_down_EDF.normal_(0, args.init_std / math.sqrt(2 * args.num_layers))
    return moe.to(dtype)


def run(
    moe: MoE, x_BTD: torch.Tensor, grad_BTD: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Output and input gradient, and each weight's gradient, of a forward and backward."""
    moe.zero_grad(set_to_none=True)
    x_BTD = x_BTD.detach().requires_grad_()
    out_BTD = moe(x_BTD)
    (out_BTD * grad_BTD).sum().add(moe.aux_loss + moe.z_loss).backward()
    return {"out": out_BTD.detach(), "x": x_BTD.grad}, {
        name: p.grad for name, p in moe.named_parameters()
    }


def agreement(args: MixtralArgs, device: torch.device, tokens: int, seed: int) -> bool:
    """Print each implementation's bf16 differences from float32; whether all are within 2e-2.

    Inputs and weights are bf16 values for the reference too, so that the float32 router
    logits, and with them the choices of experts, are the same in every run: a choice
    flipped by rounding would change a token's output wholesale and say nothing of the GEMMs.
    """
    E, D = args.num_experts, args.hidden_size
    generator = torch.Generator(device=device).manual_seed(seed)
    direction_D = F.normalize(torch.randn(D, device=device, generator=generator), dim=0)
    x_BTD = torch.randn(1, tokens, D, device=device, generator=generator) + 6 * direction_D
    x_BTD = x_BTD.bfloat16()
    grad_BTD = torch.randn(1, tokens, D, device=device, generator=generator).bfloat16()

    reference_args = args.model_copy(update={"moe_implementation": "loop"})
    reference = build(reference_args, device, torch.bfloat16, seed)
    with torch.no_grad():
        reference.router.weight[E - 1] = -10 * direction_D  # the last expert gets no token
    reference.float()
    expected_outputs, expected_grads = run(reference, x_BTD.float(), grad_BTD.float())
    expected = {**expected_outputs, **expected_grads}
    routed_E = reference.tokens_per_expert_E
    print(
        f"tokens per expert: {routed_E.tolist()}; largest difference from the float32 loop "
        "relative to its largest |entry|\n"
    )
    print(
        "| implementation | out | grad x | grad router | grad gate_up | grad down "
        "| same routing | empty expert grads zero | all finite |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|---|")
    good = True
    for implementation in ("grouped", "loop"):
        layer_args = args.model_copy(update={"moe_implementation": implementation})
        moe = build(layer_args, device, torch.bfloat16, seed)
        moe.load_state_dict(reference.state_dict())
        outputs, grads = run(moe, x_BTD, grad_BTD)
        got = {**outputs, **grads}
        relative = {
            name: ((got[name].float() - want).abs().max() / want.abs().max()).item()
            for name, want in expected.items()
        }
        same_routing = torch.equal(moe.tokens_per_expert_E, routed_E)
        empty_zero = all(
            torch.count_nonzero(grads[name][E - 1]) == 0
            for name in ("w_gate_up_E2FD", "w_down_EDF")
        )
        finite = all(torch.isfinite(tensor).all() for tensor in got.values())
        good &= same_routing and empty_zero and finite and max(relative.values()) < 2e-2
        print(
            f"| {implementation} | {relative['out']:.1e} | {relative['x']:.1e} "
            f"| {relative['router.weight']:.1e} | {relative['w_gate_up_E2FD']:.1e} "
            f"| {relative['w_down_EDF']:.1e} | {same_routing} | {empty_zero} | {finite} |"
        )
    print()
    return good


def timing(
    args: MixtralArgs,
    device: torch.device,
    tokens: int,
    iterations: int,
    capacity_factor: float | None,
    seed: int,
) -> None:
    D, intermediate, K = args.hidden_size, args.intermediate_size, args.top_k
    generator = torch.Generator(device=device).manual_seed(seed)
    x_BTD = torch.randn(1, tokens, D, device=device, generator=generator, dtype=torch.bfloat16)
    grad_BTD = torch.randn_like(x_BTD)
    expert_flops = 2 * tokens * K * 3 * D * intermediate  # forward; backward twice that
    print(
        "| implementation | capacity factor | dropped | fwd ms | fwd+bwd ms "
        "| expert TFLOP/s fwd+bwd | first call s | peak extra GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for implementation in ("grouped", "loop"):
        for capacity in (None, capacity_factor) if capacity_factor else (None,):
            layer_args = args.model_copy(
                update={"moe_implementation": implementation, "capacity_factor": capacity}
            )
            moe = build(layer_args, device, torch.bfloat16, seed)
            x = x_BTD.detach().requires_grad_()

            def forward(moe=moe, x=x) -> None:
                with torch.no_grad():
                    moe(x)

            def step(moe=moe, x=x) -> None:
                out_BTD = moe(x)
                (out_BTD * grad_BTD).sum().add(moe.aux_loss + moe.z_loss).backward()

            torch.cuda.synchronize()
            first = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - first
            for _ in range(3):
                step()
            forward_s = cuda_seconds(forward, iterations)
            step_s = cuda_seconds(step, iterations)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak_gib = (torch.cuda.max_memory_allocated() - baseline) / 2**30
            tflops = 3 * expert_flops / step_s / 1e12
            print(
                f"| {implementation} | {capacity or '-'} | {moe.dropped_tokens} "
                f"| {1e3 * forward_s:.2f} | {1e3 * step_s:.2f} | {tflops:.0f} | {first_s:.2f} "
                f"| {peak_gib:.2f} |"
            )
            del moe, x
            torch.cuda.empty_cache()

    # The same matmuls as one expert over all T * K assignments: the grouped GEMM's ceiling.
    w_gate_up = torch.randn(
        2 * intermediate, D, device=device, dtype=torch.bfloat16, requires_grad=True
    )
    w_down = torch.randn(D, intermediate, device=device, dtype=torch.bfloat16, requires_grad=True)
    x_AD = torch.randn(tokens * K, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_AD = torch.randn_like(x_AD)

    def dense_forward() -> torch.Tensor:
        gate_AF, up_AF = F.linear(x_AD, w_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate_AF) * up_AF, w_down)

    def dense_step() -> None:
        dense_forward().backward(grad_AD)

    for _ in range(3):
        dense_step()
    with torch.no_grad():
        forward_s = cuda_seconds(dense_forward, iterations)
    step_s = cuda_seconds(dense_step, iterations)
    tflops = 3 * expert_flops / step_s / 1e12
    print(
        f"| dense reference (experts' matmuls only) | - | - | {1e3 * forward_s:.2f} "
        f"| {1e3 * step_s:.2f} | {tflops:.0f} | - | - |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens in the layer's batch")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=3584, help="one expert's width")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moe_check needs a CUDA GPU; torch.cuda.is_available() is False")
    device = torch.device("cuda")
    args = MixtralArgs.model_validate(
        {
            **mixtral_1b_active().model_dump(),
            "hidden_size": options.hidden,
            "intermediate_size": options.intermediate,
            "num_experts": options.experts,
            "top_k": options.top_k,
        }
    )
    capability = torch.cuda.get_device_capability()
    print(
        f"device: {torch.cuda.get_device_name()} (sm{capability[0]}{capability[1]}), "
        f"torch {torch.__version__}, host {platform.node()}"
    )
    print(
        f"shape: T={options.tokens} tokens, D={args.hidden_size}, F={args.intermediate_size}, "
        f"E={args.num_experts}, K={args.top_k}, bf16; grouped GEMM kernel: "
        f"{'CUTLASS (sm90/sm100)' if capability[0] in (9, 10) else 'ATen loop fallback'}\n"
    )
    agreed = agreement(args, device, options.tokens, options.seed)
    timing(args, device, options.tokens, options.iterations, options.capacity_factor, options.seed)
    if not agreed:
        raise SystemExit("grouped or loop disagrees with the float32 reference (table above)")


if __name__ == "__main__":
    main()
