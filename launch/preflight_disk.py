"""Disk for a pretrain run's checkpoints, for ``kinoe preflight``: how many are on disk at once,
their size, and the free space where they go (checkpoints already there count towards them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from common.run import run_directory
from launch.memory_estimate import checkpoint_bytes
from launch.preflight_report import gib
from launch.preflight_verdict import Verdict
from pretrain.config import PretrainConfig
from training.config import CheckpointConfig


def retained_checkpoints(checkpoint: CheckpointConfig, steps: int) -> int:
    """Most checkpoints on disk at once: ``keep_last``, the one being written, every kept multiple."""
    saved = set(range(checkpoint.interval, steps + 1, checkpoint.interval)) | {steps}
    kept_for_good = (
        {step for step in saved if step % checkpoint.keep_every == 0}
        if checkpoint.keep_every
        else set()
    )
    return min(checkpoint.keep_last + 1 + len(kept_for_good), len(saved))


def checkpoint_disk(
    config: PretrainConfig, args, dtype: str, verdict: Verdict, declared_free: int | None = None
) -> dict[str, Any]:
    """The report's checkpoint section: size, how many at once, free space; NO-GO when short.

    ``declared_free`` (bytes) replaces the free space measured here, for a cluster planned elsewhere.
    """
    directory = config.checkpoint_dir(run_directory("pretrain", config)).resolve()
    size = checkpoint_bytes(args, dtype)
    retained = retained_checkpoints(config.checkpoint, config.train.steps)
    existing = _tree_bytes(directory)  # a resumed run's checkpoints count towards those kept
    needed = max(retained * size - existing, 0)
    if declared_free is None:
        measured_at = directory
        while not measured_at.exists():
            measured_at = measured_at.parent
        free, where = shutil.disk_usage(measured_at).free, str(measured_at)
    else:
        free, where = declared_free, "--disk-free-gb"
    if free < needed:
        verdict.reasons.append(
            f"disk: {gib(free)} free at {where}, but up to {retained} checkpoints of "
            f"{gib(size)} need {gib(needed)} more; free space there, lower "
            f"checkpoint.keep_last (now {config.checkpoint.keep_last}), or set "
            "checkpoint.directory on a larger filesystem"
        )
    return {
        "directory": str(directory),
        "bytes": size,
        "retained": retained,
        "existing_bytes": existing,
        "needed_bytes": needed,
        "free_bytes": free,
        "measured_at": where,
    }


def _tree_bytes(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total
