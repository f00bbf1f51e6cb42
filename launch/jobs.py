"""SLURM jobs for training and evaluation: what a job asks for, submitting it, and how it ended.

``SlurmJob`` is a job's resources as a typed config section (partition, nodes, GPUs, time...),
so they live in config files rather than in long ``sbatch`` flag lists. ``submit`` hands one of
the scripts in ``launch/slurm/`` to ``sbatch --parsable`` and returns the job id, which a later
job can wait for (``dependency``). ``run_status`` reads a stage's run manifest; train.sbatch asks
it (``python -m launch.jobs status COMMAND CONFIG [key=value ...]``) after the trainers exit, to
requeue only a run that saved a checkpoint and stopped; stage.sbatch asks ``python -m launch.jobs
wait ...`` (``wait_for_run``) to stay until the SLURM arrays of a datatrove stage completed its
run. ``queued_jobs`` asks squeue which jobs are still there (``kinoe pipeline`` asks it too, before
submitting again). docs/cluster.md describes the scripts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from common.config import Config
from common.errors import KinoeError
from common.manifest import read_manifest
from common.run import Stage, load_stage_config, run_directory

#: The batch scripts: ``train.sbatch`` (kinoe pretrain / finetune on N nodes), ``eval.sbatch``.
SCRIPTS_DIR = Path(__file__).resolve().parent / "slurm"
TRAIN_SCRIPT = SCRIPTS_DIR / "train.sbatch"
EVAL_SCRIPT = SCRIPTS_DIR / "eval.sbatch"

# SLURM's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEMORY = re.compile(r"^\d+[KMGT]?$")
# Options SlurmJob sets from its own fields; naming them again in sbatch_args would be ambiguous.
_OWN_OPTIONS = frozenset(
    {
        "job-name",
        "partition",
        "account",
        "qos",
        "nodes",
        "gpus-per-node",
        "cpus-per-task",
        "mem",
        "time",
        "signal",
        "exclusive",
        "output",
        "error",
        "dependency",
        "export",
    }
)


def time_limit_seconds(limit: str) -> int:
    """Seconds in a SLURM time limit (``90``, ``4:00:00``, ``2-00:00:00``)."""
    match = _TIME.match(limit.strip())
    if match is None:
        raise ValueError(
            f"time {limit!r} is not a SLURM time limit; write minutes, HH:MM:SS or D-HH:MM:SS"
        )
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if third is not None:  # HH:MM:SS
        return (int(first) * 60 + int(second)) * 60 + int(third)
    if second is not None:  # MM:SS
        return int(first) * 60 + int(second)
    return int(first) * 60  # minutes


class SlurmJob(Config):
    """What one SLURM job asks for; each field becomes an sbatch option (docs/cluster.md)."""

    job_name: str | None = Field(
        None, description="Job name (squeue, log file names); none: the script's (kinoe-train)"
    )
    partition: str | None = Field(None, description="Partition; none: the cluster's default")
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int | None = Field(
        None,
        ge=0,
        description="GPUs per node, one trainer each; none: the script's (train.sbatch 8, "
        "eval.sbatch 1); 0: CPU only",
    )
    cpus_per_task: int | None = Field(
        None, ge=1, description="CPUs per node (one task per node); none: the cluster's default"
    )
    mem: str | None = Field(None, description="Memory per node: '512G', or '0' for all of it")
    time: str = Field("24:00:00", description="Time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    signal_seconds: int = Field(
        600,
        ge=1,
        description="Seconds before the time limit that train.sbatch asks the trainers to "
        "checkpoint and stop (SIGUSR1), then requeues; eval.sbatch ignores it",
    )
    max_requeues: int = Field(
        50, ge=0, description="How often train.sbatch requeues itself before failing instead"
    )
    exclusive: bool = Field(False, description="Whole nodes, shared with no other job")
    conda_env: str | None = Field(
        None,
        description="Conda environment (name or prefix) the job activates; none: "
        "$KINOE_CONDA_ENV, else the submitting environment (launch/slurm/env.sh)",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for the job, e.g. NCCL_SOCKET_IFNAME",
    )
    sbatch_args: dict[str, str] = Field(
        default_factory=dict,
        description="Other sbatch options without their dashes ('constraint': 'h100'); "
        "an empty value gives a bare flag",
    )

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        time_limit_seconds(value)
        return value.strip()

    @field_validator("mem")
    @classmethod
    def _slurm_memory(cls, value: str | None) -> str | None:
        if value is not None and not _MEMORY.match(value):
            raise ValueError(f"mem {value!r} must be a number with an optional K/M/G/T suffix")
        return value

    @field_validator("sbatch_args")
    @classmethod
    def _not_own_options(cls, value: dict[str, str]) -> dict[str, str]:
        clashes = sorted(key.lstrip("-") for key in value if key.lstrip("-") in _OWN_OPTIONS)
        if clashes:
            raise ValueError(
                f"sbatch_args {clashes} are fields of the job; set them there "
                f"({', '.join(key.replace('-', '_') for key in clashes)})"
            )
        return value

    @model_validator(mode="after")
    def _signal_inside_time(self) -> SlurmJob:
        limit = time_limit_seconds(self.time)
        if self.signal_seconds >= limit:
            raise ValueError(
                f"signal_seconds ({self.signal_seconds}) must be less than the time limit "
                f"{self.time} ({limit} s); lower it"
            )
        return self

    def sbatch_options(self) -> list[str]:
        """This job's resources as sbatch options."""
        options = [f"--nodes={self.nodes}", f"--time={self.time}"]
        for name, value in (
            ("job-name", self.job_name),
            ("gpus-per-node", self.gpus_per_node),
            ("partition", self.partition),
            ("account", self.account),
            ("qos", self.qos),
            ("cpus-per-task", self.cpus_per_task),
            ("mem", self.mem),
        ):
            if value is not None:
                options.append(f"--{name}={value}")
        # B: only the batch shell gets it; train.sbatch forwards it to the trainers. Always
        # given: the scripts' own #SBATCH --signal could not be taken back by leaving it out.
        options.append(f"--signal=B:USR1@{self.signal_seconds}")
        if self.exclusive:
            options.append("--exclusive")
        for key, value in self.sbatch_args.items():
            key = key.lstrip("-")
            options.append(f"--{key}={value}" if value != "" else f"--{key}")
        return options

    def job_environment(self) -> dict[str, str]:
        """Variables the scripts in launch/slurm/ read, plus ``env``."""
        variables = {"KINOE_MAX_REQUEUES": str(self.max_requeues), **self.env}
        if self.conda_env:
            variables["KINOE_CONDA_ENV"] = self.conda_env
        return variables


