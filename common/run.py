"""Run directories and the one way every stage runs: resolve, skip-if-complete, log, hash, record.

A stage run lives in ``<run.root>/<stage>/<run.name>/``::

    manifest.json   what made this run and the hashes of what went in and came out
    config.yaml     the resolved config (every default written out); rerun with -c on it
    logs/<stage>.log
    ...             the stage's outputs

``run_stage`` skips a stage whose manifest says ``complete`` for the same fingerprint (the
resolved config plus the content hashes of the inputs), refuses to mix a different config
into an existing run directory, and with ``force`` clears the directory and redoes the work.
Under a multi-process launcher only rank 0 keeps the books; every rank runs the stage body.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import Field

from common.config import Config, dump_config, load_config
from common.errors import KinoeError, Stopped
from common.logs import get_logger, setup_logging
from common.manifest import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    TreeRecord,
    git_state,
    hash_tree,
    host_info,
    now_iso,
    package_versions,
    read_manifest,
    write_manifest,
)
from common.run_config import RunConfig
from common.run_lock import LOCK_NAME, exclusive
from common.secrets import declare_secret_variables, redact

CONFIG_NAME = "config.yaml"
LOGS_DIR = "logs"
# Files the runner writes for itself; they are not the stage's outputs.
BOOKKEEPING = (MANIFEST_NAME, CONFIG_NAME, LOGS_DIR, LOCK_NAME)


class StageConfig(Config):
    """Base of every stage's config: it has a ``run`` section."""

    # Top-level sections (or ``section.key`` settings) that say where or how a stage runs, not
    # what it computes: they stay out of the fingerprint, so moving a run to SLURM or another
    # run root does not redo it.
    fingerprint_exclude: ClassVar[frozenset[str]] = frozenset({"run"})

    run: RunConfig = Field(default_factory=RunConfig)


C = TypeVar("C", bound=StageConfig)


@dataclass
class StageContext(Generic[C]):
    """What a stage body gets: its config, its run directory, its resolved inputs and a logger."""

    stage: str
    config: C
    run_dir: Path
    inputs: dict[str, Path]
    logger: logging.Logger
    is_main_process: bool = True


@dataclass(frozen=True)
class Stage(Generic[C]):
    """A pipeline stage: a name, a config type, the inputs it reads and the body that does the work.

    ``inputs`` maps the dotted config key of each input to its path (a file or directory), so
    a missing input is reported by the key the user has to fix; an input that is an earlier
    step's output is keyed by what to run to make it (``"run `kinoe tokenizer train` first"``). ``precheck`` raises a
    ``KinoeError`` when the stage cannot start (checked before anything is written, so a
    refused start leaves the run directory as it was). ``body`` writes its outputs under
    ``context.run_dir`` and returns a summary (counts, scores) for the manifest.
    """

    name: str
    config_type: type[C]
    body: Callable[[StageContext[C]], dict[str, Any] | Submitted | None]
    inputs: Callable[[C], dict[str, Path]] = field(default=lambda config: {})
    precheck: Callable[[C], None] = field(default=lambda config: None)
    # A stage with several steps (``kinoe tokenizer train|export|...``) gives each step its own
    # run directory, <root>/<stage>/<run.name>/<step>, and manifest.
    step: str = ""
    # The top-level config sections this step's output depends on; None: all of them (less the
    # config's fingerprint_exclude). A step reading only ``encode`` is not redone for ``report``.
    fingerprint_sections: frozenset[str] | None = None

    @property
    def label(self) -> str:
        """``tokenizer train``, or just ``data`` for a stage of one step."""
        return f"{self.name} {self.step}".strip()

    def fingerprinted(self, config: StageConfig) -> dict[str, Any]:
        """The part of the resolved config that decides this step's output."""
        return self.deciding_part(config.model_dump(mode="json"), config.fingerprint_exclude)

    def deciding_part(self, data: dict[str, Any], exclude: frozenset[str]) -> dict[str, Any]:
        """``data`` (a config as JSON) less ``exclude``: sections, or ``section.key`` names."""
        kept = {
            key: value
            for key, value in data.items()
            if key not in exclude
            and (self.fingerprint_sections is None or key in self.fingerprint_sections)
        }
        for name in exclude:
            section, _, key = name.partition(".")
            if key and isinstance(kept.get(section), dict) and key in kept[section]:
                kept[section] = {k: v for k, v in kept[section].items() if k != key}
        return kept


