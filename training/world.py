"""This process's place in a run: joining the process group, rank, size and device."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, data-parallel size and device.

    ``control`` is a gloo group over the same ranks for small host-side decisions (whether a
    rank received a stop signal): an all-reduce there never waits for the GPU's queue, where
    one over NCCL would make the host wait for every kernel queued before it.
    """

    rank: int
    local_rank: int
    size: int
    device: torch.device
    control: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """Join the process group (NCCL on GPUs, gloo on CPU); a single process needs no launcher."""
    import deepspeed

    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed picks its accelerator at import time from this variable; on a CPU-only
        # host its auto-detection may otherwise probe for Intel extensions.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return World(
        rank=dist.get_rank(),
        local_rank=local_rank,
        size=dist.get_world_size(),
        device=device,
        control=dist.new_group(backend="gloo") if cuda else dist.group.WORLD,
    )


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when ``flag`` is true on any rank (a collective over ``world.control``)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, group=world.control)
    return value.item() > 0
