"""SLURM mode of ``kinoe pipeline``: each step not skipped is submitted at once, depending
(``afterok``) on the step submitted before it, through the batch script its plan names
(launch/pipeline_plan.py). A failed submission cancels the jobs submitted before it, and a
pipeline whose previous submission is still queued is not submitted again."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from common.errors import KinoeError
from common.manifest import read_manifest
from common.run import Decision, StageContext, Submitted
from launch.jobs import SlurmJob, queued_jobs, submit
from launch.pipeline_config import PipelineConfig
from launch.pipeline_plan import Step, step_row, with_step_rows

SLURM_LOGS_DIR = "slurm"


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
        row = rows.setdefault(step.name, step_row(step))
        if decision.action == "skip":
            row["status"] = "skipped"
            continue
        job = _named_job(step, context.config.run.name)
        script, args = step.batch_script()
        try:
            job_id = submit(script, args, job, submitted[-1:], log_dir)
        except KinoeError as error:
            cancelled = _cancel(submitted)
            raise with_step_rows(
                KinoeError(f"step {step.name}: {error}{cancelled}"), rows
            ) from None
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


def refuse_if_still_queued(run_dir: Path) -> None:
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