@dataclass
class Submitted:
    """What a stage body returns when it handed its work to a scheduler instead of doing it.

    The manifest then says ``submitted``; the scheduler's last job runs the stage again,
    which finds the work done, and completes the manifest.
    """

    jobs: list[str]
    note: str


@dataclass
class StageResult:
    """How a stage run ended: ``complete`` (done now), ``skipped`` (done before) or ``submitted``."""

    status: Literal["complete", "skipped", "submitted"]
    run_dir: Path
    manifest: Manifest


def load_stage_config(
    config_type: type[C], path: Path | str | None, overrides: Sequence[str] = ()
) -> C:
    """Load a stage config; ``run.name`` defaults to the config file's stem."""
    config = load_config(config_type, path, overrides)
    # From here on: an error the CLI prints about this config is already redacted.
    declare_secret_variables(config.run.secret_variables)
    if not config.run.name:
        config.run.name = Path(path).stem if path is not None else "default"
    return config


def run_directory(stage: str, config: StageConfig, step: str = "") -> Path:
    """``<run.root>/<stage>/<run.name>[/<step>]`` for this config."""
    run_dir = Path(config.run.root) / stage / config.run.name
    return run_dir / step if step else run_dir


def is_main_process() -> bool:
    """True on rank 0 of a multi-process launch, and in a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def run_stage(
    stage: Stage[C],
    config: C,
    force: bool = False,
    command: Sequence[str] | None = None,
) -> StageResult:
    """Run ``stage`` with ``config`` in its run directory, or skip it if already complete."""
    # Again here for configs built in code rather than loaded (tests, benchmarks, the pipeline).
    declare_secret_variables(config.run.secret_variables)
    main = is_main_process()
    run_dir = run_directory(stage.name, config, stage.step)
    inputs = _resolve_inputs(stage, config)
    logger = get_logger(stage.name)
    label = stage.label
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(run_dir, label, enabled=main):
        previous = mark_stale(run_dir, read_manifest(run_dir)) if main else read_manifest(run_dir)
        config_data = config.model_dump(mode="json")
        input_records = _hash_inputs(inputs, previous)
        deciding = stage.fingerprinted(config)
        fingerprint = _fingerprint(deciding, input_records)
        decision = _judge(
            stage, run_dir, previous, deciding, input_records, config.fingerprint_exclude
        )
        if decision.action == "refuse" and not force:
            raise KinoeError(decision.reason)
        if decision.action == "skip" and not force:
            logger.info(
                "%s: skipped, %s is complete for this config and these inputs (--force redoes it)",
                label,
                run_dir,
            )
            return StageResult("skipped", run_dir, previous)
        stage.precheck(config)
        if force and main and previous is not None:
            _clear(run_dir)
        if main:
            (run_dir / CONFIG_NAME).write_text(redact(dump_config(config)), encoding="utf-8")
        setup_logging(run_dir / LOGS_DIR / f"{stage.name}{_rank_suffix()}.log")
        manifest = Manifest(
            stage=label,
            status="running",
            run_dir=str(run_dir),
            fingerprint=fingerprint,
            config=config_data,
            command=list(command if command is not None else sys.argv),
            git=git_state(),
            versions=package_versions(),
            host=host_info(),
            started_at=now_iso(),
            inputs=input_records,
        )
        if main:
            write_manifest(run_dir, manifest)
        logger.info("%s: running in %s", label, run_dir)
        started = time.monotonic()
        context = StageContext(stage.name, config, run_dir, inputs, logger, main)
        try:
            summary = stage.body(context) or {}
        except BaseException as error:
            manifest.status = "stopped" if isinstance(error, Stopped) else "failed"
            manifest.error = f"{type(error).__name__}: {error}".splitlines()[0]
            # A check that failed on its figures (a conversion's verification) keeps them.
            if isinstance(getattr(error, "summary", None), dict):
                manifest.summary = error.summary
            _finish(manifest, started)
            if main:
                write_manifest(run_dir, manifest)
            raise
        _finish(manifest, started)
        if isinstance(summary, Submitted):
            manifest.status = "submitted"
            manifest.summary = {"jobs": summary.jobs, "note": summary.note}
            if main:
                write_manifest(run_dir, manifest)
            logger.info("%s: submitted jobs %s; %s", label, ", ".join(summary.jobs), summary.note)
            return StageResult("submitted", run_dir, manifest)
        manifest.status = "complete"
        manifest.summary = summary
        if main:
            manifest.outputs = hash_tree(run_dir, exclude=BOOKKEEPING)
            write_manifest(run_dir, manifest)
        logger.info("%s: complete in %.1f s, outputs in %s", label, manifest.duration_s, run_dir)
        return StageResult("complete", run_dir, manifest)


@dataclass(frozen=True)
class Decision:
    """What ``run_stage`` would do with a stage now: run it, skip it (complete), or refuse it."""

    action: Literal["run", "skip", "refuse"]
    reason: str
    missing_input: bool = False


def decide(stage: Stage[C], config: C, hash_inputs: bool = True) -> Decision:
    """The decision ``run_stage`` makes before running a body, without running anything.

    ``hash_inputs=False`` compares the config alone (a run of another config is refused
    whatever the inputs are), for plans made before earlier steps have written their outputs.
    """
    run_dir = run_directory(stage.name, config, stage.step)
    previous = mark_stale(run_dir, read_manifest(run_dir))
    deciding = stage.fingerprinted(config)
    if not hash_inputs:
        if (
            previous is None
            or stage.deciding_part(previous.config, config.fingerprint_exclude) == deciding
        ):
            return Decision("run", "no run yet" if previous is None else "same config")
        message = _mismatch_message(
            stage, config.fingerprint_exclude, run_dir, previous, deciding, previous.inputs
        )
        return Decision("refuse", message)
    try:
        inputs = _resolve_inputs(stage, config)
    except KinoeError as error:
        return Decision("run", str(error), missing_input=True)
    records = _hash_inputs(inputs, previous)
    return _judge(stage, run_dir, previous, deciding, records, config.fingerprint_exclude)


def mark_stale(run_dir: Path, manifest: Manifest | None) -> Manifest | None:
    """A ``running`` manifest whose process is gone (no such pid on this host) rewritten ``failed``.

    A killed stage (SIGKILL, out of memory, a lost node) never writes its end, so without this
    its manifest would read ``running`` for ever.
    """
    if manifest is None or manifest.status != "running":
        return manifest
    host, pid = manifest.host.get("hostname"), manifest.host.get("pid")
    if host != socket.gethostname() or not isinstance(pid, int) or _alive(pid):
        return manifest
    manifest.status = "failed"
    manifest.error = f"its process (pid {pid} on {host}) ended without recording an end (killed?)"
    write_manifest(run_dir, manifest)
    get_logger("run").warning("%s: %s; marked failed", run_dir, manifest.error)
    return manifest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _judge(
    stage: Stage,
    run_dir: Path,
    previous: Manifest | None,
    deciding: dict[str, Any],
    records: dict[str, TreeRecord],
    exclude: frozenset[str],
) -> Decision:
    """Run, skip (complete for this fingerprint) or refuse (a run of another config or inputs)."""
    if previous is None:
        return Decision("run", "no run yet")
    if previous.fingerprint != _fingerprint(deciding, records):
        message = _mismatch_message(stage, exclude, run_dir, previous, deciding, records)
        return Decision("refuse", message)
    if previous.status == "complete":
        return Decision("skip", "complete")
    return Decision("run", f"its run is {previous.status}")


def _resolve_inputs(stage: Stage[C], config: C) -> dict[str, Path]:
    inputs = {key: Path(path) for key, path in stage.inputs(config).items()}
    for key, path in inputs.items():
        if path.exists():
            continue
        if " " in key:  # an earlier step's output, described with what to run
            raise KinoeError(f"{stage.label}: {path} does not exist; {key}")
        raise KinoeError(
            f"{stage.label}: input {key} = {path} does not exist; fix {key} in the config"
        )
    return inputs


def _hash_inputs(inputs: dict[str, Path], previous: Manifest | None) -> dict[str, TreeRecord]:
    records = {}
    for key, path in inputs.items():
        known = list(previous.inputs[key].files) if previous and key in previous.inputs else []
        known += upstream_records(path)
        records[key] = hash_tree(path, known=known)
    return records


def upstream_records(path: Path) -> list[FileRecord]:
    """Hashes an earlier kinoe stage already recorded for the files under ``path``.

    When ``path`` is (inside) the run directory of a complete kinoe run, its manifest lists
    every output file's size, mtime and hash; files unchanged since then need not be reread,
    so handing a terabyte of documents to the next stage does not mean hashing it again.
    """
    path = Path(path).resolve()
    for run_dir in (path, *list(path.parents)[:2]):
        upstream = read_manifest(run_dir)
        if upstream is None or upstream.status != "complete" or upstream.outputs is None:
            continue
        if path.is_file():
            relative = path.relative_to(run_dir).as_posix()
            return [
                r.model_copy(update={"path": path.name})
                for r in upstream.outputs.files
                if r.path == relative
            ]
        prefix = "" if path == run_dir else path.relative_to(run_dir).as_posix() + "/"
        return [
            record.model_copy(update={"path": record.path[len(prefix) :]})
            for record in upstream.outputs.files
            if record.path.startswith(prefix)
        ]
    return []


def _fingerprint(deciding: dict[str, Any], inputs: dict[str, TreeRecord]) -> str:
    what = {
        "config": deciding,
        "inputs": {key: record.sha256 for key, record in inputs.items()},
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(data, list) and data:
        # Into lists too, so a refusal names the item's key (sources.0.glob), not the list.
        flat = {}
        for index, value in enumerate(data):
            flat.update(_flatten(value, f"{prefix}{index}."))
        return flat
    return {prefix.rstrip("."): data}


def _mismatch_message(
    stage: Stage,
    exclude: frozenset[str],
    run_dir: Path,
    previous: Manifest,
    deciding: dict[str, Any],
    inputs: dict[str, TreeRecord],
) -> str:
    before = _flatten(stage.deciding_part(previous.config, exclude))
    after = _flatten(deciding)
    changed = sorted(
        key for key in before.keys() | after.keys() if before.get(key) != after.get(key)
    )
    changed += sorted(
        f"input {key}"
        for key in previous.inputs.keys() | inputs.keys()
        if key not in previous.inputs
        or key not in inputs
        or previous.inputs[key].sha256 != inputs[key].sha256
    )
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return (
        f"{stage.label}: {run_dir} holds a {previous.status} run made with a different config or inputs "
        f"(changed: {shown or 'unknown'}); pass --force to redo it there, or set run.name=<new name>"
    )


def _finish(manifest: Manifest, started: float) -> None:
    manifest.finished_at = now_iso()
    manifest.duration_s = round(time.monotonic() - started, 3)


def _clear(run_dir: Path) -> None:
    get_logger("run").info("--force: removing the previous run's files in %s", run_dir)
    for entry in run_dir.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _rank_suffix() -> str:
    return f".rank{os.environ['RANK']}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
