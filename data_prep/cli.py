"""``kinoe data``: the data_prep stage (readers -> normalise -> filters -> dedup -> writers -> report)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from common.command import add_stage_arguments, run_stage_command
from common.errors import KinoeError
from common.progress import Progress
from common.run import CONFIG_NAME, Stage, StageContext, Submitted
from data_prep.config import DataConfig

HELP = "filter and deduplicate Japanese text (mC4, Wikipedia, local files, Aozora) with datatrove"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return run_stage_command(STAGE, args)


def prepare(context: StageContext[DataConfig]) -> dict[str, Any] | Submitted:
    """Run (or submit) every step, then write the report; returns the funnel for the manifest."""
    # datatrove and its dependencies load only when the stage runs, keeping `kinoe --help` fast.
    from data_prep.pipeline import (
        Layout,
        build_stages,
        local_executors,
        slurm_executors,
        submit_finalise,
    )
    from data_prep.report import write_report

    config = context.config
    layout = Layout(context.run_dir)
    stages = build_stages(config, layout)
    if config.executor.kind == "slurm":
        if shutil.which("sbatch") is None:
            raise KinoeError(
                "executor.kind is slurm but sbatch is not on PATH; run on a SLURM login node"
            )
        executors = slurm_executors(config, layout, stages)
        executors[-1].run()  # launches its dependencies first, each as an array job
        jobs = [str(e.job_id) for e in executors if e.job_id not in (None, -1)]
        report_job = submit_finalise(
            config, layout, context.run_dir / CONFIG_NAME, jobs[-1] if jobs else None
        )
        return Submitted(
            jobs=[*jobs, report_job],
            note=f"job {report_job} writes the report and completes the manifest after the arrays finish; "
            f"watch with squeue, logs in {layout.work / 'slurm_logs'}",
        )
    timings: dict[str, float] = {}
    for index, (stage, executor) in enumerate(
        zip(stages, local_executors(config, layout, stages), strict=True)
    ):
        description = f"data step {index + 1}/{len(stages)} {stage.name}"
        started = time.monotonic()
        with CompletionWatcher(
            layout.logs(stage.name) / "completions", stage.tasks, description, context
        ):
            executor.run()
        timings[stage.name] = round(time.monotonic() - started, 3)
    return write_report(config, layout, timings, context.logger)


def check_can_start(config: DataConfig) -> None:
    """Refuse, before anything is written, a run that cannot start: sources without files,
    or SLURM without sbatch or with this run's jobs still queued."""
    _check_sources(config)
    if config.executor.kind == "slurm":
        if shutil.which("sbatch") is None:
            raise KinoeError(
                "executor.kind is slurm but sbatch is not on PATH; run on a SLURM login node"
            )
        _refuse_while_queued(config)


def _refuse_while_queued(config: DataConfig) -> None:
    """Submitting again while this run's jobs are queued would run every task twice."""
    prefix = f"kinoe-data-{config.run.name}-"
    listing = subprocess.run(
        ["squeue", "--noheader", "--me", "--format=%i %j"],
        capture_output=True,
        text=True,
        check=False,
    )
    queued = [
        line.split()[0]
        for line in listing.stdout.splitlines()
        if line.split()[-1].startswith(prefix)
    ]
    if queued:
        raise KinoeError(
            f"data: jobs of run {config.run.name!r} are still queued or running ({', '.join(queued)}); "
            "wait for them (the last one completes the run) or scancel them before submitting again"
        )


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


class CompletionWatcher:
    """Report tasks completed / total with rate and ETA while a local executor runs."""

    def __init__(
        self,
        folder: Path,
        total: int,
        description: str,
        context: StageContext,
        every_s: float = 10.0,
    ):
        self.folder, self.total, self.description = folder, total, description
        self.context, self.every_s = context, every_s
        self._stop = threading.Event()

    def _count(self) -> int:
        return sum(1 for _ in self.folder.glob("*")) if self.folder.is_dir() else 0

    def __enter__(self) -> CompletionWatcher:
        self._already = self._count()
        self.progress = Progress(
            self.description,
            total=self.total,
            unit="tasks",
            log_every_s=0.0,
            logger=self.context.logger,
            live=False,
        )
        self.progress.update(self._already)
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
        done = self._count()
        if done > self.progress.done:
            self.progress.done = done
        self.progress.close()


STAGE = Stage(
    "data",
    DataConfig,
    prepare,
    inputs=lambda config: config.local_inputs(),
    precheck=check_can_start,
)
