"""Building a model as training holds it: whole on the host for ZeRO 1/2, straight into its
partitions for ZeRO-3, where no rank ever holds more than its share plus one module.

Both builds draw the initial weights the same way: the model's ``initializers``, in order,
from torch's CPU generator seeded with the run's seed just before the first draw. So a
ZeRO-3 run starts from exactly the weights a ZeRO-2 run with the same seed starts from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from training.world import World


def build_initialised(
    model_type: Callable[[Any], nn.Module],
    args: Any,
    seed: int,
    ds_config: dict[str, Any] | None = None,
    world: World | None = None,
) -> nn.Module:
    """``model_type(args)`` with seeded initial weights; into ZeRO-3 partitions when ``ds_config`` says stage 3."""
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        return _build_partitioned(model_type, args, seed, ds_config, world)
    # Built on the meta device first: the layers' own default initialisation would draw
    # every weight once more, on the host, only to be overwritten.
    with torch.device("meta"):
        model = model_type(args)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


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
            parameter.copy_(read())
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
            if is_main:
                parameter.data.copy_(read())


def full_shape(parameter: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``parameter`` as the model declares it, also when it is a ZeRO-3 partition."""
    from deepspeed.runtime.zero.utils import is_zero_param

    return tuple(parameter.ds_shape if is_zero_param(parameter) else parameter.shape)
