"""``kinoe pipeline``: every stage in order, here or as dependent SLURM jobs, complete steps skipped.

    kinoe pipeline -c configs/pipeline/quickstart.yaml [key=value ...] [--from NAME] [--to NAME] [--dry-run]

Each step is one kinoe stage command with its own config (``launch/pipeline_config.py``). Before
anything runs, every step's config is loaded and the plan is made: a step whose run directory
holds a complete run for the same config and inputs is skipped without starting a process (the
decision ``run_stage`` would make, made with its own helpers); a step that ``run_stage`` would
refuse (a different config for an existing run, an input nothing in the plan makes) stops the
pipeline before the first step starts. Then, in local mode, the steps run one after the other
as ``kinoe`` subprocesses (``torchrun --standalone`` for ``processes`` > 1), their output on the
console and in the pipeline's ``logs/<step>.log``; the first failure stops the pipeline with one
line naming the step, its log and how to rerun it. In SLURM mode each step that is not skipped
is submitted at once, depending (``afterok``) on the step submitted before it: training through
``train.sbatch``, evaluation through ``eval.sbatch``, everything else through ``stage.sbatch``.

The pipeline is a stage itself, with the run directory ``<run.root>/pipeline/<run.name>/``
(manifest: what each step did, job ids; ``logs/``; ``slurm/`` job logs; ``history/`` the
manifests of earlier invocations). Unlike other stages it runs again every time it is called:
the steps keep their own books, so its manifest records an invocation, not a result.
docs/cluster.md ("kinoe pipeline") has the why of each choice.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.command import add_config_arguments
from common.errors import ConfigError, KinoeError
from common.manifest import MANIFEST_NAME, read_manifest, write_manifest

# common.run.decide is the decision run_stage makes before running a body (skip a complete run,
# refuse a different one, fail on a missing input), made here before starting a process.
from common.run import (
    BOOKKEEPING,
    LOGS_DIR,
    Decision,
    Stage,
    StageConfig,
    StageContext,
    Submitted,
    decide,
    load_stage_config,
    run_directory,
    run_stage,
)
from launch.jobs import (
    EVAL_SCRIPT,
    SCRIPTS_DIR,
    TRAIN_SCRIPT,
    SlurmJob,
    run_directory_of,
    stage_of,
    submit,
)
from launch.pipeline_config import PipelineConfig, PipelineStep

STAGE_SCRIPT = SCRIPTS_DIR / "stage.sbatch"
#: Commands that train on GPUs and checkpoint, submitted through train.sbatch.
TRAINING_COMMANDS = frozenset({"pretrain", "finetune sft", "finetune dpo"})
HISTORY_DIR = "history"
SLURM_LOGS_DIR = "slurm"


# ---------------------------------------------------------------- steps and the plan


@dataclass
class Step:
    """A step of the pipeline with its stage, its loaded config and its run directory."""

    spec: PipelineStep
    stage: Stage
    config: StageConfig
    run_dir: Path
    job: SlurmJob

    @property
    def name(self) -> str:
        return self.spec.name

    def command_line(self) -> str:
        """The step as one would type it by hand."""
        words = self.spec.argv()
        if self.spec.processes > 1:
            launcher = ["torchrun", "--standalone", f"--nproc-per-node={self.spec.processes}"]
            return shlex.join([*launcher, "-m", "launch.cli", *words])
        return shlex.join(["kinoe", *words])

    def process_argv(self) -> list[str]:
        """The step's process: this interpreter's kinoe, under torchrun for several processes."""
        kinoe = [sys.executable, "-m", "launch.cli", *self.spec.argv()]
        if self.spec.processes > 1:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            return [*torchrun, f"--nproc-per-node={self.spec.processes}", *kinoe[1:]]
        return kinoe

    def batch_script(self) -> tuple[Path, list[str]]:
        """Which script in launch/slurm/ runs this step, and its arguments."""
        config_and_overrides = [self.spec.config, *self.spec.overrides]
        if self.stage.label in TRAINING_COMMANDS:
            return TRAIN_SCRIPT, [self.stage.label, *config_and_overrides]
        if self.stage.name == "eval":
            return EVAL_SCRIPT, [self.stage.step, *config_and_overrides]
        return STAGE_SCRIPT, [self.stage.label, *config_and_overrides]

    def inputs(self) -> list[Path]:
        """The paths the stage reads (empty when its config cannot name them yet)."""
        try:
            return [Path(path) for path in self.stage.inputs(self.config).values()]
        except KinoeError:
            return []


def resolve_steps(config: PipelineConfig) -> list[Step]:
    """Load every step's config (errors name the step) and find its run directory."""
    steps: list[Step] = []
    for spec in config.steps:
        stage = stage_of(spec.command)
        try:
            loaded = load_stage_config(stage.config_type, spec.config, spec.overrides)
        except ConfigError as error:
            lines = [f"step {spec.name}: {line}" for line in str(error).splitlines()]
            raise ConfigError("\n".join(lines)) from None
        run_dir = run_directory(stage.name, loaded, stage.step)
        steps.append(Step(spec, stage, loaded, run_dir, config.job_of(spec)))
    writers: dict[Path, str] = {}
    for step in steps:
        other = writers.setdefault(step.run_dir.resolve(), step.name)
        if other != step.name:
            raise ConfigError(
                f"steps {other} and {step.name} both write {step.run_dir}; "
                f"add run.name=<another name> to the overrides of {step.name}"
            )
    return steps


