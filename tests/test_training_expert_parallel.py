"""Expert parallelism on CPU ranks (gloo): the all-to-all exchange gives the loss and gradients of
the same model without it, with and without dropped assignments (scripts/expert_parallel_equivalence.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from common.errors import KinoeError
from models.mistral import Mistral
from models.mistral.args import tiny
from models.mixtral import Mixtral, MixtralArgs
from models.mixtral.args import mixtral_tiny
from training.expert_parallel import expert_groups, shard_experts

SCRIPT = Path(__file__).parent / "scripts" / "expert_parallel_equivalence.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.parametrize("ranks, sizes", [(2, ["1", "2"]), (4, ["2", "4"])])
def test_expert_parallel_equals_one_rank_per_expert_set(ranks, sizes):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}", str(SCRIPT), *sizes]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    lines = re.findall(
        r"rank (\d) ep (\d) case (\S+) loss ([\d.]+) reference ([\d.]+) "
        r"max_grad_diff (\S+) dropped (\d+)",
        output,
    )
    assert len(lines) == ranks * len(sizes) * 2, output[-2000:]
    for _, _, case, loss, reference, grad_diff, dropped in lines:
        assert loss == reference
        assert float(grad_diff) < 1e-6
        # The capacity case must really drop assignments, or it tests nothing new.
        assert (int(dropped) > 0) == (case == "capacity_1.0")


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_sharding_refuses_what_it_cannot_split_in_one_line(one_rank):
    with pytest.raises(KinoeError, match="does not divide the 1 ranks"):
        expert_groups(2)
    groups = expert_groups(1)
    with pytest.raises(KinoeError, match="needs a model with experts"):
        shard_experts(Mistral(tiny()), groups)
    loop = MixtralArgs.model_validate({**mixtral_tiny().model_dump(), "moe_implementation": "loop"})
    with pytest.raises(KinoeError, match="moe_implementation 'grouped'"):
        shard_experts(Mixtral(loop), groups)


def test_one_rank_exchange_keeps_the_weights_and_outputs(one_rank):
    torch.manual_seed(0)
    model = Mixtral(mixtral_tiny())
    tokens_BT = torch.randint(model.args.vocab_size, (2, 9))
    expected = model(tokens_BT)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    shard_experts(model, expert_groups(1))
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert torch.allclose(model(tokens_BT), expected, atol=1e-6)
