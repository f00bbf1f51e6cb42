"""What is applied to a model from outside its architecture: FP8 linear layers, activation
checkpointing, compilation.

All act on the decoder blocks (``model.layers``), the unit every family has, so the model
files stay architecture only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)

from training.config import EngineConfig
from training.fp8 import apply_fp8


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The wrapper's state-dict hooks strip its prefix, so parameter names (and checkpoints)
    are the same with and without it.
    """
    for index, block in enumerate(model.layers):
        model.layers[index] = checkpoint_wrapper(
            block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False
        )


def compiled_loss(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``loss`` compiled: the float32 upcast and log-softmax over the vocabulary fuse into one pass.

    Unfused, a (B, T, 65,024) logits tensor is copied to float32 and read and written several
    times more; at B x T = 16k tokens that is gigabytes of memory traffic per micro-batch.
    """
    return torch.compile(loss)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block: same-shaped blocks share one compiled graph."""
    for block in model.layers:
        # In place (nn.Module.compile), so parameter names keep no "_orig_mod." prefix.
        block.compile()


def parallelize(model: nn.Module, engine: EngineConfig) -> list[str]:
    """Apply what ``engine`` asks for from outside the architecture: FP8 linear layers, then
    checkpointing, then compilation (which fuses FP8's scaling casts into the blocks' graphs).

    Returns the names of the layers that train in FP8 (none when ``engine.fp8`` is off).
    """
    fp8_layers = apply_fp8(model, engine.fp8) if engine.fp8 is not None else []
    if engine.activation_checkpointing:
        apply_activation_checkpointing(model)
    if engine.compile:
        compile_blocks(model)
    return fp8_layers