def _config_changed(step: Step) -> Decision | None:
    """A refusal when the step's run directory holds a run of a different config (whatever its
    inputs turn out to be, run_stage would refuse it)."""
    decision = decide(step.stage, step.config, hash_inputs=False)
    return decision if decision.action == "refuse" else None


def _reads_from(step: Step, run_dir: Path) -> bool:
    """Whether ``step`` reads anything inside ``run_dir`` (or all of it)."""
    run_dir = run_dir.resolve()
    for path in step.inputs():
        path = path.resolve()
        if path.is_relative_to(run_dir) or run_dir.is_relative_to(path):
            return True
    return False


def plan(steps: Sequence[Step], mode: str) -> list[Decision]:
    """The decision for each step, before any runs.

    A step that reads the output of a step that will run is run too (its inputs are not there
    yet, or will change); otherwise it is decided as run_stage would now.
    """
    decisions: list[Decision] = []
    will_run: list[Step] = []
    for step in steps:
        producers = [earlier.name for earlier in will_run if _reads_from(step, earlier.run_dir)]
        if producers:
            decision = _config_changed(step) or Decision("run", f"needs {', '.join(producers)}")
        else:
            decision = decide(step.stage, step.config)
            if decision.missing_input:
                decision = Decision("refuse", f"{decision.reason} (no earlier step here makes it)")
        executor = getattr(step.config, "executor", None)
        if (
            mode == "local"
            and decision.action == "run"
            and getattr(executor, "kind", None) == "slurm"
        ):
            decision = Decision(
                "refuse",
                "its config submits SLURM array jobs (executor.kind: slurm), which a local "
                "pipeline cannot wait for; add executor.kind=local to the step's overrides, "
                "or run the pipeline with mode=slurm",
            )
        if decision.action == "run":
            will_run.append(step)
        decisions.append(decision)
    return decisions


def _refusal(step: Step, decision: Decision) -> KinoeError:
    return KinoeError(
        f"step {step.name}: {decision.reason} (the step by hand: {step.command_line()})"
    )


# ---------------------------------------------------------------- local mode


