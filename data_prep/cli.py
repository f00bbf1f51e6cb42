"""``kinoe data``: the data_prep stage (readers -> normalise -> filters -> dedup -> writers -> report)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.command import add_stage_arguments, run_stage_command
from common.errors import KinoeError
from common.executor import (
    check_slurm_ready,
    kinoe_command,
    run_locally,
    submit_finishing_job,
    submit_to_slurm,
)
from common.run import CONFIG_NAME, Stage, StageContext, Submitted
from data_prep.config import DataConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return run_stage_command(STAGE, args)


def prepare(context: StageContext[DataConfig]) -> dict[str, Any] | Submitted:
    """Run (or submit) every step, then write the report; returns the funnel for the manifest."""
    # datatrove and its dependencies load only when the stage runs, keeping `kinoe --help` fast.
    from data_prep.pipeline import Layout, build_stages
    from data_prep.report import write_report

    config = context.config
    layout = Layout(context.run_dir)
    stages = build_stages(config, layout)
    if config.executor.kind == "slurm":
        slurm_logs = layout.work / "slurm_logs"
        jobs = submit_to_slurm(stages, config.executor, layout.logs, slurm_logs, job_prefix(config))
        report_job = submit_finishing_job(
            config.executor,
            f"{job_prefix(config)}report",
            slurm_logs,
            kinoe_command("data", "-c", str(context.run_dir / CONFIG_NAME), "executor.kind=local"),
            jobs[-1] if jobs else None,
        )
        return Submitted(
            jobs=[*jobs, report_job],
            note=f"job {report_job} writes the report and completes the manifest after the arrays "
            f"finish; watch with squeue, logs in {slurm_logs}",
        )
    timings = run_locally(stages, config.executor, layout.logs, context.logger, "data")
    return write_report(config, layout, timings, context.logger)


def job_prefix(config: DataConfig) -> str:
    """SLURM job names of this run start with this."""
    return f"kinoe-data-{config.run.name}-"


def check_can_start(config: DataConfig) -> None:
    """Refuse, before anything is written, a run that cannot start: sources without files,
    or SLURM without sbatch or with this run's jobs still queued."""
    _check_sources(config)
    if config.executor.kind == "slurm":
        check_slurm_ready(job_prefix(config))


def _check_sources(config: DataConfig) -> None:
    """Every local source must have files to read; a typo should not yield an empty corpus."""
    from datatrove.io import get_datafolder

    for index, source in enumerate(config.sources):
        if not source.is_local():
            continue
        if Path(source.folder()).is_file():
            raise KinoeError(
                f"data: sources.{index}.path is the file {source.path}; "
                f"give its folder and select files with sources.{index}.glob"
            )
        pattern = source.file_glob()
        if not get_datafolder(source.folder()).list_files(glob_pattern=pattern, recursive=True):
            raise KinoeError(
                f"data: source {source.name!r} has no files matching {pattern or 'any file'} under {source.path}; "
                f"fix sources.{index}.path or sources.{index}.glob"
            )


STAGE = Stage(
    "data",
    DataConfig,
    prepare,
    inputs=lambda config: config.local_inputs(),
    precheck=check_can_start,
)
