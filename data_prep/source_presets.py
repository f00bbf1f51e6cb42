"""Source presets: the normalisation and filter settings a source starts from, kept as data.

A preset is a YAML file in ``data_prep/presets/`` (shipped as package data), named after the
preset: ``web.yaml``, ``wikipedia.yaml``, ``literature.yaml``. Every setting in it is written
``{value: ..., reason: ...}``, the reason being one line on why that value; a setting without
one is refused, so a threshold cannot lose its justification when someone edits it. Values are
checked by the configs they go into (``NormaliseConfig``, ``QualityConfig``), so a preset
obeys the same rules as a user's config. ``SourceConfig`` lays the user's keys over its
preset one key at a time.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from common.config import Config, read_yaml
from common.errors import ConfigError
from data_prep.filter_rules import QualityConfig
from data_prep.normalise import NormaliseConfig
from data_prep.pii import PiiConfig

PRESETS_DIR = Path(__file__).with_name("presets")
PRESET_NAMES: tuple[str, ...] = tuple(sorted(path.stem for path in PRESETS_DIR.glob("*.yaml")))


class Setting(Config):
    """One preset value and why it was chosen."""

    value: Any = Field(description="Checked by the config it goes into, not here")
    reason: str = Field(description="Why this value, in one line")

    @model_validator(mode="before")
    @classmethod
    def _written_with_reason(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("a setting needs its reason: write {value: ..., reason: ...}")
        return data

    @field_validator("reason")
    @classmethod
    def _one_line(cls, reason: str) -> str:
        reason = reason.strip()
        if not reason or "\n" in reason:
            raise ValueError("a reason must be one line of text, not blank")
        return reason


class PresetFile(Config):
    """A preset file as written: normalise and PII settings by key, filter settings by rule and key."""

    normalise: dict[str, Setting] = Field(default_factory=dict)
    pii: dict[str, Setting] = Field(default_factory=dict)
    filters: dict[str, dict[str, Setting]]


class SourcePreset(Config):
    """A checked preset: the configs a source starts from, and the reason for each setting."""

    name: str
    normalise: NormaliseConfig
    pii: PiiConfig
    filters: QualityConfig
    reasons: dict[str, str] = Field(
        description="Reason by dotted key as in a source's config, e.g. 'filters.length.min_chars'"
    )


def source_preset(name: str) -> SourcePreset:
    """The preset called ``name`` (``data_prep/presets/<name>.yaml``); a copy the caller may change."""
    if name not in PRESET_NAMES:
        known = ", ".join(PRESET_NAMES) or f"none, {PRESETS_DIR} has no .yaml files"
        raise ValueError(f"unknown preset {name!r}; use one of: {known}")
    return _shipped_preset(name).model_copy(deep=True)


@functools.cache
def _shipped_preset(name: str) -> SourcePreset:
    # Read once per process: every source of every config resolves through here.
    return read_preset(PRESETS_DIR / f"{name}.yaml")


def read_preset(path: Path) -> SourcePreset:
    """Read and check one preset file; every problem is one line naming the file and the key."""
    try:
        written = PresetFile.model_validate(read_yaml(path))
    except ValidationError as error:
        raise ConfigError(_describe(path, error, ())) from None
    problems = []
    normalise_values = {key: setting.value for key, setting in written.normalise.items()}
    filter_values = {
        rule: {key: setting.value for key, setting in settings.items()}
        for rule, settings in written.filters.items()
    }
    try:
        normalise = NormaliseConfig.model_validate(normalise_values)
    except ValidationError as error:
        problems.append(_describe(path, error, ("normalise",)))
    try:
        pii = PiiConfig.model_validate({key: s.value for key, s in written.pii.items()})
    except ValidationError as error:
        problems.append(_describe(path, error, ("pii",)))
    try:
        filters = QualityConfig.model_validate(filter_values)
    except ValidationError as error:
        problems.append(_describe(path, error, ("filters",)))
    if problems:
        raise ConfigError("\n".join(problems))
    reasons = {f"normalise.{key}": s.reason for key, s in written.normalise.items()}
    reasons |= {f"pii.{key}": s.reason for key, s in written.pii.items()}
    for rule, settings in written.filters.items():
        reasons |= {f"filters.{rule}.{key}": s.reason for key, s in settings.items()}
    return SourcePreset(
        name=path.stem, normalise=normalise, pii=pii, filters=filters, reasons=reasons
    )


def _describe(path: Path, error: ValidationError, prefix: tuple[str, ...]) -> str:
    """One line per problem: the file, the setting's dotted key (no ``.value``), what is wrong."""
    lines = []
    for problem in error.errors():
        # pydantic puts the matched union member's name (e.g. "function-after[...]") in the path
        loc = [str(part) for part in problem["loc"] if "[" not in str(part)]
        key = ".".join([*prefix, *loc])
        if problem["type"] == "extra_forbidden":
            what = "unknown key; remove it or fix its spelling"
        elif problem["type"] == "missing":
            what = "missing; a preset gives every setting, each with its reason"
        else:
            what = problem["msg"].removeprefix("Value error, ")
            given = problem.get("input")
            if not isinstance(given, dict | list):
                what += f" (got {given!r})"
        lines.append(f"preset {path}: '{key}': {what}")
    return "\n".join(lines)
