"""Expert parallelism on CPU ranks (gloo): the all-to-all exchange gives the loss and gradients of
the same model without it, with and without dropped assignments (scripts/expert_parallel_equivalence.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import KinoeError
from models.mistral import Mistral
from models.mistral.args import tiny
from models.mixtral import Mixtral, MixtralArgs
from models.mixtral.args import mixtral_tiny
from training.expert_parallel import ExpertGroups, shard_experts

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
    # Ranks print concurrently: a line may run into the next, so match each refusal on its own.
    refused = re.findall(
        r"rank \d refused: engine.expert_parallel 3 does not divide the (\d) ranks", output
    )
    assert refused == [str(ranks)] * ranks, output[-3000:]
    for _, _, case, loss, reference, grad_diff, dropped in lines:
        assert loss == reference
        assert float(grad_diff) < 1e-6
        # The capacity case must really drop assignments, or it tests nothing new.
        assert (int(dropped) > 0) == (case == "capacity_1.0")


def _unsharded_groups() -> ExpertGroups:
    # Refusals come before any exchange: no process group is needed to reach them.
    return ExpertGroups(size=2, rank=0, world_size=2, group=None, replicas=None)


def test_sharding_refuses_what_it_cannot_split_in_one_line():
    with pytest.raises(KinoeError, match="needs a model with experts"):
        shard_experts(Mistral(tiny()), _unsharded_groups())
    loop = MixtralArgs.model_validate({**mixtral_tiny().model_dump(), "moe_implementation": "loop"})
    with pytest.raises(KinoeError, match="moe_implementation 'grouped'"):
        shard_experts(Mixtral(loop), _unsharded_groups())
    three = MixtralArgs.model_validate({**mixtral_tiny().model_dump(), "num_experts": 3})
    with pytest.raises(KinoeError, match="does not divide the model's 3 experts"):
        shard_experts(Mixtral(three), _unsharded_groups())
