"""The plan of ``kinoe pipeline``: each step with its loaded config and run directory, and what
will happen to it (run, skip, refuse) before anything runs.

A step that reads the output of a step that will run is run too; otherwise it is decided by
``common.run.decide``, the decision ``run_stage`` would make, so the two never disagree. Which
batch script a step goes through on SLURM is decided here too, with the step. ``step_row`` and
``with_step_rows`` keep the pipeline's record: one row per step, in its manifest summary.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, KinoeError

# common.run.decide is the decision run_stage makes before running a body (skip a complete run,
# refuse a different one, fail on a missing input), made here before starting a process.
from common.run import Decision, Stage, StageConfig, decide, load_stage_config, run_directory
from launch.jobs import EVAL_SCRIPT, SCRIPTS_DIR, TRAIN_SCRIPT, SlurmJob, stage_of
from launch.pipeline_config import PipelineConfig, PipelineStep

STAGE_SCRIPT = SCRIPTS_DIR / "stage.sbatch"
#: Commands that train on GPUs and checkpoint, submitted through train.sbatch.
TRAINING_COMMANDS = frozenset({"pretrain", "finetune sft", "finetune dpo"})


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


def refusal(step: Step, decision: Decision) -> KinoeError:
    """The one-line error that stops the pipeline at a refused step, with the step by hand."""
    return KinoeError(
        f"step {step.name}: {decision.reason} (the step by hand: {step.command_line()})"
    )


def step_row(step: Step) -> dict[str, Any]:
    """The step's row in the pipeline's manifest, pending until it runs, is skipped or submitted."""
    return {"command": step.command_line(), "run_dir": str(step.run_dir), "status": "pending"}


def with_step_rows(error: KinoeError, rows: dict[str, dict]) -> KinoeError:
    """``error`` carrying the steps' rows so far."""
    # run_stage keeps an error's summary in the failed manifest.
    error.summary = {"steps": rows}  # type: ignore[attr-defined]
    return error