def run_steps_locally(
    context: StageContext[PipelineConfig], steps: Sequence[Step], rows: dict[str, dict]
) -> dict[str, Any]:
    """Run the steps here, one after the other; stop at the first failure."""
    logger = context.logger
    for number, step in enumerate(steps, 1):
        where = f"{number}/{len(steps)} {step.name}"
        row = rows.setdefault(step.name, _row(step))
        # Decided again now: the steps before may have just made (or changed) its inputs.
        decision = decide(step.stage, step.config)
        if decision.action == "refuse":
            row["status"] = "refused"
            raise _with_summary(_refusal(step, decision), rows)
        if decision.action == "skip":
            logger.info("pipeline %s: skipped (complete) in %s", where, step.run_dir)
            row["status"] = "skipped"
            continue
        log = context.run_dir / LOGS_DIR / f"{step.name}.log"
        logger.info(
            "pipeline %s: %s  (%s; output also in %s)",
            where,
            step.command_line(),
            decision.reason,
            log,
        )
        started = time.monotonic()
        code = _run_streaming(step, log)
        row.update(status="ran", duration_s=round(time.monotonic() - started, 1), log=str(log))
        if code != 0:
            row["status"] = "failed"
            error = KinoeError(
                f"step {step.name} ({step.stage.label}) failed with exit code {code}; its output is "
                f"in {log}; after fixing it run the step alone with `{step.command_line()}`, "
                f"or the pipeline from there with --from {step.name}"
            )
            raise _with_summary(error, rows)
        # plan() refuses the configs known to submit (executor.kind: slurm); this catches any
        # stage that handed its work to a scheduler all the same, before a later step reads
        # output that is not there yet.
        manifest = read_manifest(step.run_dir)
        if manifest is not None and manifest.status == "submitted":
            row["status"] = "submitted"
            error = KinoeError(
                f"step {step.name} submitted SLURM jobs ({', '.join(manifest.summary.get('jobs', []))}) "
                "instead of running here; a local pipeline cannot wait for them: run the pipeline "
                "with mode=slurm, or add executor.kind=local to the step's overrides"
            )
            raise _with_summary(error, rows)
        logger.info("pipeline %s: done in %.1f s", where, row["duration_s"])
    return {"mode": "local", "steps": rows}


