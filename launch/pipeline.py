"""``kinoe pipeline``: every stage in order, here or as dependent SLURM jobs, complete steps skipped.

    kinoe pipeline -c configs/pipeline/quickstart.yaml [key=value ...] [--from NAME] [--to NAME] [--dry-run]

Each step is one kinoe stage command with its own config (``launch/pipeline_config.py``). Before
anything runs, every step's config is loaded and the plan is made (``launch/pipeline_plan.py``):
a step whose run directory holds a complete run for the same config and inputs is skipped
without starting a process (the decision ``run_stage`` would make, made with its own helpers); a
step that ``run_stage`` would refuse (a different config for an existing run, an input nothing in
the plan makes) stops the pipeline before the first step starts. Then, in local mode
(``launch/pipeline_local.py``), the steps run one after the other as ``kinoe`` subprocesses
(``torchrun --standalone`` for ``processes`` > 1), their output on the console and in the
pipeline's ``logs/<step>.log``; the first failure stops the pipeline with one line naming the
step, its log and how to rerun it. In SLURM mode (``launch/pipeline_slurm.py``) each step that is
not skipped is submitted at once, depending (``afterok``) on the step submitted before it:
training through ``train.sbatch``, evaluation through ``eval.sbatch``, everything else through
``stage.sbatch``. What it prints is in ``launch/pipeline_report.py``.

The pipeline is a stage itself, with the run directory ``<run.root>/pipeline/<run.name>/``
(manifest: what each step did, job ids; ``logs/``; ``slurm/`` job logs; ``history/`` the
manifests of earlier invocations). Unlike other stages it runs again every time it is called:
the steps keep their own books, so its manifest records an invocation, not a result.
docs/cluster.md ("kinoe pipeline") has the why of each choice.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from common.command import add_config_arguments
from common.errors import KinoeError
from common.manifest import MANIFEST_NAME, read_manifest, write_manifest
from common.run import (
    LOGS_DIR,
    Stage,
    StageContext,
    Submitted,
    load_stage_config,
    run_directory,
    run_stage,
)
from launch.pipeline_config import PipelineConfig
from launch.pipeline_local import run_steps_locally
from launch.pipeline_plan import plan, refusal, resolve_steps, step_row
from launch.pipeline_report import describe_artifacts, describe_plan, describe_submission
from launch.pipeline_slurm import refuse_if_still_queued, submit_steps

HISTORY_DIR = "history"


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
        raise refusal(*refused[0])
    if args.dry_run:
        return 0

    pipeline_dir = run_directory("pipeline", config)
    refuse_if_still_queued(pipeline_dir)
    _archive_previous(pipeline_dir)
    rows: dict[str, dict] = {step.name: step_row(step) for step in steps}

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
