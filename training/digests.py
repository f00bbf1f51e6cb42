"""SHA-256 digests of the files a checkpoint wrote, recorded then and checked before it is trusted.

A byte flipped inside a tensor leaves a checkpoint loadable: the run resumes from damaged
weights and finishes ``complete``. So every file a checkpoint writes (DeepSpeed's shards
through its checkpoint engine, and kinoe's RNG states) is hashed as soon as it is written, by
a background thread while DeepSpeed writes the next file, and the digests go into
``trainer_state.json``. Resume, ``kinoe convert`` and fine-tuning's resume check them first;
the check of one checkpoint is spread over the ranks, each hashing its share with a few
threads (hashlib releases the GIL).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist

from common.errors import KinoeError
from common.manifest import sha256_file, write_json_atomic
from training import safe_load

# The files of one checkpoint directory: path relative to it -> {"bytes": n, "sha256": hex}.
FileDigests = dict[str, dict[str, Any]]

_VERIFY_THREADS = max(1, min(4, os.cpu_count() or 1))


def file_digest(path: Path) -> dict[str, Any]:
    """The size and SHA-256 of one file."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


class DigestingCheckpointEngine:
    """DeepSpeed's checkpoint engine with every saved file hashed in a background thread.

    Wraps the engine DeepSpeed built (so its settings, e.g. the serialization format, stay).
    Its ``load`` unpickles data only and names a refused file; loads DeepSpeed makes without
    its checkpoint engine are held to the same rule by ``safe_load.weights_only_loads``.
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-digest")
        self._pending: dict[Path, Future] = {}

    def save(self, state_dict: Any, path: str) -> None:
        self.inner.save(state_dict, path)
        self._pending[Path(path)] = self._hasher.submit(file_digest, Path(path))

    def load(self, path: str, map_location: Any = None) -> Any:
        what_to_do = "resume from another checkpoint (checkpoint.resume=<step>) or restore it"
        return safe_load.load(Path(path), what_to_do, map_location=map_location or "cpu")

    def written(self, root: Path) -> FileDigests:
        """The digests of the files saved since the last call, relative to ``root``; waits for them."""
        digests = {
            path.resolve().relative_to(root.resolve()).as_posix(): future.result()
            for path, future in self._pending.items()
        }
        self._pending.clear()
        return digests

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def digesting_engine(engine: Any) -> DigestingCheckpointEngine:
    """The DeepSpeed ``engine``'s checkpoint engine, wrapped to hash what it saves (once)."""
    current = engine.checkpoint_engine
    if isinstance(current, DigestingCheckpointEngine):
        return current
    if current.is_decoupled():
        raise KinoeError(
            "engine.deepspeed selects a decoupled (asynchronous) checkpoint engine, whose files "
            "are not on disk when kinoe records their digests; remove that checkpoint setting"
        )
    engine.checkpoint_engine = DigestingCheckpointEngine(current)
    return engine.checkpoint_engine


def gather(digests: FileDigests, group: Any = None) -> FileDigests:
    """Every rank's digests merged (a collective when the process group is up)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return dict(digests)
    gathered: list[FileDigests | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, digests, group=group)
    merged: FileDigests = {}
    for part in gathered:
        merged.update(part or {})
    return merged


def damage(
    directory: Path,
    recorded: FileDigests,
    share: tuple[int, int] = (0, 1),
    whole_directory: bool = True,
) -> str | None:
    """The first problem of this rank's share of ``directory``'s files as '<file>: <what>', or None.

    ``share`` is (rank, ranks): the recorded files are dealt out in name order. With
    ``whole_directory``, ``.pt`` files present but not recorded are refused too: DeepSpeed
    would load a planted extra shard.
    """
    rank, ranks = share
    names = sorted(recorded)[rank::ranks]
    problems: list[str] = []
    if rank == 0 and whole_directory:
        present = {
            path.relative_to(directory).as_posix()
            for path in directory.rglob("*")
            if path.is_file() and path.suffix == ".pt"
        }
        problems += [
            f"{directory / name}: not among the files recorded when the checkpoint was written"
            for name in sorted(present - recorded.keys())
        ]
    to_hash = []
    for name in names:
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing (the checkpoint recorded it when written)")
        elif path.stat().st_size != recorded[name]["bytes"]:
            problems.append(
                f"{path}: {path.stat().st_size:,} bytes, but {recorded[name]['bytes']:,} were "
                "written"
            )
        else:
            to_hash.append(name)
    if problems:
        return problems[0]
    with ThreadPoolExecutor(max_workers=_VERIFY_THREADS) as pool:
        hashes = pool.map(lambda name: sha256_file(directory / name), to_hash)
        for name, digest in zip(to_hash, hashes, strict=True):
            if digest != recorded[name]["sha256"]:
                return (
                    f"{directory / name}: its SHA-256 differs from the one recorded when the "
                    "checkpoint was written"
                )
    return None


def agreed_damage(
    directory: Path, recorded: FileDigests, rank: int, ranks: int, group: Any = None
) -> str | None:
    """``damage`` over all ranks, each hashing its share; every rank gets the same answer."""
    found = damage(directory, recorded, (rank, ranks))
    if not dist.is_initialized() or ranks == 1:
        return found
    gathered: list[str | None] = [None] * ranks
    dist.all_gather_object(gathered, found, group=group)
    return next((problem for problem in gathered if problem), None)


def digest_record(path: Path) -> Path:
    """Where the digest of a file that stands alone (not in a checkpoint) is kept: beside it."""
    return path.with_name(f"{path.name}.digest.json")


def record_digest(path: Path) -> None:
    """Write ``path``'s size and SHA-256 beside it, for ``file_damage`` to check."""
    write_json_atomic(digest_record(path), {path.name: file_digest(path)})


def file_damage(path: Path) -> str | None:
    """What is wrong with a file ``record_digest`` recorded (a missing record included), or None."""
    record = digest_record(path)
    if not record.is_file():
        return f"{path}: no digest recorded beside it ({record.name}), so it cannot be verified"
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{record}: unreadable ({error})"
    return damage(path.parent, recorded, whole_directory=False)
