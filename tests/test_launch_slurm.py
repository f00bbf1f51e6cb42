"""launch/slurm/ and launch/jobs.py: sbatch options from a config, one-line errors, and real SLURM
jobs: training that checkpoints on SIGUSR1, requeues itself and resumes to completion; a failing
one that fails its job without requeueing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_pretrain_train import metrics, run_dir, write_config

from common.config import load_config
from common.errors import ConfigError, KinoeError
from common.manifest import Manifest, read_manifest, write_manifest
from launch.jobs import (
    EVAL_SCRIPT,
    SCRIPTS_DIR,
    TRAIN_SCRIPT,
    SlurmJob,
    main,
    run_status,
    sbatch_command,
    submit,
    time_limit_seconds,
)
from training.checkpoint import STATE_FILE

from slurm_cluster import FINAL_STATES

# ---------------------------------------------------------------- the job config and sbatch


def fake_sbatch(folder: Path, body: str) -> Path:
    """An ``sbatch`` on PATH that runs ``body`` (bash) instead of submitting anything."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "sbatch"
    script.write_text("#!/bin/bash\n" + body)
    script.chmod(0o755)
    return script


def test_sbatch_options_and_environment_come_from_the_job_config(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    fake_sbatch(
        tmp_path / "bin",
        f'printf "%s\\n" "$@" > {calls}/args\n'
        f'echo "$KINOE_CONDA_ENV $KINOE_MAX_REQUEUES $NCCL_SOCKET_IFNAME" > {calls}/env\n'
        'echo "4242;kinoetest"\n',
    )
    calls.mkdir()
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    job = SlurmJob(
        partition="gpu",
        account="llm-ja",
        nodes=4,
        gpus_per_node=8,
        cpus_per_task=96,
        mem="0",
        time="2-00:00:00",
        signal_seconds=900,
        max_requeues=7,
        exclusive=True,
        conda_env="/shared/envs/kinoe",
        env={"NCCL_SOCKET_IFNAME": "ib0"},
        sbatch_args={"constraint": "h100", "--reservation": "pretrain"},
    )
    log_dir = tmp_path / "logs" / "slurm"
    config = "configs/pretrain/mistral_1b_ja.yaml"

    job_id = submit("train.sbatch", ["pretrain", config], job, ["11", "12"], log_dir)

    assert job_id == "4242"
    assert log_dir.is_dir()  # SLURM would not create it
    args = (calls / "args").read_text().splitlines()
    assert args[0] == "--parsable"
    assert args[-3:] == [str(TRAIN_SCRIPT), "pretrain", config]
    for option in (
        "--partition=gpu",
        "--account=llm-ja",
        "--nodes=4",
        "--gpus-per-node=8",
        "--cpus-per-task=96",
        "--mem=0",
        "--time=2-00:00:00",
        "--signal=B:USR1@900",
        "--exclusive",
        "--constraint=h100",
        "--reservation=pretrain",
        f"--output={log_dir}/%x-%j.out",
        "--open-mode=append",
        "--export=ALL",
        "--dependency=afterok:11:12",
        "--kill-on-invalid-dep=yes",
    ):
        assert option in args, option
    assert not any(arg.startswith("--job-name") for arg in args)  # the script's own name
    assert (calls / "env").read_text().split() == ["/shared/envs/kinoe", "7", "ib0"]

    # Left unset, the scripts' own #SBATCH lines decide (8 GPUs for training, 1 for eval).
    plain = sbatch_command(EVAL_SCRIPT, ["run", "x.yaml"], SlurmJob(), [], log_dir)
    assert not any(
        arg.startswith(("--gpus", "--partition", "--job-name", "--dep")) for arg in plain
    )
    assert "--signal=B:USR1@600" in plain and plain[-3] == str(EVAL_SCRIPT)


def test_submit_errors_are_one_line_naming_the_fix(tmp_path, monkeypatch):
    job = SlurmJob(partition="nope")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(KinoeError, match="sbatch is not on PATH; submit from a SLURM login node"):
        submit("train.sbatch", ["pretrain", "x.yaml"], job)

    fake_sbatch(
        tmp_path / "bin",
        'echo "sbatch: error: invalid partition specified: nope" >&2\n'
        'echo "sbatch: error: Batch job submission failed: Invalid partition name" >&2\nexit 1\n',
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(KinoeError) as refused:
        submit("train.sbatch", ["pretrain", "x.yaml"], job, log_dir=tmp_path / "logs")
    message = str(refused.value)
    assert "\n" not in message
    assert "sbatch refused train.sbatch (exit code 1)" in message
    assert "Invalid partition name" in message and "fix the job's slurm settings" in message

    with pytest.raises(KinoeError, match=r"batch script nope.sbatch not found; use one of"):
        submit("nope.sbatch", [], job)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 5400), ("10:30", 630), ("4:00:00", 14400), ("2-00", 172800), ("1-2:30:15", 95415)],
)
def test_slurm_time_limits(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize(
    ("yaml_text", "error"),
    [
        ("time: one day\n", "time 'one day' is not a SLURM time limit"),
        ("time: '30'\nsignal_seconds: 1800\n", "signal_seconds (1800) must be less than"),
        ("mem: 64GB\n", "mem '64GB' must be a number"),
        ("sbatch_args: {partition: gpu}\n", "sbatch_args ['partition'] are fields of the job"),
        ("gpus: 8\n", "unknown key 'gpus'"),
    ],
)
def test_bad_job_configs_are_refused_naming_the_key(tmp_path, yaml_text, error):
    path = tmp_path / "job.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_config(SlurmJob, path)


def test_run_status_reads_the_manifest_of_the_run_the_command_writes(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"root": str(tmp_path / "runs")},
                "model": {"preset": "tiny"},
                "train": {"steps": 10, "global_batch_size": 2, "micro_batch_size": 2},
                "data": {
                    "tokenizer": "t.model",
                    "sources": {"web": "web"},
                    "seq_len": 32,
                    "phases": [{"name": "all", "start": 0.0, "mixture": {"web": 1.0}}],
                },
            }
        )
    )
    assert run_status("pretrain", config) is None
    run = tmp_path / "runs" / "pretrain" / "tiny"
    run.mkdir(parents=True)
    write_manifest(
        run,
        Manifest(
            stage="pretrain",
            status="stopped",
            run_dir=str(run),
            fingerprint="0",
            config={},
            command=[],
            git={},
            versions={},
            host={},
            started_at="2026-01-01T00:00:00",
        ),
    )
    assert run_status("pretrain", config) == "stopped"
    # run.name decides the directory, from the command line as in kinoe itself.
    assert run_status("pretrain", config, ["run.name=other"]) is None

    assert main(["status", "pretrain", str(config)]) == 0
    assert capsys.readouterr().out == "stopped\n"
    assert main(["status", "pretrain", str(config), "train.stepz=3"]) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err

    with pytest.raises(KinoeError, match="'pretrian' is not a kinoe command"):
        run_status("pretrian", config)
    with pytest.raises(KinoeError, match="'kinoe doctor' is not a stage with a run directory"):
        run_status("doctor", config)


