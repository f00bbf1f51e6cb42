"""Building a model as training holds it: whole on the host for ZeRO 1/2 (with only this rank's
experts under expert parallelism), straight into its partitions for ZeRO-3, where no rank ever
holds more than its share plus one module.

Both builds draw the initial weights the same way: the model's ``initializers``, in order,
from torch's CPU generator seeded with the run's seed just before the first draw. So a
ZeRO-3 run starts from exactly the weights a ZeRO-2 run with the same seed starts from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from training.expert_parallel import keep_local_experts, mark_expert_slices
from training.world import World


def build_initialised(
    model_type: Callable[[Any], nn.Module],
    args: Any,
    seed: int,
    ds_config: dict[str, Any] | None = None,
    world: World | None = None,
    expert_parallel: int = 1,
) -> nn.Module:
    """``model_type(args)`` with seeded initial weights; into ZeRO-3 partitions when
    ``ds_config`` says stage 3; with only this rank's experts when ``expert_parallel`` > 1."""
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        return _build_partitioned(model_type, args, seed, ds_config, world)
    # Built on the meta device first: the layers' own default initialisation would draw
    # every weight once more, on the host, only to be overwritten.
    with torch.device("meta"):
        model = model_type(args)
    if expert_parallel > 1:
        # Other ranks' experts are never materialised here: Mixtral 8x7B's are 45B parameters,
        # 180 GB in fp32 on every rank of a node if the model were built whole.
        rank = world.rank if world is not None else 0
        keep_local_experts(model, expert_parallel, rank % expert_parallel)
    model.to_empty(device="cpu")
    mark_expert_slices(model)  # to_empty made new parameter objects
    torch.manual_seed(seed)
    for parameter, initialise in model.initializers():
        draw(parameter, initialise)
    model.reset_buffers()
    return model


def draw(parameter: torch.Tensor, initialise: Callable[[torch.Tensor], Any]) -> None:
    """Fill ``parameter`` from its initializer; an expert slice gets its part of a draw of the
    whole stack, so that the generator advances as for the whole model and every rank's
    experts equal the whole build's (one layer's stack is held for the moment of the draw)."""
    full_shape = getattr(parameter, "expert_full_shape", None)
    if full_shape is None:
        initialise(parameter)
        return
    values = torch.empty(full_shape, dtype=parameter.dtype)
    initialise(values)
    with torch.no_grad():
        parameter.copy_(values[parameter.expert_slice])


def _build_partitioned(
    model_type: Callable[[Any], nn.Module],
    args: Any,
    seed: int,
    ds_config: dict[str, Any],
    world: World | None,
) -> nn.Module:
    import deepspeed

    # zero.Init partitions each module's parameters as soon as its constructor returns, so a
    # rank holds one module whole at most; the model's own initialisation inside its
    # constructor then runs on empty partitions and draws nothing that is kept.
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = model_type(args)
    torch.manual_seed(seed)
    is_main = world.is_main if world is not None else True
    for parameter, initialise in model.initializers():
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
            if is_main:
                # Drawn in fp32 on the host, as the plain build draws, then copied in.
                values = torch.empty(parameter.shape, dtype=torch.float32)
                initialise(values)
                parameter.data.copy_(values)
    return model


def assign(parameter: torch.Tensor, read: Callable[[], torch.Tensor], is_main: bool) -> None:
    """Copy ``read()`` into ``parameter``; a ZeRO-3 partition is gathered, filled by rank 0 and
    re-partitioned, so only rank 0 reads and no rank holds more than this tensor whole."""
    from deepspeed.runtime.zero.utils import is_zero_param

    with torch.no_grad():
        if not is_zero_param(parameter):
            # An expert slice (expert parallelism) takes its experts from the whole stack.
            parameter.copy_(read()[getattr(parameter, "expert_slice", slice(None))])
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
            if is_main:
                parameter.data.copy_(read())


def full_shape(parameter: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``parameter`` as the model declares it, also when it is a ZeRO-3 partition."""
    from deepspeed.runtime.zero.utils import is_zero_param

    if is_zero_param(parameter):
        return tuple(parameter.ds_shape)
    return tuple(getattr(parameter, "expert_full_shape", parameter.shape))