def sbatch_command(
    script: Path | str,
    args: Sequence[str],
    job: SlurmJob,
    dependency: Sequence[str] = (),
    log_dir: Path | str = Path("runs/slurm"),
) -> list[str]:
    """The ``sbatch`` command line ``submit`` runs."""
    log_dir = Path(log_dir).absolute()
    command = ["sbatch", "--parsable", *job.sbatch_options()]
    # append: a requeued job keeps its id, so its log file goes on instead of starting over.
    command += [f"--output={log_dir}/%x-%j.out", "--open-mode=append", "--export=ALL"]
    if dependency:
        # A job whose dependency failed is cancelled rather than left pending forever.
        command += [f"--dependency=afterok:{':'.join(dependency)}", "--kill-on-invalid-dep=yes"]
    return [*command, str(_script_path(script)), *args]


def submit(
    script: Path | str,
    args: Sequence[str],
    job: SlurmJob,
    dependency: Sequence[str] = (),
    log_dir: Path | str = Path("runs/slurm"),
) -> str:
    """Submit ``script args`` (a launch/slurm/ name or a path) with ``job``'s resources; its id.

    The job starts in the current directory, where relative config paths resolve. It runs after
    every job in ``dependency`` completed successfully; its log is ``log_dir/<name>-<id>.out``.
    """
    if shutil.which("sbatch") is None:
        raise KinoeError(
            "sbatch is not on PATH; submit from a SLURM login node (or install slurm-client)"
        )
    command = sbatch_command(script, args, job, dependency, log_dir)
    Path(log_dir).mkdir(parents=True, exist_ok=True)  # SLURM does not create it
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, **job.job_environment()},
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise KinoeError(
            "sbatch did not answer within 120 s; check the controller with 'scontrol ping'"
        ) from None
    if result.returncode != 0:
        reason = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise KinoeError(
            f"sbatch refused {Path(script).name} (exit code {result.returncode}): {reason}; "
            "fix the job's slurm settings (partition, account, resources) and submit again"
        )
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise KinoeError(
            f"sbatch printed no job id for {Path(script).name} ({result.stdout.strip()!r}); "
            "check 'squeue --me' before submitting again"
        )
    return job_id


def _script_path(script: Path | str) -> Path:
    path = Path(script)
    if not path.is_file() and (SCRIPTS_DIR / path).is_file():
        path = SCRIPTS_DIR / path
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in SCRIPTS_DIR.glob("*.sbatch")))
        raise KinoeError(f"batch script {script} not found; use one of {known} or a path")
    return path.resolve()


