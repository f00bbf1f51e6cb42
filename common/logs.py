"""Logging to the console and to a file in the run directory, with secrets redacted."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from common.secrets import declared_secret_variables, redact, secret_values

ROOT_LOGGER = "kinoe"
# Libraries whose import-time warnings say nothing a kinoe user can act on: transformers
# imports torchao (engine.fp8's float8) whenever it is installed, and torchao then reports
# kernels built for GPUs it cannot load on a CPU machine, and torch a deprecation meant for
# torchao's authors. Their errors still show.
QUIETED_LOGGERS = ("torchao", "torch.utils._pytree")
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_CONSOLE_FORMAT = "%(asctime)s %(name)s: %(message)s"


class _RedactSecrets(logging.Filter):
    """Rewrites each record's message so no secret from the environment reaches a log."""

    def __init__(self) -> None:
        super().__init__()
        self._declared = declared_secret_variables()
        self._secrets = secret_values()

    def filter(self, record: logging.LogRecord) -> bool:
        # The console handler is set up before any config is read; a config loaded since may
        # have declared more secret variables (run.secret_variables).
        if self._declared != declared_secret_variables():
            self._declared = declared_secret_variables()
            self._secrets = secret_values()
        if self._secrets:
            record.msg = redact(record.getMessage(), self._secrets)
            record.args = None
        return True


def get_logger(name: str) -> logging.Logger:
    """The logger for a part of kinoe, e.g. ``get_logger("data")`` -> ``kinoe.data``."""
    return logging.getLogger(f"{ROOT_LOGGER}.{name}")


def rank_prefix() -> str:
    """``[rank N] `` under a multi-process launcher, else empty."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send kinoe's logs to stderr and, when given, to ``log_file`` (appended, full timestamps).

    Calling it again replaces the handlers, so each stage run logs to its own file.
    """
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logger = logging.getLogger(ROOT_LOGGER)
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    redacting = _RedactSecrets()
    prefix = rank_prefix()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(prefix + _CONSOLE_FORMAT, datefmt="%H:%M:%S"))
    console.addFilter(redacting)
    logger.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(logging.Formatter(prefix + _FORMAT))
        to_file.addFilter(redacting)
        logger.addHandler(to_file)
    return logger
