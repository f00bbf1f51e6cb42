"""The ``run`` section every stage's config has: where the stage writes, and which environment
variables hold secrets beside those the name patterns catch."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import Field, field_validator

from common.config import Config

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def default_run_root() -> Path:
    """$KINOE_RUN_ROOT if set, else ``runs`` in the working directory."""
    return Path(os.environ.get("KINOE_RUN_ROOT", "runs"))


class RunConfig(Config):
    """Where a stage writes: ``<root>/<stage>/<name>``."""

    root: Path = Field(
        default_factory=default_run_root,
        description="Directory holding all runs; defaults to $KINOE_RUN_ROOT, else ./runs",
    )
    name: str = Field(
        default="", description="Run name; defaults to the config file's name without .yaml"
    )
    secret_variables: list[str] = Field(
        default_factory=list,
        description="Environment variables whose values are secrets although their names look "
        "innocent (no KEY/TOKEN/SECRET/PASSWORD/WEBHOOK): redacted from logs, console errors, "
        "manifest.json and config.yaml like the ones the name patterns catch",
    )

    @field_validator("secret_variables")
    @classmethod
    def _variable_names(cls, names: list[str]) -> list[str]:
        bad = [name for name in names if not _VARIABLE_NAME.match(name)]
        if bad:
            # The likeliest mistake is pasting the secret itself, which must not stay in a config.
            raise ValueError(
                f"secret_variables lists environment variable names (letters, digits, '_'), "
                f"never their values; {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not a name"
            )
        return names

    @field_validator("name")
    @classmethod
    def _simple_name(cls, value: str) -> str:
        if value and not _RUN_NAME.match(value):
            raise ValueError(
                f"run name {value!r} must be letters, digits, '.', '_' or '-' (it becomes a directory name)"
            )
        return value
