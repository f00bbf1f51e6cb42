"""A sparse mixture of SwiGLU experts with a softmax top-k router, as in Mixtral.

Tensor names end in their shape: T tokens (the model's batch and sequence flattened), D hidden
size, F one expert's intermediate size, E experts, K experts per token (top_k), A = T * K
token-to-expert assignments; 2F is an expert's gate and up projections stacked, gate first.

Expert weights are stacked over experts in nn.Linear's (out, in) layout, as Hugging Face's
``MixtralExperts`` stores them: ``w_gate_up_E2FD`` (E, 2F, D) and ``w_down_EDF`` (E, D, F).
The grouped GEMM multiplies by their transposed views, column-major (E, in, out) operands,
which torch's kernel takes without a copy. Gate and up are one tensor so that one grouped
GEMM reads each token once for both, and so the Hugging Face conversion is only a rename.

``torch.nn.functional.grouped_mm`` (``torch._grouped_mm``) as used here, in torch 2.13: a 2D
(A, in) input whose rows are grouped by expert, a 3D (E, in, out) weight and ``offs``, the
int32 cumulative group ends (E,). Every dimension with a stride must be a multiple of 16
bytes (D and F divisible by 8 in bf16; MixtralArgs checks). On CUDA sm90/sm100 in bf16 it is
one CUTLASS kernel with no host sync; for other dtypes, GPUs and on CPU it loops over groups
inside ATen (one device-to-host copy of ``offs``), so the same code runs the CPU tests in
float32. Groups may be empty or of any size (benchmarks/moe_check.py checks both on the GPU).
Rows past ``offs[-1]`` are left uninitialised, which is why dropped assignments are cut off
before the matmuls rather than parked at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.mistral.model import Initializer, normal
from models.mixtral.args import MixtralArgs


class ExpertExchange(Protocol):
    """Runs assignments through experts held by other ranks (expert parallelism)."""

    def __call__(
        self,
        x_AD: torch.Tensor,
        counts_E: torch.Tensor,
        local_experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``x_AD`` sorted by expert, ``counts_E`` int64 assignments per expert (all E experts):
        each assignment's expert output, in the same order."""


