"""Partitioned construction under ZeRO-3: two gloo ranks build a model into their partitions with
the whole-model build's exact weights (or model.init_from's), grow by about half the model, and train."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from convert.initial import write_weights_directory
from convert.sources import module_source
from models.mistral import Mistral
from models.mistral.args import MistralArgs, tiny

SCRIPT = Path(__file__).parent / "scripts" / "partitioned_build.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_zero3_builds_into_partitions_with_the_whole_builds_weights(tmp_path):
    # Weights for model.init_from: the script's architecture, another seed.
    script = SCRIPT.read_text()
    architecture = eval(re.search(r"ARCHITECTURE = (\{.*?\})", script, re.S).group(1))
    torch.manual_seed(11)
    other = Mistral(MistralArgs.model_validate({**tiny().model_dump(), **architecture}))
    weights = tmp_path / "weights"
    write_weights_directory(module_source("mistral", other, {"kind": "test"}), weights, 2**31)
    del other

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        # Large allocations straight from mmap and back on free: peak RSS then follows the
        # tensors alive, not glibc's heap, which keeps freed blocks of a module's full tensors.
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(SCRIPT), str(weights)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert sorted(re.findall(r"rank (\d) weights equal True", output)) == ["0", "1"], output[-2000:]
    assert sorted(re.findall(r"rank (\d) init_from equal True", output)) == ["0", "1"]
    losses = [float(x) for x in re.findall(r"rank \d step \d loss ([\d.]+)", output)]
    assert len(losses) == 4 and all(0 < loss < 20 for loss in losses)
    memory = re.findall(r"rank (\d) model (\d+) MB build growth (\d+) MB peak (\d+) MB", output)
    assert len(memory) == 2
    for rank, model_mb, growth_mb, peak_mb in memory:
        print(
            f"rank {rank}: model {model_mb} MB in fp32, build grew {growth_mb} MB, peak {peak_mb} MB"
        )
        # A whole build grows by the model's size; half of it is this rank's partition, and
        # one module at a time is whole while it is built or initialised.
        assert int(growth_mb) < 0.75 * int(model_mb), (rank, model_mb, growth_mb)


def test_expert_parallel_build_holds_only_its_experts_with_the_whole_builds_values(tmp_path):
    from convert.initial import load_initial_weights
    from models.mixtral import Mixtral
    from models.mixtral.args import mixtral_tiny
    from training.partitioned import build_initialised
    from training.world import World

    args = mixtral_tiny()  # 4 experts
    whole = build_initialised(Mixtral, args, seed=5)
    parts = []
    for rank in range(2):
        world = World(rank=rank, local_rank=rank, size=2, device=torch.device("cpu"))
        parts.append(build_initialised(Mixtral, args, seed=5, world=world, expert_parallel=2))
    for name, value in whole.state_dict().items():
        if "w_gate_up" in name or "w_down" in name:
            # Each rank holds two of the four experts; together, the whole build's draws.
            held = [part.state_dict()[name] for part in parts]
            assert all(tensor.shape[0] == 2 for tensor in held), name
            assert torch.equal(torch.cat(held), value), name
        else:
            assert all(torch.equal(part.state_dict()[name], value) for part in parts), name

    # model.init_from's stacked experts are cut to the rank's slice the same way.
    torch.manual_seed(9)
    other = Mixtral(args)
    weights = tmp_path / "weights"
    write_weights_directory(module_source("mixtral", other, {"kind": "test"}), weights, 2**31)
    load_initial_weights(parts[1], weights)
    name = "layers.1.feed_forward.w_down_EDF"
    assert torch.equal(parts[1].state_dict()[name], other.state_dict()[name][2:])
