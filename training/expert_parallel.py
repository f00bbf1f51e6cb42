"""Expert parallelism: each MoE layer's experts split over ranks, tokens sent to them and back.

Applied to a built model from outside its architecture, like the rest of ``parallelize``:
``shard_experts`` keeps this rank's slice of every layer's stacked expert weights and gives
each MoE an ``AllToAllExchange``. Names end in shapes as in ``models.mixtral.moe``: A this
rank's assignments, E all experts, N ranks of the expert-parallel group, G = E / N experts
per rank, X assignments received by this rank.

Rank layout: the expert-parallel group is N consecutive ranks (with N at most the GPUs of a
node, its all-to-all stays on the node's links); the ranks that hold the same experts are
those N apart (``ExpertGroups.replicas``), and an expert's gradient is the sum over them.

One step of a layer: the router runs here on this rank's tokens (its weight is replicated),
assignments are sorted by expert as without expert parallelism, so each destination rank's
rows are one contiguous block; one all-to-all of the per-expert counts, one host read of the
split sizes (all-to-all needs them on the host), one all-to-all of the rows; on arrival the
rows are grouped by source rank and are reordered by local expert with one stable sort, not a
loop over experts; the two grouped GEMMs; the inverse order and the reverse all-to-all.
Autograd runs the same exchanges backwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from common.errors import KinoeError
from models.experts import ExpertModel


@dataclass(frozen=True)
class ExpertGroups:
    """This rank's place in expert parallelism of size ``size`` over ``world_size`` ranks."""

    size: int
    rank: (
        int  # this rank's index in its expert-parallel group: it holds experts [rank*G, (rank+1)*G)
    )
    world_size: int
    group: dist.ProcessGroup  # the ``size`` consecutive ranks that exchange tokens
    replicas: dist.ProcessGroup  # the world_size / size ranks that hold the same experts


def expert_groups(size: int) -> ExpertGroups:
    """The process groups of expert parallelism of ``size`` (every rank must call this).

    Created through DeepSpeed's group registry (the layout above is its default), so that
    DeepSpeed's own start-up broadcast sends each expert shard only among the ranks that
    hold the same experts (``shard_experts`` marks the parameters with the group's name).
    """
    from deepspeed.utils import groups as deepspeed_groups

    world = dist.get_world_size()
    if size < 1 or world % size:
        raise KinoeError(
            f"engine.expert_parallel {size} does not divide the {world} ranks; choose a divisor "
            "of the number of GPUs (e.g. the GPUs of one node)"
        )
    # Private in DeepSpeed but the one way its MoE layers create these groups; it creates
    # each group once per name and every rank must call it in the same order.
    deepspeed_groups._create_expert_and_data_parallel(size)
    name = group_name(size)
    return ExpertGroups(
        size=size,
        rank=dist.get_rank() % size,
        world_size=world,
        group=deepspeed_groups._get_expert_parallel_group(name),
        replicas=deepspeed_groups._get_expert_data_parallel_group(name),
    )


