"""FP8 training of the decoder blocks' linear layers (torchao float8), applied from outside the model.

What runs in FP8: every ``nn.Linear`` inside ``model.layers`` — the attention projections
(q, k, v, o) and the dense feed-forward (gate, up, down) — each matmul of its forward and
backward with inputs, weights and output gradients cast to float8 under dynamic scaling
(``tensorwise``: one scale per tensor; ``rowwise``: one per row, more robust to outliers, a
little slower). What stays bf16, and why:

- the embedding and the output head: vocabulary-wide, and the head's logits feed the loss
  directly, where FP8's 3-bit mantissa costs accuracy for little time;
- the MoE router: tiny, and its softmax decides which expert a token reaches;
- the stacked expert weights: grouped GEMMs on 3-D parameters, not ``nn.Linear``.

Nothing else changes: the parameters keep their names, dtype and shapes (checkpoints and
conversion are the same with and without FP8), DeepSpeed keeps the fp32 masters and the
optimizer state, and only the matmuls' operands are quantised, freshly each step.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from common.errors import KinoeError

Fp8Recipe = Literal["tensorwise", "rowwise"]

# The compute capability whose tensor cores run each recipe's float8 matmuls (torch._scaled_mm):
# tensorwise from Ada (8.9: L4, L40S) on, rowwise from Hopper (9.0: H100, H200) on.
MIN_CAPABILITY: dict[str, tuple[int, int]] = {"tensorwise": (8, 9), "rowwise": (9, 0)}

# Module names (the last part) kept in bf16 inside the blocks.
KEPT_IN_BF16 = frozenset({"router"})


def is_fp8_linear(module: nn.Module, name: str) -> bool:
    """Whether ``name`` (a path under a decoder block) is a linear layer that trains in FP8.

    float8 matmuls need both dimensions divisible by 16; a layer that is not (only toy
    shapes are) stays bf16 rather than failing inside the kernel.
    """
    return (
        isinstance(module, nn.Linear)
        and name.rpartition(".")[2] not in KEPT_IN_BF16
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def check_fp8_device(recipe: Fp8Recipe) -> None:
    """Refuse, in one line, a machine whose GPU cannot run ``recipe``'s float8 matmuls."""
    needed = MIN_CAPABILITY[recipe]
    if not torch.cuda.is_available():
        raise KinoeError(
            f"engine.fp8 {recipe} needs a CUDA GPU of compute capability {needed[0]}.{needed[1]} "
            "or later and this machine has none; set engine.fp8 to null"
        )
    capability = torch.cuda.get_device_capability()
    if capability < needed:
        name = torch.cuda.get_device_name()
        hint = (
            " or engine.fp8 to tensorwise" if recipe == "rowwise" and capability >= (8, 9) else ""
        )
        raise KinoeError(
            f"engine.fp8 {recipe} needs FP8 tensor cores of compute capability "
            f"{needed[0]}.{needed[1]} or later; {name} has {capability[0]}.{capability[1]}; "
            f"set engine.fp8 to null{hint}"
        )


def apply_fp8(model: nn.Module, recipe: Fp8Recipe, *, emulate: bool = False) -> list[str]:
    """Swap the blocks' eligible linear layers for torchao's ``Float8Linear``, in place.

    Returns the converted layers' names (relative to the model). ``emulate`` runs the float8
    casts with ordinary matmuls instead of FP8 tensor cores (numerically the same rounding; for
    checking the conversion on a CPU, never fast); without it the GPU is checked first.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if not emulate:
        check_fp8_device(recipe)
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    converted: list[str] = []
    for index, block in enumerate(model.layers):
        prefix = f"layers.{index}."

        def chosen(module: nn.Module, name: str, prefix: str = prefix) -> bool:
            if is_fp8_linear(module, name):
                converted.append(prefix + name)
                return True
            return False

        convert_to_float8_training(block, config=config, module_filter_fn=chosen)
    return converted
