"""Run manifests: what made an artifact (config, code, packages, host) and hashes of what went in and out.

A manifest is ``manifest.json`` in a run directory. It is written when the stage starts
(status ``running``), and again when it ends (``complete``, ``failed``, or ``stopped`` when a
stage stopped early on a signal after saving its progress), always atomically,
so a reader never sees half a file. Hashes are SHA-256 of file contents; a file whose size
and modification time equal those recorded in the previous manifest reuses its recorded hash
(as git's index does), so rerunning a stage over terabytes of input does not reread them.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from common.secrets import redact

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

# Packages whose versions decide what a stage produces; recorded in every manifest.
TRACKED_PACKAGES = (
    "kinoe",
    "torch",
    "deepspeed",
    "transformers",
    "tokenizers",
    "safetensors",
    "datasets",
    "sentencepiece",
    "datatrove",
    "wandb",
    "pydantic",
    "numpy",
    "pyarrow",
    "peft",
    "flash-attn",
)
# Environment variables worth recording: where and how the job ran. Never credentials.
RECORDED_ENVIRONMENT = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NNODES",
    "WORLD_SIZE",
    "CUDA_VISIBLE_DEVICES",
    "CONDA_PREFIX",
    "OMP_NUM_THREADS",
)

_HASH_CHUNK = 8 << 20


class FileRecord(BaseModel):
    """One file: path relative to its root, size in bytes, mtime in ns, SHA-256 of the contents."""

    path: str
    bytes: int
    mtime_ns: int
    sha256: str


class TreeRecord(BaseModel):
    """A file or directory tree: its files and one SHA-256 over their (path, hash) pairs."""

    path: str
    sha256: str
    bytes: int
    files: list[FileRecord]


class Manifest(BaseModel):
    """What ``manifest.json`` holds; see docs/architecture.md for the contract."""

    kinoe_manifest: int = MANIFEST_VERSION
    stage: str
    status: Literal["running", "submitted", "complete", "failed", "stopped"]
    run_dir: str
    fingerprint: str = Field(description="SHA-256 of the resolved config and the input hashes")
    config: dict[str, Any]
    command: list[str]
    git: dict[str, Any]
    versions: dict[str, str]
    host: dict[str, Any]
    started_at: str
    finished_at: str | None = None
    duration_s: float | None = None
    inputs: dict[str, TreeRecord] = {}
    outputs: TreeRecord | None = None
    summary: dict[str, Any] = {}
    error: str | None = None


def file_hexdigest(path: Path, new_hasher: Callable[[], Any] = hashlib.sha256) -> str:
    """Hex digest of a file's contents by ``new_hasher`` (a hashlib-like factory), read in 8 MiB chunks."""
    digest = new_hasher()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file's contents."""
    return file_hexdigest(path)


def hash_tree(
    root: Path,
    known: Iterable[FileRecord] = (),
    exclude: Iterable[str] = (),
) -> TreeRecord:
    """Hash a file, or every file under a directory (sorted, symlinks followed).

    ``known`` records from an earlier manifest are reused when a file's size and mtime are
    unchanged. ``exclude`` names top-level entries of a directory to leave out.
    """
    root = Path(root)
    cache = {record.path: record for record in known}
    skipped = set(exclude)
    if root.is_file():
        candidates = [(root.name, root)]
    else:
        candidates = sorted(
            (path.relative_to(root).as_posix(), path)
            for path in root.rglob("*")
            if path.is_file() and path.relative_to(root).parts[0] not in skipped
        )
    files: list[FileRecord] = []
    for relative, path in candidates:
        stat = path.stat()
        previous = cache.get(relative)
        if previous and previous.bytes == stat.st_size and previous.mtime_ns == stat.st_mtime_ns:
            files.append(previous)
            continue
        files.append(
            FileRecord(
                path=relative,
                bytes=stat.st_size,
                mtime_ns=stat.st_mtime_ns,
                sha256=sha256_file(path),
            )
        )
    combined = hashlib.sha256()
    for record in files:
        combined.update(f"{record.path}\0{record.sha256}\n".encode())
    return TreeRecord(
        path=str(root),
        sha256=combined.hexdigest(),
        bytes=sum(record.bytes for record in files),
        files=files,
    )


def git_state(source: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the kinoe checkout the code runs from (``unknown`` outside git)."""
    where = source or Path(__file__).resolve().parent.parent
    try:
        commit = _git(where, "rev-parse", "HEAD")
        dirty_files = _git(where, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": bool(dirty_files)}


def _git(where: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(where), *args], capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout.strip()


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` plus Python's, read from metadata without importing them."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def host_info() -> dict[str, Any]:
    """Where this process runs: host name, platform, user, and the job's scheduler variables."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "user": getpass.getuser(),
        "pid": os.getpid(),
        "python": sys.executable,
        "cpus": os.cpu_count(),
        "environment": {
            name: os.environ[name] for name in RECORDED_ENVIRONMENT if name in os.environ
        },
    }


def now_iso() -> str:
    """The current time in UTC, ISO 8601 with seconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_manifest(run_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temporary file, fsync, rename), secrets redacted."""
    path = Path(run_dir) / MANIFEST_NAME
    write_json_atomic(path, redact(manifest.model_dump(mode="json")))
    return path


def read_manifest(run_dir: Path) -> Manifest | None:
    """The manifest in ``run_dir``, or None if there is none or it is not one kinoe can read."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValueError:
        return None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a crash at any moment leaves either the old file or the new one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