class MoE(nn.Module):
    """Each token through the softmax-weighted sum of its top_k experts' SwiGLU outputs.

    Every forward overwrites these, read by the trainer after the forward: ``aux_loss`` and
    ``z_loss`` (scalar float32, with grad), ``tokens_per_expert_E`` (int64 (E,), the
    assignments the router made, dropped ones included) and ``dropped_tokens`` (int,
    assignments over an expert's capacity).

    Under ZeRO-3 the whole MoE must be a leaf module (``Mixtral.moe_modules``): the router's
    weight is read here, in float32, not through ``router.forward``, whose hook would gather it.
    """

    def __init__(self, args: MixtralArgs):
        super().__init__()
        self.num_experts = args.num_experts
        self.top_k = args.top_k
        self.capacity_factor = args.capacity_factor
        self.implementation = args.moe_implementation
        hidden, intermediate, E = args.hidden_size, args.intermediate_size, args.num_experts
        self.router = nn.Linear(hidden, E, bias=False)
        self.w_gate_up_E2FD = nn.Parameter(torch.empty(E, 2 * intermediate, hidden))
        self.w_down_EDF = nn.Parameter(torch.empty(E, hidden, intermediate))
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.tokens_per_expert_E: torch.Tensor | None = None
        self.dropped_tokens = 0
        # Set from outside by training.expert_parallel.shard_experts: sends each assignment to
        # the rank holding its expert and brings the result back. None: every expert is here.
        self.exchange: ExpertExchange | None = None

    def initializers(self, std: float, residual_std: float) -> list[Initializer]:
        """Router Normal(0, std); each expert as Mistral's MLP (down projection residual_std)."""
        return [
            (self.router.weight, normal(std)),
            (self.w_gate_up_E2FD, normal(std)),
            (self.w_down_EDF, normal(residual_std)),
        ]

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        E, K = self.num_experts, self.top_k
        # Float32 logits: rounding them to bf16 would flip near-tied choices and blunt the
        # z-loss; the router matmul is D x E, too small to matter for speed.
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, experts_TK = probs_TE.topk(K, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)

        # A comparison rather than bincount, which syncs with the host on CUDA to size its output.
        expert_ids_E = torch.arange(E, device=x_TD.device)
        routed_E = (experts_TK.flatten()[:, None] == expert_ids_E).sum(dim=0)
        fraction_E = routed_E.float() / experts_TK.numel()
        self.aux_loss = E * (fraction_E * probs_TE.mean(dim=0)).sum()
        self.z_loss = logits_TE.logsumexp(dim=-1).square().mean()
        self.tokens_per_expert_E = routed_E.detach()

        dropped = 0
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * experts_TK.numel() / E)
            experts_TK, dropped = _drop_over_capacity(experts_TK, routed_E, capacity)
        self.dropped_tokens = dropped

        weights_TK = weights_TK.to(x_TD.dtype)
        if self.implementation == "grouped":
            out_TD = self._experts_grouped(x_TD, experts_TK, weights_TK, dropped)
        else:
            out_TD = self._experts_loop(x_TD, experts_TK, weights_TK)
        return out_TD.view_as(x_BTD)

    def _experts_grouped(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor, dropped: int
    ) -> torch.Tensor:
        """Sort assignments by expert, through the experts (here or, with ``exchange``, on their
        ranks), weighted and summed back per token.

        Every expert's weights enter both GEMMs whatever its token count, so an expert with no
        tokens still gets a (zero) gradient and ZeRO sees every parameter used each step.
        """
        T, K = experts_TK.shape
        E = self.num_experts
        # Stable: within an expert, assignments stay in token order, as the loop takes them.
        experts_N, order_N = experts_TK.flatten().sort(stable=True)  # N = T * K, a permutation
        bounds_E = torch.arange(1, E + 1, device=x_TD.device, dtype=experts_N.dtype)
        ends_E = torch.searchsorted(experts_N, bounds_E)
        x_AD = _sorted_copies(x_TD, order_N, K)
        order_A = order_N
        if dropped:  # dropped assignments carry id E, so they sort last
            order_A = order_N[: order_N.numel() - dropped]
            x_AD = x_AD[: order_A.numel()]
        if self.exchange is None:
            y_AD = self.local_experts(x_AD, ends_E.to(torch.int32))
        else:
            y_AD = self.exchange(x_AD, ends_E.diff(prepend=ends_E.new_zeros(1)), self.local_experts)
        y_AD = y_AD * weights_TK.flatten()[order_A, None]
        # Back to (token, choice) order and summed over choices: deterministic, unlike
        # index_add_, whose atomic adds on CUDA sum three or more terms in varying order.
        unsorted_AD = y_AD.new_zeros(T * K, y_AD.shape[-1]).index_copy(0, order_A, y_AD)
        return unsorted_AD.view(T, K, -1).sum(dim=1)

    def local_experts(self, x_XD: torch.Tensor, ends_G: torch.Tensor) -> torch.Tensor:
        """This module's experts (G of them: all, or this rank's under expert parallelism) on
        rows grouped by expert; ``ends_G``: int32 cumulative group ends. Two grouped GEMMs."""
        gate_up_X2F = F.grouped_mm(x_XD, self.w_gate_up_E2FD.transpose(-2, -1), offs=ends_G)
        gate_XF, up_XF = gate_up_X2F.chunk(2, dim=-1)
        hidden_XF = F.silu(gate_XF) * up_XF
        return F.grouped_mm(hidden_XF, self.w_down_EDF.transpose(-2, -1), offs=ends_G)

    def _experts_loop(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> torch.Tensor:
        """One expert at a time: its tokens gathered, its MLP applied, added back weighted.

        The reference for ``_experts_grouped`` (and the benchmark's baseline); it syncs with
        the host once per expert. Experts with no tokens run on an empty batch rather than
        being skipped, so their weights get zero gradients here too.
        """
        out_TD = torch.zeros_like(x_TD)
        for expert in range(self.num_experts):
            token_N, choice_N = (experts_TK == expert).nonzero(as_tuple=True)
            x_ND = x_TD.index_select(0, token_N)
            gate_NF, up_NF = F.linear(x_ND, self.w_gate_up_E2FD[expert]).chunk(2, dim=-1)
            y_ND = F.linear(F.silu(gate_NF) * up_NF, self.w_down_EDF[expert])
            out_TD.index_add_(0, token_N, y_ND * weights_TK[token_N, choice_N, None])
        return out_TD


def _sorted_copies(x_TD: torch.Tensor, order_N: torch.Tensor, K: int) -> torch.Tensor:
    """(N, D), N = T * K: row n is token ``order_N[n] // K``'s row; ``order_N`` a permutation.

    The same rows as ``x_TD.index_select(0, order_N // K)``, but its backward gathers instead of
    scattering: index_select's backward is index_add_, atomic adds that in bf16 cost 0.6 ms a
    layer on an H200 for 32k assignments (3.7% of a mixtral_1b_active step in a profile) and sum
    a token's K gradients in varying order. Here the K copies of each token are laid out first
    and written to their sorted places with index_copy, whose backward is a gather, and the
    copies' gradients meet in ``expand``'s backward: a sum over K in a fixed order.
    """
    N, D = order_N.numel(), x_TD.shape[-1]
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(N, device=order_N.device)
    copies_ND = x_TD[:, None, :].expand(-1, K, -1).reshape(N, D)
    # Every row is written (a permutation), so the destination needs no zeroing.
    return copies_ND.new_empty(N, D).index_copy(0, inverse_N, copies_ND)


def _drop_over_capacity(
    experts_TK: torch.Tensor, routed_E: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, int]:
    """Assignments past an expert's first ``capacity`` (in token order) relabelled E; their count.

    Token order, each token's choices together, so whether a token keeps its expert depends
    only on tokens before it in the batch: a causal LM must not see its future through which
    of its assignments were dropped. One host sync, for the count.
    """
    E = routed_E.numel()
    experts_A = experts_TK.flatten()
    sorted_A, order_A = experts_A.sort(stable=True)
    starts_E = routed_E.cumsum(dim=0) - routed_E
    rank_sorted_A = torch.arange(experts_A.numel(), device=experts_A.device) - starts_E[sorted_A]
    over_A = torch.empty_like(experts_A, dtype=torch.bool)
    over_A[order_A] = rank_sorted_A >= capacity
    return experts_A.masked_fill(over_A, E).view_as(experts_TK), int(over_A.sum())
