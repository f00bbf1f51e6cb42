"""Progress of long work: counts, rate and ETA, as a live bar on a terminal and as log lines otherwise.

Batch jobs (SLURM) write to files, where a redrawn bar becomes thousands of carriage
returns; there the same figures go to the log every ``log_every_s`` seconds instead.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

from common.logs import get_logger

T = TypeVar("T")


def format_progress(done: int, total: int | None, elapsed_s: float, unit: str) -> str:
    """One line such as ``1,200/10,000 docs (12.0%), 400.0 docs/s, elapsed 0:00:03, ETA 0:00:22``."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    elapsed = dt.timedelta(seconds=round(elapsed_s))
    if total:
        share = f" ({100.0 * done / total:.1f}%)"
        if rate > 0:
            eta = str(dt.timedelta(seconds=round(max(total - done, 0) / rate)))
        else:
            eta = "unknown"
        return (
            f"{done:,}/{total:,} {unit}{share}, {rate:,.1f} {unit}/s, elapsed {elapsed}, ETA {eta}"
        )
    return f"{done:,} {unit}, {rate:,.1f} {unit}/s, elapsed {elapsed}"


class Progress:
    """Counts work done; shows a tqdm bar on a terminal, else logs a progress line periodically."""

    def __init__(
        self,
        description: str,
        total: int | None = None,
        unit: str = "items",
        log_every_s: float = 30.0,
        logger: logging.Logger | None = None,
        live: bool | None = None,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self._log_every_s = log_every_s
        self._logger = logger or get_logger("progress")
        self._start = time.monotonic()
        self._last_log = self._start
        live = sys.stderr.isatty() if live is None else live
        self._bar = (
            tqdm(
                total=total, desc=description, unit=f" {unit}", unit_scale=True, dynamic_ncols=True
            )
            if live
            else None
        )

    def update(self, n: int = 1) -> None:
        """Record ``n`` more units done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_log >= self._log_every_s:
            self._last_log = now
            self._logger.info("%s: %s", self.description, self.line())

    def line(self) -> str:
        """The current counts, rate and ETA as one line."""
        return format_progress(self.done, self.total, time.monotonic() - self._start, self.unit)

    def close(self) -> None:
        """Finish the bar, or log the final line."""
        if self._bar is not None:
            self._bar.close()
        else:
            self._logger.info("%s: done, %s", self.description, self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def track(
    items: Iterable[T], description: str, total: int | None = None, unit: str = "items", **kwargs
) -> Iterator[T]:
    """Iterate over ``items`` while showing progress; ``total`` defaults to ``len(items)``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(description, total=total, unit=unit, **kwargs) as progress:
        for item in items:
            yield item
            progress.update()