def group_name(size: int) -> str:
    """DeepSpeed's name for the groups of expert parallelism of ``size``."""
    return f"ep_size_{size}"


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` of rows with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x_RD, receive_splits, send_splits, group):
        ctx.splits, ctx.group = (receive_splits, send_splits), group
        out_RD = x_RD.new_empty(sum(receive_splits), *x_RD.shape[1:])
        dist.all_to_all_single(out_RD, x_RD.contiguous(), receive_splits, send_splits, group=group)
        return out_RD

    @staticmethod
    def backward(ctx, grad_RD):
        receive_splits, send_splits = ctx.splits
        grad_in_RD = grad_RD.new_empty(sum(send_splits), *grad_RD.shape[1:])
        dist.all_to_all_single(
            grad_in_RD, grad_RD.contiguous(), send_splits, receive_splits, group=ctx.group
        )
        return grad_in_RD, None, None, None


class AllToAllExchange:
    """Sends each assignment to the rank holding its expert, runs it there, brings it back."""

    def __init__(self, groups: ExpertGroups, num_experts: int):
        self.groups = groups
        self.local_experts = num_experts // groups.size

    def __call__(
        self,
        x_AD: torch.Tensor,
        counts_E: torch.Tensor,
        local_experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``x_AD`` sorted by expert with ``counts_E`` rows each: every row's expert output."""
        N, G = self.groups.size, self.local_experts
        sent_NG = counts_E.view(N, G)
        received_NG = torch.empty_like(sent_NG)  # [source rank, local expert]
        dist.all_to_all_single(received_NG, sent_NG.contiguous(), group=self.groups.group)
        # The one host read of the layer: the split sizes of the row exchange.
        splits = torch.cat([sent_NG.sum(dim=1), received_NG.sum(dim=1)]).tolist()
        send, receive = splits[:N], splits[N:]
        x_XD = _AllToAll.apply(x_AD, receive, send, self.groups.group)

        # Arrived grouped by source, then local expert; the GEMMs want local expert, then
        # source. A stable sort on that key reorders every row at once.
        segment_NG = (
            torch.arange(G, device=x_XD.device) * N + torch.arange(N, device=x_XD.device)[:, None]
        )
        segment_X = torch.repeat_interleave(
            segment_NG.flatten(), received_NG.flatten(), output_size=sum(receive)
        )
        order_X = segment_X.sort(stable=True).indices
        ends_G = received_NG.sum(dim=0).cumsum(dim=0).to(torch.int32)
        y_XD = local_experts(x_XD.index_select(0, order_X), ends_G)
        y_XD = y_XD.new_zeros(y_XD.shape).index_copy(0, order_X, y_XD)
        return _AllToAll.apply(y_XD, send, receive, self.groups.group)


def keep_local_experts(model: nn.Module, size: int, rank: int) -> None:
    """Replace every MoE layer's stacked expert weights by this rank's slice of them.

    Experts ``[rank * G, (rank + 1) * G)`` with ``G = num_experts / size``. Works on a model
    built on the meta device (nothing is materialised) as on a built one (the rest is freed).
    Each slice is marked with ``expert_slice`` and ``expert_full_shape``, by which initial
    weights and loaded tensors are cut to it (``training.partitioned``).
    """
    if not isinstance(model, ExpertModel):
        raise KinoeError(
            f"engine.expert_parallel {size} needs a model with experts; "
            f"{type(model).__name__} has none: set engine.expert_parallel to 1"
        )
    for moe in model.moe_modules():
        if moe.num_experts % size:
            raise KinoeError(
                f"engine.expert_parallel {size} does not divide the model's "
                f"{moe.num_experts} experts; choose a divisor of the number of experts"
            )
        if moe.implementation != "grouped":
            raise KinoeError(
                "engine.expert_parallel needs model.overrides.moe_implementation 'grouped' "
                f"(got {moe.implementation!r}, the single-rank reference)"
            )
        G = moe.num_experts // size
        keep = slice(rank * G, (rank + 1) * G)
        held = getattr(moe, "kept_experts", None)
        if held is not None:  # built with its experts already kept
            if held != keep:
                raise RuntimeError(f"an MoE layer holds experts {held}, not {keep}")
            continue
        for name in ("w_gate_up_E2FD", "w_down_EDF"):
            full = getattr(moe, name)
            setattr(moe, name, nn.Parameter(full.detach()[keep].clone(), full.requires_grad))
        moe.kept_experts = keep
    mark_expert_slices(model)


def mark_expert_slices(model: nn.Module) -> None:
    """Give each expert slice its ``expert_slice`` and ``expert_full_shape`` (from its layer's
    ``kept_experts``), again after anything that replaced the parameter objects (``to_empty``)."""
    if not isinstance(model, ExpertModel):
        return
    for moe in model.moe_modules():
        keep = getattr(moe, "kept_experts", None)
        if keep is None:
            continue
        for shard in (moe.w_gate_up_E2FD, moe.w_down_EDF):
            shard.expert_slice = keep
            shard.expert_full_shape = (moe.num_experts, *shard.shape[1:])


def shard_experts(model: nn.Module, groups: ExpertGroups) -> None:
    """Keep this rank's experts of every MoE layer (if the build has not) and route their
    tokens over ``groups``.

    Sliced from a model built whole, the shards keep exactly the values it was initialised
    or loaded with; a model built with only its experts (``build_initialised``) has the same.
    """
    keep_local_experts(model, groups.size, groups.rank)
    for moe in model.moe_modules():
        for shard in (moe.w_gate_up_E2FD, moe.w_down_EDF):
            # DeepSpeed's marks of an expert parameter: not all-reduced over the data-parallel
            # group, broadcast at start-up within its group only.
            shard.allreduce, shard.group_name = False, group_name(groups.size)
        moe.exchange = AllToAllExchange(groups, moe.num_experts)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``shard_experts`` split: each rank holds different values under these names."""
    if not isinstance(model, ExpertModel):
        return []
    return [p for moe in model.moe_modules() for p in (moe.w_gate_up_E2FD, moe.w_down_EDF)]
