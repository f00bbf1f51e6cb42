"""Progress lines: counts, rate and ETA, logged when there is no terminal."""

from __future__ import annotations

import logging

from common.progress import Progress, format_progress, track


def test_format_with_total_has_counts_rate_and_eta():
    line = format_progress(1200, 10000, 3.0, "docs")
    assert line == "1,200/10,000 docs (12.0%), 400.0 docs/s, elapsed 0:00:03, ETA 0:00:22"


def test_format_without_total_or_time():
    assert format_progress(5, None, 0.0, "shards") == "5 shards, 0.0 shards/s, elapsed 0:00:00"
    assert format_progress(0, 10, 0.0, "docs").endswith("ETA unknown")


def test_logged_progress_without_terminal(caplog):
    logger = logging.getLogger("kinoe.test_progress")
    with caplog.at_level(logging.INFO, logger="kinoe.test_progress"):
        items = list(
            track(range(50), "encode", unit="docs", log_every_s=0.0, live=False, logger=logger)
        )
    assert items == list(range(50))
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("encode: 1/50 docs (2.0%)")
    assert messages[-1].startswith("encode: done, 50/50 docs (100.0%)") and "ETA" in messages[-1]


def test_logged_progress_is_throttled(caplog):
    logger = logging.getLogger("kinoe.test_progress")
    with (
        caplog.at_level(logging.INFO, logger="kinoe.test_progress"),
        Progress("tokenize", total=1000, log_every_s=3600.0, live=False, logger=logger) as progress,
    ):
        for _ in range(1000):
            progress.update()
    assert len(caplog.records) == 1  # only the final line within an hour
