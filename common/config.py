"""Typed configs: pydantic v2 models loaded from YAML with dotted command-line overrides.

Every stage's config is a ``Config`` subclass. Loading goes YAML file -> dict -> overrides
(``train.lr=3e-4``, ``data.sources.0.weight=2``) -> validation. Any problem becomes a
``ConfigError`` whose message is one line per problem, naming the file, the dotted key and
the reason, so the CLI can print it without a traceback and exit with code 2.

Relative paths inside a config are relative to the working directory the command runs in
(the repository root in every example), not to the config file.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from common.errors import ConfigError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base of every kinoe config: unknown keys are errors, assignments are validated.

    A number given as a string (``lr: "3e-3"``) is refused rather than converted: quoting is
    how a number that was meant as text slips in unnoticed. Bare ``3e-3`` is a number (the
    loader reads floats as YAML 1.2 does; YAML 1.1 would make it a string).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_quoted_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if _number_text(value) and field is not None and _numeric(field.annotation):
            kind = "an integer" if _numeric(field.annotation, int) else "a number"
            raise ValueError(
                f"{info.field_name} must be {kind}, not the string {value!r}; write it "
                "without quotes"
            )
        return value


def _number_text(value: Any) -> bool:
    """True for a string that reads as a number ("3e-3"); other strings get pydantic's error."""
    try:
        float(value) if isinstance(value, str) else None
    except ValueError:
        return False
    return isinstance(value, str)


def _numeric(annotation: Any, kinds: tuple[type, ...] | type = (int, float)) -> bool:
    """True for fields of ``kinds`` (optional or not): the ones a string must not fill."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return bool(members) and all(_numeric(member, kinds) for member in members)
    if typing.get_origin(annotation) is typing.Annotated:
        return _numeric(members[0], kinds)
    return annotation in kinds


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that rejects duplicate keys, which plain YAML silently resolves to the last."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)
# YAML 1.2's float: PyYAML follows YAML 1.1, where 3e-4 (no dot) is the string "3e-4".
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.?[0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing file with -c")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text ({err.reason}); save the config as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        where = ""
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, not {type(data).__name__}"
        )
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-typed value (``3e-4``, ``true``, ``[1,2]``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like key.subkey=value, e.g. train.lr=3e-4")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None
    except yaml.YAMLError:
        # Not valid YAML on its own (e.g. an unbalanced bracket): keep the text as written.
        value = raw
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``value`` at the dotted ``path`` in nested dicts/lists, creating missing sections."""
    node: Any = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {'.'.join(path)}: {where} is not an index of a list of {len(node)}"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            parent = ".".join(path[:depth])
            raise ConfigError(
                f"override {'.'.join(path)}: {parent} is a value, not a section with keys"
            )


def _table_default(cls: type[BaseModel], path: list[str]) -> tuple[int, dict] | None:
    """Where ``path`` goes inside a table (a ``dict`` field) of ``cls``: its depth and default.

    Sections are followed through fields typed as a config class; anything else ends the walk.
    """
    model: Any = cls
    for depth, part in enumerate(path[:-1]):
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif typing.get_origin(annotation) is dict:
            return depth, dict(field.get_default(call_default_factory=True) or {})
        else:
            return None
    return None


def _seed_table(cls: type[BaseModel], data: dict[str, Any], path: list[str]) -> None:
    """Before ``a.table.key=value``: a table the file does not give starts from its default,
    so one key set on the command line keeps the table's other keys."""
    found = _table_default(cls, path)
    if found is None:
        return
    depth, default = found
    node: Any = data
    for part in path[:depth]:
        if not isinstance(node, dict):
            return
        if node.get(part) is None:  # absent or an empty section, as apply_override treats it
            node[part] = {}
        node = node[part]
    if isinstance(node, dict) and node.get(path[depth]) is None:
        node[path[depth]] = default


def load_config(cls: type[C], path: Path | str | None, overrides: Sequence[str] = ()) -> C:
    """Build ``cls`` from a YAML file (or defaults when ``path`` is None) plus dotted overrides.

    ``a.b=value`` sets one key; a key inside a table (``mt_bench.temperatures.writing=0.5``)
    changes that key of the file's table, or of the default table when the file gives none.
    """
    source = str(path) if path is not None else "defaults"
    data = read_yaml(Path(path)) if path is not None else {}
    overridden: set[str] = set()
    for text in overrides:
        key_path, value = parse_override(text)
        _seed_table(cls, data, key_path)
        apply_override(data, key_path, value)
        overridden.add(".".join(key_path))
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        lines = [_describe(cls, e, source, overridden) for e in err.errors()]
        raise ConfigError("\n".join(lines)) from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML, every default written out, in field order."""
    return yaml.safe_dump(
        config.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100
    )


def _dotted(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc)


def _describe(cls: type[Config], error: dict, source: str, overridden: set[str]) -> str:
    loc = [part for part in error["loc"] if not _is_union_tag(part)]
    key = _dotted(loc)
    from_command_line = any(
        key == given or given.startswith(f"{key}.") or key.startswith(f"{given}.")
        for given in overridden
    )
    origin = " (from the command line)" if from_command_line else ""
    kind = error["type"]
    if kind == "extra_forbidden":
        hint = ""
        fields = _fields_at(cls, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean {_dotted([*loc[:-1], close[0]])}?"
        elif fields:
            hint = f"; known keys here: {', '.join(fields)}"
        return f"config error in {source}: unknown key '{key}'{origin}{hint}"
    if kind == "missing":
        return f"config error in {source}: missing required key '{key}'"
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind in ("value_error", "assertion_error") or not loc:
        # Cross-field checks report on the section; their message already names the keys.
        section = f" in '{key}'" if key else ""
        return f"config error in {source}{section}: {message}"
    given = error.get("input")
    shown = "" if isinstance(given, dict | list) else f" (got {given!r})"
    return f"config error in {source}: '{key}'{origin}: {message}{shown}"


def _is_union_tag(part: int | str) -> bool:
    # pydantic inserts the chosen union member's name into the location, e.g. "function-after[...]"
    return isinstance(part, str) and ("[" in part or part in {"int", "float", "str", "bool"})


def _fields_at(cls: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """Field names of the model found by following ``loc`` from ``cls`` (empty if none)."""
    current: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        model = _model_in(current)
        if model is None or part not in model.model_fields:
            return []
        current = model.model_fields[part].annotation
    model = _model_in(current)
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation such as ``Model``, ``Model | None``, ``list[Model]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType or origin in (list, dict, tuple):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
