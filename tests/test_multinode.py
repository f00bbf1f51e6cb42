"""Two "nodes" on localhost: two torchrun agents (launch/slurm/torchrun.sh, as train.sbatch starts
one per node) meet in a c10d rendezvous and train one run together over gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_pretrain_train import metrics, run_dir, write_config

from common.manifest import read_manifest
from launch.jobs import SCRIPTS_DIR

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_agents_on_localhost_train_one_run(pretrain_shards, tmp_path):
    steps = 6
    config = write_config(
        tmp_path,
        pretrain_shards,
        "two-nodes",
        train={"steps": steps, "global_batch_size": 4, "micro_batch_size": 2},
        data={"seq_len": 32, "num_workers": 0},
        checkpoint={"interval": 1000},
        drills={"record_samples": True},
    )
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "KINOE_"))},
        # Appended: .venv/bin's ninja differs from the system's and would make DeepSpeed
        # rebuild its CPU op (see tests/test_launch_slurm.py).
        "PATH": f"{os.environ['PATH']}:{Path(sys.executable).parent}",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "KINOE_NNODES": "2",
        "KINOE_NPROC_PER_NODE": "1",
        "KINOE_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "KINOE_RDZV_ID": "two-nodes",
    }
    agents = [
        subprocess.Popen(
            ["bash", str(SCRIPTS_DIR / "torchrun.sh"), "pretrain", str(config)],
            cwd=REPO,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=240)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, 9)
    for agent, output in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, output[-3000:]
        assert "1 trainer(s) of 2 node(s)" in output

    # Each agent started one of the two ranks ("[rank N]" prefixes its trainer's log lines).
    ranks = [{rank for rank in "01" if f"[rank {rank}]" in output} for output in outputs]
    assert sorted(ranks, key=sorted) == [{"0"}, {"1"}], ranks
    manifest = read_manifest(run_dir(config))
    assert manifest.status == "complete" and manifest.summary["steps"] == steps
    log = (run_dir(config) / "logs" / "pretrain.rank0.log").read_text()
    assert "2 ranks x 1 micro-batches" in log
    assert [record["step"] for record in metrics(config)] == list(range(1, steps + 1))
    # The ranks split every global batch between them: each sample exactly once.
    seen = {}
    for rank_file in sorted((run_dir(config) / "samples").glob("rank*.jsonl")):
        seen[rank_file.name] = [
            position
            for line in rank_file.read_text().splitlines()
            for position in json.loads(line)["positions"]
        ]
    assert sorted(seen) == ["rank00000.jsonl", "rank00001.jsonl"]
    assert all(len(positions) == steps * 2 for positions in seen.values())
    assert sorted(seen["rank00000.jsonl"] + seen["rank00001.jsonl"]) == list(range(steps * 4))
