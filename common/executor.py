"""Running datatrove pipelines the one kinoe way: local processes, or SLURM array jobs.

A stage describes its work as ``PipelineStage``s (a name, datatrove steps, a task count) and
hands them to ``run_locally`` or ``submit_to_slurm``. On SLURM each stage is an array job
depending on the one before, and a last job reruns the kinoe command with the local executor:
every task is then complete (datatrove skips completed tasks), so that rerun only finishes the
books (report, shard index, manifest). datatrove is imported only when a pipeline runs.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from common.config import Config
from common.errors import KinoeError
from common.progress import Progress


class SlurmSettings(Config):
    """How datatrove submits each step as a SLURM array job."""

    partition: str = Field("", description="SLURM partition; required when executor.kind is slurm")
    time: str = Field("04:00:00", description="Time limit per array task")
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: int = Field(2, ge=1)
    qos: str | None = None
    env_command: str | None = Field(
        None,
        description="Shell line that activates the environment in each job; default puts this "
        "interpreter's bin directory first on PATH",
    )
    sbatch_args: dict[str, str] = Field(default_factory=dict, description="Extra #SBATCH options")


class ExecutorConfig(Config):
    """Where a datatrove pipeline runs: local processes, or SLURM array jobs with dependencies."""

    kind: Literal["local", "slurm"] = "local"
    tasks: int = Field(
        4, ge=1, description="Shards of the per-document steps (one output file each)"
    )
    workers: int = Field(
        -1, description="Local processes at once (-1: one per task, at most the CPUs)"
    )
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)

    @model_validator(mode="after")
    def _slurm_needs_partition(self) -> ExecutorConfig:
        if self.kind == "slurm" and not self.slurm.partition:
            raise ValueError(
                "executor.kind is slurm but executor.slurm.partition is empty; name a partition"
            )
        return self


@dataclass(frozen=True)
class PipelineStage:
    """One datatrove executor's worth of work: its steps run ``tasks`` times in parallel."""

    name: str
    steps: list[Any]
    tasks: int


def run_locally(
    stages: Sequence[PipelineStage],
    executor: ExecutorConfig,
    logs: Callable[[str], Path],
    logger: logging.Logger,
    label: str,
) -> dict[str, float]:
    """Run the stages one after the other with local processes; seconds per stage."""
    from datatrove.executor import LocalPipelineExecutor

    workers = executor.workers if executor.workers > 0 else (os.cpu_count() or 1)
    timings: dict[str, float] = {}
    for index, stage in enumerate(stages):
        runner = LocalPipelineExecutor(
            stage.steps,
            tasks=stage.tasks,
            workers=min(workers, stage.tasks),
            logging_dir=str(logs(stage.name)),
            skip_completed=True,
        )
        description = f"{label} step {index + 1}/{len(stages)} {stage.name}"
        started = time.monotonic()
        with CompletionWatcher(logs(stage.name) / "completions", stage.tasks, description, logger):
            runner.run()
        timings[stage.name] = round(time.monotonic() - started, 3)
    return timings


def environment_command(executor: ExecutorConfig) -> str:
    """The shell line that makes this environment's python and kinoe the ones a job runs."""
    if executor.slurm.env_command:
        return executor.slurm.env_command
    return f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"


def check_slurm_ready(job_prefix: str) -> None:
    """Refuse to submit without sbatch, without a reachable controller, or while jobs whose
    names start with ``job_prefix`` are queued (submitting again would run every task twice)."""
    if shutil.which("sbatch") is None:
        raise KinoeError(
            "executor.kind is slurm but sbatch is not on PATH; run on a SLURM login node"
        )
    listing = subprocess.run(
        ["squeue", "--noheader", "--me", "--format=%i %j"],
        capture_output=True,
        text=True,
        check=False,
    )
    if listing.returncode != 0:
        reason = (listing.stderr.strip().splitlines() or ["no output"])[-1]
        raise KinoeError(
            f"squeue cannot reach the SLURM controller ({reason}); run on a SLURM login node"
        )
    queued = [
        line.split()[0]
        for line in listing.stdout.splitlines()
        if line.split()[-1].startswith(job_prefix)
    ]
    if queued:
        raise KinoeError(
            f"jobs {', '.join(queued)} of this run ({job_prefix}*) are still queued or running; "
            "wait for them (the last one completes the run) or scancel them before submitting again"
        )