def _run_streaming(step: Step, log: Path) -> int:
    """Run the step's process; its output goes to the console and to ``log``; its exit code."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if step.spec.processes > 1 and "OMP_NUM_THREADS" not in environment:
        # torchrun would set 1 thread per process; share this machine's cores instead.
        threads = max(1, (os.cpu_count() or 1) // step.spec.processes)
        environment["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        out.write(f"$ {step.command_line()}\n")
        out.flush()
        process = subprocess.Popen(
            step.process_argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment,
            text=True,
            errors="replace",
            bufsize=1,
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                out.write(line)
        except BaseException:
            # Ctrl-C reached the step too (same process group): let it save and exit first.
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        return process.wait()


def _with_summary(error: KinoeError, rows: dict[str, dict]) -> KinoeError:
    # run_stage keeps an error's summary in the failed manifest.
    error.summary = {"steps": rows}  # type: ignore[attr-defined]
    return error


def _row(step: Step) -> dict[str, Any]:
    return {"command": step.command_line(), "run_dir": str(step.run_dir), "status": "pending"}


# ---------------------------------------------------------------- SLURM mode


def submit_steps(
    context: StageContext[PipelineConfig],
    steps: Sequence[Step],
    decisions: Sequence[Decision],
    rows: dict[str, dict],
) -> Submitted:
    """Submit every step not skipped, each after the one submitted before it."""
    log_dir = context.run_dir / SLURM_LOGS_DIR
    submitted: list[str] = []
    for step, decision in zip(steps, decisions, strict=True):
        row = rows.setdefault(step.name, _row(step))
        if decision.action == "skip":
            row["status"] = "skipped"
            continue
        job = _named_job(step, context.config.run.name)
        script, args = step.batch_script()
        try:
            job_id = submit(script, args, job, submitted[-1:], log_dir)
        except KinoeError as error:
            cancelled = _cancel(submitted)
            raise _with_summary(KinoeError(f"step {step.name}: {error}{cancelled}"), rows) from None
        row.update(
            status="submitted",
            job=job_id,
            after=submitted[-1] if submitted else None,
            script=script.name,
            log=str(log_dir / f"{job.job_name}-{job_id}.out"),
        )
        submitted.append(job_id)
        context.logger.info("pipeline: %s submitted as job %s (%s)", step.name, job_id, script.name)
    if not submitted:
        return Submitted(jobs=[], note="every step was complete; nothing submitted")
    return Submitted(
        jobs=submitted,
        note=f"job {submitted[-1]} is the last; watch with squeue --me, logs in {log_dir}",
    )


def _named_job(step: Step, pipeline: str) -> SlurmJob:
    if step.job.job_name:
        return step.job
    return step.job.model_copy(update={"job_name": f"kinoe-{pipeline}-{step.name}"})


def _cancel(job_ids: Sequence[str]) -> str:
    """Cancel the jobs this invocation already submitted, so nothing runs half a pipeline."""
    if not job_ids:
        return ""
    result = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return f"; cancelled the steps submitted before it (jobs {', '.join(job_ids)})"
    return f"; the steps submitted before it are still queued: scancel {' '.join(job_ids)}"


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


def _refuse_if_still_queued(run_dir: Path) -> None:
    """Refuse to start while jobs the previous invocation submitted are still in the queue:
    they would run the same steps a second time."""
    previous = read_manifest(run_dir)
    if previous is None or previous.status != "submitted":
        return
    jobs = {str(job) for job in previous.summary.get("jobs", [])}
    queued = queued_jobs(jobs) if jobs else None
    if queued:
        raise KinoeError(
            f"jobs {', '.join(sorted(queued, key=int))} that the previous `kinoe pipeline` of "
            f"{run_dir} submitted are still queued or running; wait for them (squeue --me) or "
            "scancel them before running the pipeline again"
        )


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


# ---------------------------------------------------------------- reporting


def describe_plan(
    config: PipelineConfig, steps: Sequence[Step], decisions: Sequence[Decision], total: int
) -> str:
    """The plan as text: what runs, is skipped or submitted, and why."""
    lines = [f"pipeline {config.run.name} ({config.mode}): {len(steps)} of {total} steps"]
    width = max(len(step.name) for step in steps)
    previous_job = None
    for step, decision in zip(steps, decisions, strict=True):
        if decision.action == "skip":
            what = f"skip ({decision.reason})"
        elif decision.action == "refuse":
            what = f"REFUSE: {decision.reason}"
        elif config.mode == "slurm":
            script, _ = step.batch_script()
            job = step.job
            gpus = "script default" if job.gpus_per_node is None else job.gpus_per_node
            after = f", after {previous_job}" if previous_job else ""
            what = (
                f"submit {script.name} ({job.nodes} node(s), GPUs per node {gpus}, "
                f"time {job.time}{after}; {decision.reason})"
            )
            previous_job = step.name
        else:
            what = f"run ({decision.reason})"
        lines.append(f"  {step.name:<{width}}  {what}")
        lines.append(f"  {'':<{width}}    $ {step.command_line()}")
        lines.append(f"  {'':<{width}}    run directory {step.run_dir}")
    return "\n".join(lines)


def describe_submission(rows: dict[str, dict]) -> str:
    """Step, job id or skipped, log file."""
    width = max(len(name) for name in rows)
    lines = [f"  {'step':<{width}}  {'job':<9}  log"]
    for name, row in rows.items():
        job = row.get("job") or row["status"]
        lines.append(f"  {name:<{width}}  {job:<9}  {row.get('log', row['run_dir'])}")
    return "\n".join(lines)


def describe_artifacts(steps: Sequence[Step]) -> str:
    """Where each step's outputs are: its run directory, what is in it, its report."""
    width = max(len(step.name) for step in steps)
    lines = []
    for step in steps:
        run_dir = step.run_dir
        if not run_dir.is_dir():
            lines.append(f"  {step.name:<{width}}  {run_dir}  (missing)")
            continue
        entries = sorted(
            (path for path in run_dir.iterdir() if path.name not in BOOKKEEPING),
            key=lambda path: (not path.is_dir(), path.name),
        )
        names = [path.name + ("/" if path.is_dir() else "") for path in entries]
        shown = " ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
        lines.append(f"  {step.name:<{width}}  {run_dir}  {shown}")
        for report in (run_dir / "report.md", run_dir / "report" / "report.md"):
            if report.is_file():
                lines.append(f"  {'':<{width}}  report: {report}")
                break
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--from", dest="from_step", metavar="NAME", help="start at this step")
    parser.add_argument("--to", dest="to_step", metavar="NAME", help="stop after this step")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would run, be skipped or be submitted, and do nothing",
    )
    parser.epilog = (
        "e.g. kinoe pipeline -c configs/pipeline/quickstart.yaml --from pretrain --dry-run. "
        "Docs: docs/cluster.md (kinoe pipeline)"
    )