def test_scripts_parse_and_refuse_to_run_outside_a_job():
    for script in (*SCRIPTS_DIR.glob("*.sbatch"), *SCRIPTS_DIR.glob("*.sh")):
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    outside = subprocess.run(
        ["bash", str(TRAIN_SCRIPT), "pretrain", "x.yaml"],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert outside.returncode != 0
    assert "train.sbatch runs as a SLURM batch job: submit it with sbatch" in outside.stderr
    usage = subprocess.run(["bash", str(TRAIN_SCRIPT)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: sbatch" in usage.stderr


# ---------------------------------------------------------------- real jobs on a local cluster


def job_environment(monkeypatch, cluster) -> None:
    """Point sbatch at the local cluster; jobs inherit this process's environment."""
    cluster.export_env(monkeypatch)
    # kinoe and torchrun from this interpreter's environment, found by env.sh on PATH. Appended,
    # not prepended: .venv/bin holds a newer ninja than the system's, and a different ninja makes
    # DeepSpeed rebuild its CPU op (a minute on two cores) here and again in every later test.
    monkeypatch.setenv("PATH", f"{os.environ['PATH']}:{Path(sys.executable).parent}")


def cpu_job(**fields) -> SlurmJob:
    """One CPU node of the local cluster: one trainer, one thread."""
    settings = {
        "partition": "debug",
        "gpus_per_node": 0,
        "cpus_per_task": 1,
        "time": "10:00",
        "signal_seconds": 60,
        "env": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
    }
    return SlurmJob(**{**settings, **fields})


def job_log(log_dir: Path, job_id: str) -> str:
    path = log_dir / f"kinoe-train-{job_id}.out"
    return path.read_text() if path.exists() else f"({path} missing)"


def wait_for_metrics(config: Path, steps: int, cluster, job_id: str, log_dir: Path) -> None:
    path = run_dir(config) / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= steps:
            return
        if cluster.state(job_id) in FINAL_STATES:
            pytest.fail(f"job {job_id} ended before step {steps}:\n{job_log(log_dir, job_id)}")
        time.sleep(0.05)
    pytest.fail(f"no step {steps} within 120 s:\n{job_log(log_dir, job_id)}")


@pytest.mark.slow
def test_train_job_checkpoints_on_usr1_requeues_itself_and_resumes_to_completion(
    slurm_cluster, pretrain_shards, tmp_path, monkeypatch
):
    job_environment(monkeypatch, slurm_cluster)
    monkeypatch.chdir(tmp_path)  # jobs start where they were submitted
    steps = 100
    config = write_config(
        tmp_path,
        pretrain_shards,
        "on-slurm",
        train={"steps": steps, "global_batch_size": 2, "micro_batch_size": 2},
        data={"seq_len": 32, "num_workers": 1},
        # No checkpoint but the one the signal asks for (and the last).
        checkpoint={"interval": 1000, "keep_last": 2},
        monitor={"log_interval": 50},
    )
    log_dir = tmp_path / "slurm-logs"
    job_id = submit(TRAIN_SCRIPT, ["pretrain", str(config)], cpu_job(), log_dir=log_dir)

    wait_for_metrics(config, 5, slurm_cluster, job_id, log_dir)
    # What SLURM does signal_seconds before the time limit (--signal=B:USR1@60): signal the
    # batch shell alone, which forwards it to the trainers.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    assert slurm_cluster.wait(job_id, timeout=150) == "COMPLETED", job_log(log_dir, job_id)

    log = job_log(log_dir, job_id)
    record = slurm_cluster.jobs(job_id)[0]
    assert (record["Restarts"], record["ExitCode"]) == ("1", "0:0"), log
    # It stopped at a checkpoint of its own, requeued itself and resumed from that checkpoint.
    stopped = re.search(r"stopped after step (\d+) on SIGUSR1", log)
    assert stopped, log
    # The torchrun agent ignored the signal (had it died of it, the trainers would have been
    # orphaned, their output lost, and on a real cluster killed mid-checkpoint).
    assert "User defined signal 1" not in log
    stop_step = int(stopped.group(1))
    assert 5 <= stop_step < steps
    checkpoint = run_dir(config) / "checkpoints" / f"step_{stop_step:08d}"
    assert (checkpoint / STATE_FILE).is_file()
    assert f"resumed from {checkpoint} (step {stop_step})" in log
    assert "run status: stopped" in log and f"requeueing job {job_id} (restart 1)" in log
    assert f"job {job_id} (kinoe-train) restart 0" in log
    assert f"job {job_id} (kinoe-train) restart 1" in log
    assert log.count("run status: complete") == 1
    # Every step exactly once across the two runs of the job, and the run is complete.
    assert [record["step"] for record in metrics(config)] == list(range(1, steps + 1))
    manifest = read_manifest(run_dir(config))
    assert manifest.status == "complete" and manifest.summary["steps"] == steps
    # Per-rank output of both runs, beside the job log.
    for restart in (0, 1):
        ranks = list((log_dir / f"kinoe-train-{job_id}" / f"restart{restart}").rglob("stderr.log"))
        assert len(ranks) == 1, restart
        assert "kinoe.pretrain: pretrain: running in" in ranks[0].read_text()


@pytest.mark.slow
def test_failing_training_fails_the_job_without_requeue(
    slurm_cluster, pretrain_shards, tmp_path, monkeypatch
):
    job_environment(monkeypatch, slurm_cluster)
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, pretrain_shards, "broken")
    log_dir = tmp_path / "slurm-logs"
    job_id = submit(
        TRAIN_SCRIPT, ["pretrain", str(config), "train.stepz=3"], cpu_job(), log_dir=log_dir
    )

    assert slurm_cluster.wait(job_id, timeout=90) == "FAILED", job_log(log_dir, job_id)
    record = slurm_cluster.jobs(job_id)[0]
    assert (record["Restarts"], record["ExitCode"]) == ("0", "1:0")
    log = job_log(log_dir, job_id)
    assert "config error in" in log and "unknown key 'train.stepz'" in log
    assert "the run did not complete" in log and "requeueing" not in log
