"""Digests of the files a checkpoint wrote, recorded then and checked before it is trusted.

A byte flipped inside a tensor leaves a checkpoint loadable: the run resumes from damaged
weights and finishes ``complete``. So every file a checkpoint writes (DeepSpeed's shards
through its checkpoint engine, and kinoe's RNG states) is hashed as it is written, and the
size and digest of each go into ``trainer_state.json``. Resume, ``kinoe convert`` and
fine-tuning's resume check them first; the check of one checkpoint is spread over the ranks,
each hashing its share with a few threads.

The digest is XXH3-128 (``xxhash``): it guards against damage (a flipped byte, a torn or
truncated write, a file from another checkpoint), not against forgery, which is the safe
loader's job (training/safe_load.py). At ~25 GB/s a core it adds well under a second to a
16 GB checkpoint, where SHA-256 (~1.5 GB/s) stalled each mistral_1b checkpoint 9 s on one
H200 (docs/benchmarks.md). Checkpoints recorded with SHA-256 (before) are still verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch.distributed as dist
import xxhash
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from common.errors import KinoeError
from common.manifest import file_hexdigest, write_json_atomic
from training import safe_load

# The files of one checkpoint directory: path relative to it -> {"bytes": n, "xxh3_128": hex}
# ("sha256" in checkpoints written before XXH3).
FileDigests = dict[str, dict[str, Any]]

_VERIFY_THREADS = max(1, min(4, os.cpu_count() or 1))


# The digest recorded for new files; ``damage`` also accepts the older SHA-256 records.
ALGORITHM = "xxh3_128"
_HASHERS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_SHOWN = {"xxh3_128": "XXH3-128", "sha256": "SHA-256"}


def file_digest(path: Path) -> dict[str, Any]:
    """The size and digest of one file."""
    return {"bytes": path.stat().st_size, ALGORITHM: file_hexdigest(path, _HASHERS[ALGORITHM])}


def recorded_algorithm(entry: dict[str, Any]) -> str | None:
    """Which digest a record holds: XXH3-128, or SHA-256 in checkpoints written before it."""
    return next((name for name in _HASHERS if name in entry), None)


class HashingFile:
    """A binary file open for writing, hashed as the bytes go in (no second read of the file).

    ``torch.save`` writes a tensor's bytes through ``write`` in large chunks, each hashed as
    it passes. No ``fileno``: torch would write around ``write``.
    """

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.hasher = _HASHERS[ALGORITHM]()
        self.bytes = 0

    def write(self, data: Any) -> int:
        self.hasher.update(data)
        self.bytes += memoryview(data).nbytes
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def digest(self) -> dict[str, Any]:
        return {"bytes": self.bytes, ALGORITHM: self.hasher.hexdigest()}


class DigestingCheckpointEngine:
    """DeepSpeed's checkpoint engine with every saved file hashed as it is written.

    Wraps the engine DeepSpeed built (so its settings, e.g. the serialization format, stay).
    DeepSpeed's torch engine is handed a ``HashingFile`` in place of the path, so the digest
    is ready when the write ends; any other engine's files are hashed from disk in a
    background thread while the next file is written. Its ``load`` unpickles data only and
    names a refused file; loads DeepSpeed makes without its checkpoint engine are held to the
    same rule by ``safe_load.weights_only_loads``.
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-digest")
        self._pending: dict[Path, Future] = {}
        self._streamed: dict[Path, dict[str, Any]] = {}
        # Seconds the last ``written`` call waited for hashing after the last file was
        # written: what digests add to a checkpoint's stall (the rest overlaps the writes).
        self.waited_s = 0.0

    def save(self, state_dict: Any, path: str) -> None:
        if not isinstance(self.inner, TorchCheckpointEngine):
            self.inner.save(state_dict, path)
            self._pending[Path(path)] = self._hasher.submit(file_digest, Path(path))
            return
        with open(path, "wb") as handle:
            hashing = HashingFile(handle)
            self.inner.save(state_dict, hashing)
        self._streamed[Path(path)] = hashing.digest()

    def load(self, path: str, map_location: Any = None) -> Any:
        what_to_do = "resume from another checkpoint (checkpoint.resume=<step>) or restore it"
        return safe_load.load(Path(path), what_to_do, map_location=map_location or "cpu")

    def written(self, root: Path) -> FileDigests:
        """The digests of the files saved since the last call, relative to ``root``; waits for them."""
        started = time.perf_counter()
        done = self._streamed | {path: future.result() for path, future in self._pending.items()}
        digests = {
            path.resolve().relative_to(root.resolve()).as_posix(): digest
            for path, digest in done.items()
        }
        self._pending.clear()
        self._streamed.clear()
        self.waited_s = time.perf_counter() - started
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
        if recorded_algorithm(recorded[name]) is None:
            problems.append(f"{path}: no digest recorded for it, so it cannot be verified")
        elif not path.is_file():
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
        algorithms = [recorded_algorithm(recorded[name]) for name in to_hash]
        hashes = pool.map(
            lambda name, algorithm: file_hexdigest(directory / name, _HASHERS[algorithm]),
            to_hash,
            algorithms,
        )
        for name, algorithm, digest in zip(to_hash, algorithms, hashes, strict=True):
            if digest != recorded[name][algorithm]:
                return (
                    f"{directory / name}: its {_SHOWN[algorithm]} digest differs from the one "
                    "recorded when the checkpoint was written"
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
    """Write ``path``'s size and digest beside it, for ``file_damage`` to check."""
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