def submit_to_slurm(
    stages: Sequence[PipelineStage],
    executor: ExecutorConfig,
    logs: Callable[[str], Path],
    slurm_logs: Path,
    job_prefix: str,
) -> list[str]:
    """Submit one array job per stage, each depending on the one before; their job ids."""
    from datatrove.executor import SlurmPipelineExecutor

    slurm = executor.slurm
    runners: list[SlurmPipelineExecutor] = []
    for stage in stages:
        runners.append(
            SlurmPipelineExecutor(
                stage.steps,
                tasks=stage.tasks,
                time=slurm.time,
                partition=slurm.partition,
                cpus_per_task=slurm.cpus_per_task,
                mem_per_cpu_gb=slurm.mem_per_cpu_gb,
                job_name=f"{job_prefix}{stage.name}",
                qos=slurm.qos or "",
                env_command=environment_command(executor),
                sbatch_args=dict(slurm.sbatch_args),
                logging_dir=str(logs(stage.name)),
                slurm_logs_folder=str(slurm_logs / stage.name),
                depends=runners[-1] if runners else None,
                skip_completed=True,
            )
        )
    runners[-1].run()  # launches its dependencies first, each as an array job
    return [str(r.job_id) for r in runners if r.job_id not in (None, -1)]


def submit_finishing_job(
    executor: ExecutorConfig,
    job_name: str,
    slurm_logs: Path,
    command: Sequence[str],
    after_job: str | None,
) -> str:
    """Submit the job that reruns ``command`` after ``after_job`` succeeds; its job id."""
    slurm = executor.slurm
    slurm_logs.mkdir(parents=True, exist_ok=True)
    directives = {
        "job-name": job_name,
        "partition": slurm.partition,
        "time": slurm.time,
        "cpus-per-task": "1",
        "mem-per-cpu": f"{slurm.mem_per_cpu_gb}G",
        "output": str(slurm_logs / "finish-%j.out"),
        **({"qos": slurm.qos} if slurm.qos else {}),
        **slurm.sbatch_args,
    }
    lines = ["#!/bin/bash", *(f"#SBATCH --{key}={value}" for key, value in directives.items())]
    lines += ["set -euo pipefail", environment_command(executor), shlex.join(command)]
    script = slurm_logs / "finish.sbatch"
    script.write_text("\n".join(lines) + "\n")
    sbatch = ["sbatch", "--parsable"]
    if after_job:
        sbatch.append(f"--dependency=afterok:{after_job}")
    try:
        result = subprocess.run(
            [*sbatch, str(script)], capture_output=True, text=True, check=True, cwd=Path.cwd()
        )
    except subprocess.CalledProcessError as error:
        raise KinoeError(f"sbatch refused the finishing job: {error.stderr.strip()}") from None
    return result.stdout.strip().split(";")[0]


def kinoe_command(*args: str) -> list[str]:
    """A kinoe command line that runs with this interpreter, wherever PATH points."""
    return [sys.executable, "-m", "launch.cli", *args]


class CompletionWatcher:
    """Logs tasks completed / total with rate and ETA while a local executor runs."""

    def __init__(
        self,
        folder: Path,
        total: int,
        description: str,
        logger: logging.Logger,
        every_s: float = 10.0,
    ):
        self.folder, self.total, self.description = folder, total, description
        self.logger, self.every_s = logger, every_s
        self._stop = threading.Event()

    def _count(self) -> int:
        return sum(1 for _ in self.folder.glob("*")) if self.folder.is_dir() else 0

    def __enter__(self) -> CompletionWatcher:
        self.progress = Progress(
            self.description,
            total=self.total,
            unit="tasks",
            log_every_s=0.0,
            logger=self.logger,
            live=False,
        )
        self.progress.update(self._count())
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            done = self._count()
            if done > self.progress.done:
                self.progress.update(done - self.progress.done)

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.progress.done = max(self.progress.done, self._count())
        self.progress.close()
