"""kinoe pretrain end to end on CPU: real shards, real DeepSpeed (gloo), real torchrun, real signals."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from common.errors import KinoeError
from common.manifest import read_manifest
from training.checkpoint import LATEST, STATE_FILE, Checkpointer
from training.config import CheckpointConfig
from training.world import World

from wandb_records import offline_runs, records_of

REPO = Path(__file__).resolve().parent.parent
KINOE = Path(sys.executable).parent / "kinoe"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def write_config(tmp_path: Path, shards: dict, name: str, **sections) -> Path:
    """A tiny-Mistral pretraining config over the real shards, with ``sections`` merged in."""
    config = {
        "run": {"root": str(tmp_path / "runs"), "name": name},
        "model": {"preset": "tiny"},
        "data": {
            "tokenizer": str(shards["tokenizer"]),
            "sources": {key: str(path) for key, path in shards["sources"].items()},
            "phases": [
                {"name": "pretrain", "start": 0.0, "mixture": {"wikipedia": 2.0, "web": 1.0}},
                {
                    "name": "post_training_mix",
                    "start": 0.8,
                    "mixture": {"wikipedia": 2.0, "web": 1.0, "instructions": 1.0},
                },
            ],
            "seq_len": 64,
            "num_workers": 1,
        },
        "train": {"steps": 40, "global_batch_size": 8, "micro_batch_size": 2},
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 4},
        "engine": {"zero_stage": 2},
        "checkpoint": {"interval": 10, "keep_last": 2},
        "monitor": {"log_interval": 5},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def launch(
    config: Path,
    nproc: int,
    *overrides: str,
    wait: bool = True,
    stage: tuple[str, ...] = ("pretrain",),
    agent_script: bool = False,
):
    """``torchrun --standalone --nproc_per_node N kinoe <stage> -c config``, as users run it;
    with ``agent_script``, through launch/slurm/torchrun.sh as train.sbatch runs it on each node."""
    command = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(KINOE)]
    command += [*stage, "-c", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if agent_script:
        command = ["bash", str(REPO / "launch" / "slurm" / "torchrun.sh"), " ".join(stage)]
        command += [str(config), *overrides]
        env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "KINOE_"))}
        # Appended: .venv/bin's ninja differs from the system's and would make DeepSpeed
        # rebuild its CPU op (see tests/test_launch_slurm.py).
        env["PATH"] = f"{os.environ['PATH']}:{KINOE.parent}"
        env["KINOE_NPROC_PER_NODE"] = str(nproc)
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, output, None)


def run_dir(config: Path) -> Path:
    data = yaml.safe_load(config.read_text())
    return Path(data["run"]["root"]) / "pretrain" / data["run"]["name"]


def metrics(config: Path) -> list[dict]:
    path = run_dir(config) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(config: Path) -> list[float]:
    return [record["loss"] for record in metrics(config)]


@pytest.fixture(scope="module")
def shards(pretrain_shards):
    return pretrain_shards


def test_tiny_model_loss_falls_over_hundreds_of_steps(shards, tmp_path):
    config = write_config(
        tmp_path,
        shards,
        "falls",
        train={"steps": 300, "global_batch_size": 8, "micro_batch_size": 8},
        checkpoint={"interval": 300},
        monitor={"log_interval": 50},
    )
    result = launch(config, 1)
    assert result.returncode == 0, result.stdout[-3000:]
    history = losses(config)
    assert len(history) == 300
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < first - 2.0, (first, last)
    assert "tokens/s" in result.stdout and "ETA" in result.stdout
    manifest = read_manifest(run_dir(config))
    assert manifest.status == "complete"
    assert manifest.summary["steps"] == 300


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_zero_stage_trains_with_two_processes(shards, tmp_path, stage):
    config = write_config(tmp_path, shards, f"zero{stage}", engine={"zero_stage": stage})
    result = launch(config, 2, "train.steps=12")
    assert result.returncode == 0, result.stdout[-3000:]
    history = losses(config)
    assert len(history) == 12 and all(loss == loss for loss in history)
    ds = json.loads((run_dir(config) / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_accumulation_steps"] == 2  # 8 = 2 per pass x 2 ranks x 2
    assert (run_dir(config) / "checkpoints" / LATEST).read_text().strip() == "step_00000012"


def wait_for_steps(config: Path, steps: int, process: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    path = run_dir(config) / "metrics.jsonl"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training ended before step {steps}: {process.stdout.read()[-3000:]}")
        if path.is_file() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    pytest.fail(f"no step {steps} within {timeout} s")


def signal_every_process(root: int, number: int) -> None:
    """Send ``number`` to ``root`` and all its descendants, as SLURM signals every process of a
    job step (torchrun starts its trainers in sessions of their own, out of a killpg's reach)."""
    parents = {}
    for proc in Path("/proc").iterdir():
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(shards, tmp_path):
    sections = {
        "train": {"steps": 30, "global_batch_size": 8, "micro_batch_size": 2},
        "checkpoint": {"interval": 1000},
        "drills": {"record_samples": True},
    }
    straight = write_config(tmp_path / "a", shards, "straight", **sections)
    interrupted = write_config(tmp_path / "b", shards, "interrupted", **sections)
    assert launch(straight, 2).returncode == 0

    # Through torchrun.sh, the agent of every SLURM job: torchrun itself would exit 1 for
    # trainers that exited 75, the script exits 75 (stopped, resumable) as a single process does.
    process = launch(interrupted, 2, wait=False, agent_script=True)
    wait_for_steps(interrupted, 8, process)
    signal_every_process(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 75, output[-3000:]
    assert "every trainer here stopped at a checkpoint (exit 75; torchrun exited 1)" in output
    stopped_at = len(metrics(interrupted))
    assert 8 <= stopped_at < 30, output[-3000:]
    assert read_manifest(run_dir(interrupted)).status == "stopped"
    assert "rerun the same command to resume" in output

    resumed = launch(interrupted, 2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    # Bitwise: the same losses, step for step, as the run that never stopped.
    assert losses(interrupted) == losses(straight)

    seen = []
    for rank_file in sorted((run_dir(interrupted) / "samples").glob("rank*.jsonl")):
        for line in rank_file.read_text().splitlines():
            seen.extend(json.loads(line)["positions"])
    assert sorted(seen) == list(range(30 * 8)), "every sample exactly once"


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(shards, tmp_path):
    # Also the digests: the newest complete checkpoint is then damaged (bytes overwritten in an
    # optimizer shard, size unchanged), so resume must pass it over for the one before.
    config = write_config(
        tmp_path,
        shards,
        "crash",
        train={"steps": 20},
        checkpoint={"interval": 5},
        drills={"crash_in_checkpoint_at_step": 15},
    )
    crashed = launch(config, 2)
    assert crashed.returncode != 0
    checkpoints = run_dir(config) / "checkpoints"
    assert (checkpoints / LATEST).read_text().strip() == "step_00000010"
    assert (checkpoints / "step_00000015").is_dir()
    assert not (checkpoints / "step_00000015" / STATE_FILE).exists()
    recorded = json.loads((checkpoints / "step_00000010" / STATE_FILE).read_text())["files"]
    shard = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard = shard if shard in recorded else shard.removeprefix("bf16_")
    assert {shard, "mp_rank_00_model_states.pt", "rng/rank00001.pt"} <= recorded.keys()
    overwrite_middle(checkpoints / "step_00000010" / shard)

    resumed = launch(config, 2, "drills.crash_in_checkpoint_at_step=null")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"step_00000010/{shard}: its XXH3-128 digest differs" in resumed.stdout
    assert "resuming from step_00000005, the newest intact checkpoint" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step_00000005" in resumed.stdout
    assert [record["step"] for record in metrics(config)] == list(range(1, 21))
    assert (checkpoints / LATEST).read_text().strip() == "step_00000020"

    # A damaged model-states file: refused by name when asked for, passed over for "latest".
    overwrite_middle(checkpoints / "step_00000020" / "mp_rank_00_model_states.pt")
    world = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))
    logger = logging.getLogger("test")
    asked = Checkpointer(checkpoints, CheckpointConfig(resume=20), world, logger)
    with pytest.raises(KinoeError, match=r"step_00000020/mp_rank_00_model_states.pt: its XXH3-128"):
        asked.step_to_resume()
    latest = Checkpointer(checkpoints, CheckpointConfig(resume="latest"), world, logger)
    assert latest.step_to_resume() == 15


def overwrite_middle(path: Path, count: int = 256) -> None:
    """Overwrite ``count`` bytes in the middle of a file, its size unchanged (silent corruption)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(255 - b for b in data[middle : middle + count])
    path.write_bytes(data)


def test_nan_step_is_skipped_counted_and_alerted(shards, tmp_path):
    config = write_config(
        tmp_path,
        shards,
        "nan",
        train={"steps": 8, "global_batch_size": 4, "micro_batch_size": 2},
        drills={"nan_at_steps": [3]},
        monitor={"log_interval": 2, "wandb": {"enabled": True, "mode": "offline"}},
    )
    result = launch(config, 1)
    assert result.returncode == 0, result.stdout[-3000:]
    history = metrics(config)
    assert [record["skipped"] for record in history] == [i == 2 for i in range(8)]
    assert history[2]["loss"] != history[2]["loss"]  # NaN
    assert all(record["loss"] == record["loss"] for i, record in enumerate(history) if i != 2)
    manifest = read_manifest(run_dir(config))
    assert manifest.summary["skipped_steps"] == 1
    alerts = [
        json.loads(line) for line in (run_dir(config) / "alerts.jsonl").read_text().splitlines()
    ]
    assert any(alert["level"] == "ERROR" and alert["step"] == 3 for alert in alerts)
    (records,) = offline_runs(run_dir(config))
    titles = [alert.title for alert in records_of(records, "alert")]
    assert any("non-finite" in title for title in titles), titles


def test_phase_switch_brings_in_the_instructions(shards, tmp_path):
    config = write_config(tmp_path, shards, "phases", train={"steps": 20})
    result = launch(config, 1)
    assert result.returncode == 0, result.stdout[-3000:]
    history = metrics(config)
    phases = [record["phase"] for record in history]
    assert phases == ["pretrain"] * 16 + ["post_training_mix"] * 4
    assert not any("instructions" in r["loss_by_source"] for r in history[:16])
    assert sum("instructions" in r["loss_by_source"] for r in history[16:]) >= 3
    assert "phase 'post_training_mix' from step 17" in result.stdout
    summary = read_manifest(run_dir(config)).summary
    assert summary["consumed_tokens_by_source"]["instructions"] > 0


def test_resume_on_fewer_ranks_through_a_universal_checkpoint(shards, tmp_path):
    config = write_config(
        tmp_path,
        shards,
        "reshard",
        train={"steps": 20},
        checkpoint={"interval": 10},
        drills={"crash_in_checkpoint_at_step": 20, "record_samples": True},
    )
    assert launch(config, 2).returncode != 0  # stops with step 10 as the last checkpoint
    refused = launch(config, 1, "drills.crash_in_checkpoint_at_step=null")
    assert refused.returncode == 1
    error = [line for line in refused.stdout.splitlines() if "error:" in line]
    assert len(error) == 1 and "ds_to_universal" in error[0] and "2 ranks" in error[0]

    checkpoint = run_dir(config) / "checkpoints" / "step_00000010"
    convert = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    convert += ["--input_folder", str(checkpoint), "--output_folder", f"{checkpoint}_universal"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    assert subprocess.run(convert, env=env, capture_output=True).returncode == 0

    resumed = launch(
        config, 1, "drills.crash_in_checkpoint_at_step=null", "checkpoint.load_universal=true"
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert [record["step"] for record in metrics(config)] == list(range(1, 21))
    seen = []
    for rank_file in sorted((run_dir(config) / "samples").glob("rank*.jsonl")):
        for line in rank_file.read_text().splitlines():
            seen.extend(json.loads(line)["positions"])
    assert sorted(seen) == list(range(20 * 8)), "no sample repeated or skipped across world sizes"


def test_document_masking_gives_the_loss_of_separate_documents(shards):
    """A packed real sample's per-token losses equal those of each document run on its own."""
    import torch

    from models.mistral import Mistral
    from models.mistral.args import tiny
    from pretrain.data import DataConfig, SampleOrder, build_loader, open_sources
    from training.losses import next_token_losses

    data = DataConfig.model_validate(
        {
            "tokenizer": str(shards["tokenizer"]),
            "sources": {"wikipedia": str(shards["sources"]["wikipedia"])},
            "phases": [{"name": "all", "start": 0.0, "mixture": {"wikipedia": 1.0}}],
            "seq_len": 128,
            "num_workers": 0,
        }
    )
    names, sources, eos_id, _ = open_sources(data)
    order = SampleOrder(names, [s.num_samples for s in sources], data.phases, 4, 2, data.seed)
    loader = build_loader(
        sources,
        order,
        start_step=0,
        stop_step=1,
        rank=0,
        world_size=1,
        micro_batch_size=2,
        accumulation=1,
        eos_id=eos_id,
        document_masking=True,
        num_workers=0,
        prefetch_factor=2,
        pin_memory=False,
    )
    batch = next(iter(loader))
    assert int(batch.document_ids_BT.max()) >= 2, "the sample should pack several documents"
    torch.manual_seed(0)
    model = Mistral(tiny()).eval()
    with torch.no_grad():
        packed_BT = next_token_losses(
            model(batch.input_ids_BT, batch.document_ids_BT), batch.labels_BT
        )
        for row in range(batch.input_ids_BT.shape[0]):
            document_ids = batch.document_ids_BT[row]
            for document in document_ids.unique().tolist():
                where = (document_ids == document).nonzero().flatten()
                tokens = batch.input_ids_BT[row, where][None]
                labels = batch.labels_BT[row, where][None]
                alone = next_token_losses(model(tokens), labels)[0]
                torch.testing.assert_close(packed_BT[row, where], alone, atol=1e-5, rtol=1e-5)
    # The label after each EOS belongs to the next document, so it is not trained on.
    assert (batch.labels_BT[batch.input_ids_BT == eos_id] == -100).all()
