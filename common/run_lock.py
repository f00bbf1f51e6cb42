"""The advisory lock that keeps two processes from writing one run directory."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import KinoeError
from common.logs import get_logger

LOCK_NAME = ".lock"


@contextmanager
def exclusive(run_dir: Path, stage: str, enabled: bool) -> Iterator[None]:
    """Hold an advisory lock on the run directory so two processes never write one run."""
    if not enabled:
        yield
        return
    with (run_dir / LOCK_NAME).open("a") as handle:
        try:
            # A POSIX record lock, not flock: forked children (DataLoader workers, datatrove
            # tasks) do not inherit it, so a crashed run's orphaned workers cannot keep its
            # run directory locked against the restart.
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except (BlockingIOError, PermissionError):
            raise KinoeError(
                f"{stage}: another kinoe process is writing {run_dir}; wait for it or set run.name=<new name>"
            ) from None
        except OSError as error:
            # Some shared filesystems refuse locks (ENOLCK); running unlocked beats not running.
            get_logger("run").warning("cannot lock %s (%s); running without a lock", run_dir, error)
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.lockf(handle, fcntl.LOCK_UN)
