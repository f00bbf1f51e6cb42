"""The local SLURM cluster runs real batch jobs: plain, array, with a dependency, failing."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    path.chmod(0o755)
    return path


def job_output(path: Path) -> str:
    return path.read_text() if path.exists() else f"({path} missing)"


def test_batch_job_completes_and_writes_its_id_and_host(slurm_cluster, tmp_path):
    result = tmp_path / "result.txt"
    script = write_script(
        tmp_path / "job.sh",
        f'echo "$SLURM_JOB_ID $(hostname) $SLURMD_NODENAME" > {result}\n'
        # A job step, as datatrove's launch scripts start one (srun -n 1 ...).
        f"srun -n 1 hostname >> {result}\n",
    )
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(script, f"--output={log}", "--time=5")

    assert slurm_cluster.wait(job_id, timeout=30) == "COMPLETED", job_output(log)
    first, step = result.read_text().splitlines()
    assert first.split() == [job_id, socket.gethostname(), slurm_cluster.node_name]
    assert step == socket.gethostname()
    assert slurm_cluster.jobs(job_id)[0]["ExitCode"] == "0:0"


def test_array_job_runs_every_task(slurm_cluster, tmp_path):
    out = tmp_path / "tasks"
    out.mkdir()
    script = write_script(
        tmp_path / "array.sh",
        f'echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_JOB_ID" > {out}/task_$SLURM_ARRAY_TASK_ID.txt\n',
    )
    job_id = slurm_cluster.submit(script, "--array=0-2", f"--output={tmp_path}/array_%A_%a.out")

    assert slurm_cluster.wait(job_id, timeout=30) == "COMPLETED"
    assert slurm_cluster.states(job_id) == {f"{job_id}_{task}": "COMPLETED" for task in range(3)}
    assert sorted(path.name for path in out.iterdir()) == [f"task_{i}.txt" for i in range(3)]
    for task in range(3):
        assert (out / f"task_{task}.txt").read_text().split() == [str(task), job_id]


def test_dependent_job_runs_after_its_parent(slurm_cluster, tmp_path):
    parent_done = tmp_path / "parent.done"
    child_saw = tmp_path / "child.txt"
    parent = write_script(tmp_path / "parent.sh", f"sleep 3\ntouch {parent_done}\n")
    child = write_script(
        tmp_path / "child.sh",
        f"if [ -e {parent_done} ]; then echo after > {child_saw}; else echo before > {child_saw}; fi\n",
    )
    parent_id = slurm_cluster.submit(parent, f"--output={tmp_path}/parent.out")
    child_id = slurm_cluster.submit(
        child, f"--dependency=afterok:{parent_id}", f"--output={tmp_path}/child.out"
    )

    waiting = slurm_cluster.jobs(child_id)[0]
    assert (waiting["JobState"], waiting["Reason"]) == ("PENDING", "Dependency")
    assert slurm_cluster.wait(child_id, timeout=40) == "COMPLETED"
    assert slurm_cluster.state(parent_id) == "COMPLETED"
    assert child_saw.read_text().strip() == "after"
    parent_end = slurm_cluster.jobs(parent_id)[0]["EndTime"]
    assert slurm_cluster.jobs(child_id)[0]["StartTime"] >= parent_end  # ISO timestamps


def test_failing_job_is_failed_and_its_dependent_cancelled(slurm_cluster, tmp_path):
    failing = write_script(tmp_path / "fail.sh", "echo about to fail\nexit 3\n")
    never = write_script(tmp_path / "never.sh", f"touch {tmp_path}/never.ran\n")
    job_id = slurm_cluster.submit(failing, f"--output={tmp_path}/fail.out")
    dependent_id = slurm_cluster.submit(
        never, f"--dependency=afterok:{job_id}", f"--output={tmp_path}/never.out"
    )

    assert slurm_cluster.wait(job_id, timeout=30) == "FAILED"
    assert slurm_cluster.jobs(job_id)[0]["ExitCode"] == "3:0"
    assert (tmp_path / "fail.out").read_text().strip() == "about to fail"
    # DependencyParameters=kill_invalid_depend: cancelled rather than pending forever.
    assert slurm_cluster.wait(dependent_id, timeout=30) == "CANCELLED"
    assert slurm_cluster.jobs(dependent_id)[0]["Reason"] == "DependencyNeverSatisfied"
    assert not (tmp_path / "never.ran").exists()
