"""engine.fp8: which layers train in float8, that the swap keeps the model's names and values,
and the one-line refusals (no FP8 GPU, no compile, fp32).

Float8 matmuls need FP8 tensor cores; here torchao's emulation (the same casts and scales,
ordinary matmuls) checks the conversion on CPU. Speed and loss over 300 steps are measured on
an H200 in benchmarks/fp8_training.py."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from common.errors import KinoeError
from models.mistral.args import tiny
from models.mistral.model import Mistral
from models.mixtral.args import mixtral_tiny
from models.mixtral.model import Mixtral
from training.config import EngineConfig
from training.fp8 import apply_fp8, check_fp8_device
from training.losses import next_token_losses

DENSE = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
FEED_FORWARD = ("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj")


def _pair(model_type, args):
    torch.manual_seed(0)
    reference = model_type(args)
    converted = model_type(args)
    converted.load_state_dict(reference.state_dict())
    return reference, converted


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_swaps_the_block_linears_only_and_trains_close_to_full_precision(recipe):
    reference, converted = _pair(Mistral, tiny())
    names_before = list(converted.state_dict())
    layers = apply_fp8(converted, recipe, emulate=True)

    assert layers == [f"layers.{i}.{name}" for i in range(2) for name in DENSE + FEED_FORWARD]
    swapped = {
        name for name, module in converted.named_modules() if "Float8" in type(module).__name__
    }
    assert swapped == set(layers)
    # Checkpoints, conversion and resume see the same parameters with and without FP8.
    assert list(converted.state_dict()) == names_before
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            reference.state_dict().values(), converted.state_dict().values(), strict=True
        )
    )

    tokens = torch.randint(0, 2048, (2, 65), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (reference, converted):
        loss = next_token_losses(model(tokens[:, :-1]), tokens[:, 1:]).mean()
        loss.backward()
        losses.append(loss.item())
    # float8 e4m3 keeps 3 mantissa bits: close to fp32, never equal.
    assert losses[1] == pytest.approx(losses[0], rel=2e-2) and losses[1] != losses[0]
    for (name, full), (_, fp8) in zip(
        reference.named_parameters(), converted.named_parameters(), strict=True
    ):
        cosine = torch.nn.functional.cosine_similarity(
            full.grad.flatten(), fp8.grad.flatten(), dim=0
        )
        assert cosine > 0.98, name


def test_fp8_leaves_the_router_and_the_experts_in_bf16():
    _, model = _pair(Mixtral, mixtral_tiny())
    layers = apply_fp8(model, "rowwise", emulate=True)
    assert layers == [f"layers.{i}.{name}" for i in range(2) for name in DENSE]
    assert type(model.layers[0].feed_forward.router) is torch.nn.Linear
    assert type(model.output) is torch.nn.Linear


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_fp8_without_an_fp8_gpu_is_one_line():
    with pytest.raises(KinoeError) as refused:
        check_fp8_device("rowwise")
    message = str(refused.value)
    assert (
        "\n" not in message and "engine.fp8 rowwise" in message and "engine.fp8 to null" in message
    )


@pytest.mark.parametrize(
    ("settings", "fix"),
    [
        ({"fp8": "tensorwise"}, "engine.compile to true"),
        ({"fp8": "rowwise", "compile": True, "precision": "fp32"}, "engine.precision to bf16"),
    ],
)
def test_fp8_settings_that_cannot_help_are_refused(settings, fix):
    with pytest.raises(ValidationError, match=fix):
        EngineConfig.model_validate(settings)
    assert EngineConfig.model_validate({"fp8": "rowwise", "compile": True}).fp8 == "rowwise"
