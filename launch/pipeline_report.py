"""What ``kinoe pipeline`` prints: the plan (``--dry-run``), the jobs it submitted, and where
each step's outputs are once every step ran."""

from __future__ import annotations

from collections.abc import Sequence

from common.run import BOOKKEEPING, Decision
from launch.pipeline_config import PipelineConfig
from launch.pipeline_plan import Step


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