def main(args: argparse.Namespace) -> int:
    config = load_stage_config(PipelineConfig, args.config, args.overrides)
    first = config.index_of(args.from_step, "--from") if args.from_step else 0
    last = config.index_of(args.to_step, "--to") if args.to_step else len(config.steps) - 1
    if first > last:
        raise KinoeError(
            f"--from {args.from_step} comes after --to {args.to_step} in this pipeline; swap them"
        )
    steps = resolve_steps(config)[first : last + 1]
    decisions = plan(steps, config.mode)
    if args.dry_run:
        print(describe_plan(config, steps, decisions, len(config.steps)), flush=True)
    refused = [(s, d) for s, d in zip(steps, decisions, strict=True) if d.action == "refuse"]
    if refused:
        raise _refusal(*refused[0])
    if args.dry_run:
        return 0

    pipeline_dir = run_directory("pipeline", config)
    _refuse_if_still_queued(pipeline_dir)
    _archive_previous(pipeline_dir)
    rows: dict[str, dict] = {step.name: _row(step) for step in steps}

    def body(context: StageContext[PipelineConfig]) -> dict[str, Any] | Submitted:
        if config.mode == "slurm":
            return submit_steps(context, steps, decisions, rows)
        return run_steps_locally(context, steps, rows)

    stage = Stage(
        "pipeline",
        PipelineConfig,
        body,
        inputs=lambda c: {f"steps.{i}.config": Path(s.config) for i, s in enumerate(c.steps)},
    )
    command = ["kinoe", "pipeline", "-c", str(args.config), *args.overrides]
    command += [f"--from={args.from_step}"] if args.from_step else []
    command += [f"--to={args.to_step}"] if args.to_step else []
    started = time.monotonic()
    result = run_stage(stage, config, command=command)
    record = result.run_dir / MANIFEST_NAME
    if result.status == "submitted":
        # run_stage records a submission's job ids; the table per step goes beside them.
        manifest = result.manifest
        manifest.summary = {**manifest.summary, "mode": "slurm", "steps": rows}
        write_manifest(result.run_dir, manifest)
        print(f"pipeline {config.run.name}: submitted to SLURM (record: {record})")
        print(describe_submission(rows))
        return 0
    ran = sum(row["status"] == "ran" for row in rows.values())
    print(
        f"pipeline {config.run.name}: done in {time.monotonic() - started:.0f} s "
        f"({ran} ran, {len(rows) - ran} skipped as complete). Where everything is:"
    )
    print(describe_artifacts(steps))
    print(f"  (this pipeline's record: {record}; each step's output: {result.run_dir / LOGS_DIR})")
    return 0


def _archive_previous(run_dir: Path) -> None:
    """Move the previous invocation's manifest to history/, so this one starts a fresh record.

    The steps keep their own books (skip, refuse, resume); the pipeline's manifest says what one
    invocation did. Left in place, run_stage would skip a rerun of the same pipeline without
    looking at its steps, and refuse one whose steps' config files changed.
    """
    previous = read_manifest(run_dir)
    if previous is None:
        return
    history = run_dir / HISTORY_DIR
    history.mkdir(parents=True, exist_ok=True)
    stamp = previous.started_at.replace(":", "").replace("+", "_")
    os.replace(run_dir / MANIFEST_NAME, history / f"{stamp}-{previous.status}.json")
