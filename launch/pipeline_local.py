"""Local mode of ``kinoe pipeline``: the steps run here one after the other as ``kinoe``
processes of this interpreter (``torchrun --standalone`` for ``processes`` > 1), their output on
the console and in the pipeline's ``logs/<step>.log``; the first failure stops the pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import KinoeError
from common.manifest import read_manifest
from common.run import LOGS_DIR, StageContext, decide
from launch.pipeline_config import PipelineConfig
from launch.pipeline_plan import Step, refusal, step_row, with_step_rows


def run_steps_locally(
    context: StageContext[PipelineConfig], steps: Sequence[Step], rows: dict[str, dict]
) -> dict[str, Any]:
    """Run the steps here, one after the other; stop at the first failure."""
    logger = context.logger
    for number, step in enumerate(steps, 1):
        where = f"{number}/{len(steps)} {step.name}"
        row = rows.setdefault(step.name, step_row(step))
        # Decided again now: the steps before may have just made (or changed) its inputs.
        decision = decide(step.stage, step.config)
        if decision.action == "refuse":
            row["status"] = "refused"
            raise with_step_rows(refusal(step, decision), rows)
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
            raise with_step_rows(error, rows)
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
            raise with_step_rows(error, rows)
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