def stage_of(command: str) -> Stage:
    """The stage behind a kinoe command: ``pretrain``, or a step such as ``finetune sft``."""
    from launch.cli import COMMANDS

    words = command.split()
    if not words or words[0] not in COMMANDS or len(words) > 2:
        raise KinoeError(
            f"{command!r} is not a kinoe command; use one of {', '.join(COMMANDS)} "
            "(a step in the same word: 'finetune sft')"
        )
    module = importlib.import_module(COMMANDS[words[0]][0])
    if len(words) == 1 and isinstance(getattr(module, "STAGE", None), Stage):
        return module.STAGE
    if len(words) == 2:
        # Stages of several steps keep them in a dict by step name (tokenizer.cli.STEPS).
        for value in vars(module).values():
            if isinstance(value, dict) and isinstance(value.get(words[1]), Stage):
                return value[words[1]]
    raise KinoeError(
        f"'kinoe {command}' is not a stage with a run directory; train.sbatch runs stage "
        "commands such as 'pretrain' or 'finetune sft'"
    )


def run_directory_of(command: str, config: Path | str, overrides: Sequence[str] = ()) -> Path:
    """The run directory ``kinoe COMMAND -c CONFIG overrides`` writes."""
    stage = stage_of(command)
    loaded = load_stage_config(stage.config_type, config, overrides)
    return run_directory(stage.name, loaded, stage.step)


def run_status(command: str, config: Path | str, overrides: Sequence[str] = ()) -> str | None:
    """The status in the manifest of the run ``kinoe COMMAND -c CONFIG overrides`` writes
    (running, complete, failed, stopped, submitted), or None before it wrote one."""
    manifest = read_manifest(run_directory_of(command, config, overrides))
    return manifest.status if manifest is not None else None


def queued_jobs(job_ids: set[str]) -> set[str] | None:
    """Which of ``job_ids`` (or of their array tasks) are still queued or running; None when
    squeue cannot answer."""
    if shutil.which("squeue") is None:
        return None
    try:
        listing = subprocess.run(
            ["squeue", "--me", "--noheader", "--format=%i"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    if listing.returncode != 0:
        return None
    active = {entry.split("_")[0] for entry in listing.stdout.split()}
    return job_ids & active


def wait_for_run(
    command: str,
    config: str,
    overrides: Sequence[str] = (),
    poll_s: float = 60.0,
    queued: Callable[[set[str]], set[str] | None] = queued_jobs,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Wait until the run ``kinoe COMMAND -c CONFIG`` writes is no longer submitted or running.

    For stages that hand their work to SLURM arrays (``kinoe data``, ``tokenizer encode`` with
    ``executor.kind: slurm``): their last job completes the manifest. 0 once it is complete;
    1 when it failed, or when its jobs all left the queue without completing it.
    """
    run_dir = run_directory_of(command, config, overrides)
    jobs: set[str] = set()
    announced = None
    gone_before = False
    while True:
        manifest = read_manifest(run_dir)
        status = manifest.status if manifest is not None else "none"
        if status == "complete":
            print(f"kinoe stage: {run_dir} is complete", flush=True)
            return 0
        if status not in ("submitted", "running"):
            print(f"kinoe stage: {run_dir} did not complete (status {status})", flush=True)
            return 1
        if status == "submitted":
            jobs |= {str(job) for job in manifest.summary.get("jobs", [])}
        if announced != status:
            print(
                f"kinoe stage: {run_dir} is {status}; waiting for jobs {', '.join(sorted(jobs)) or '(none named)'} "
                "(until this job's time limit)",
                flush=True,
            )
            announced = status
        active = queued(jobs) if jobs else None
        if active is not None and not active:
            if gone_before:  # read twice: the last job may have completed it in between
                print(
                    f"kinoe stage: the jobs of {run_dir} ({', '.join(sorted(jobs))}) left the queue "
                    f"without completing it (status {status}); see their logs under {run_dir}",
                    flush=True,
                )
                return 1
            gone_before = True
        else:
            gone_before = False
        sleep(poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    """What the batch scripts ask, ``python -m launch.jobs ACTION COMMAND CONFIG [key=value ...]``:

    ``status`` prints the run's manifest status (train.sbatch, after the trainers exit);
    ``wait`` waits while the run is submitted or running (stage.sbatch, for datatrove arrays).
    """
    parser = argparse.ArgumentParser(prog="python -m launch.jobs")
    actions = parser.add_subparsers(dest="action", required=True)
    for name, help_line in (
        ("status", "print the run's manifest status, or 'none'"),
        ("wait", "wait while the run is submitted or running; 0 once it is complete"),
    ):
        action = actions.add_parser(name, help=help_line)
        action.add_argument("command", help="the kinoe command, e.g. pretrain or 'finetune sft'")
        action.add_argument("config")
        action.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        if args.action == "wait":
            poll_s = float(os.environ.get("KINOE_STAGE_POLL_SECONDS", "60"))
            return wait_for_run(args.command, args.config, args.overrides, poll_s=poll_s)
        print(run_status(args.command, args.config, args.overrides) or "none")
    except KinoeError as error:
        print(f"launch.jobs: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
