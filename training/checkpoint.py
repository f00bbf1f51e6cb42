"""Checkpoints: DeepSpeed's model and optimizer shards plus the trainer's own state, saved so
that a crash at any moment leaves the previous checkpoint loadable.

Layout of the checkpoint directory::

    latest                      the tag of the newest complete checkpoint (DeepSpeed reads it too)
    step_00000100/              DeepSpeed's files for step 100 (one set per rank)
        rng/rank00000.pt        each rank's torch RNG states
        experts/                with engine.expert_parallel > 1: each rank's part of its experts'
                                weights and Adam moments (training/expert_optimizer.py)
        trainer_state.json      written last: a tag directory without it is incomplete; it
                                records the size and SHA-256 of every file above

Saving writes DeepSpeed's shards and the RNG states, waits for every rank, then writes
``trainer_state.json`` and only then moves ``latest`` (an atomic rename). A crash before that
leaves ``latest`` on the previous checkpoint, and the incomplete directory is removed at the
next save or resume.

Before a resume the chosen checkpoint's files are checked against those digests
(training/digests.py); with ``checkpoint.resume: latest`` a damaged one is passed over for the
newest intact one. Loading unpickles data only (training/safe_load.py).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.errors import KinoeError
from training import safe_load
from training.config import CheckpointConfig
from training.digests import FileDigests, agreed_damage, digesting_engine, gather
from training.expert_optimizer import EXPERTS_DIR
from training.world import World

LATEST = "latest"
STATE_FILE = "trainer_state.json"
RNG_DIR = "rng"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    """The directory name of the checkpoint after ``step`` optimizer steps."""
    return f"step_{step:08d}"


@dataclass
class TrainerState:
    """Everything besides weights and optimizer moments that a resumed run needs."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens_by_source: dict[str, int] = field(default_factory=dict)
    samples_by_source: dict[str, int] = field(default_factory=dict)
    skipped_steps: int = 0
    world_size: int = 1
    zero_stage: int = 0
    # engine.expert_parallel of the run that wrote it; > 1: the experts are in experts/.
    expert_parallel: int = 1
    # What the global sample order was computed from; resuming with another order would
    # repeat or skip samples, so it must match.
    data_order: dict[str, Any] = field(default_factory=dict)
    # Size and SHA-256 of every file of the checkpoint, by path inside its tag directory.
    files: FileDigests = field(default_factory=dict)

    @classmethod
    def from_json(cls, path: Path) -> TrainerState:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise KinoeError(f"{path}: unreadable trainer state ({error})") from None


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class Checkpointer:
    """Saves, finds, loads and prunes the checkpoints of one run."""

    def __init__(
        self,
        directory: Path,
        config: CheckpointConfig,
        world: World,
        logger: logging.Logger,
    ):
        self.directory = Path(directory)
        self.config = config
        self.world = world
        self.logger = logger

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        if not self.directory.is_dir():
            return []
        steps = []
        for entry in self.directory.iterdir():
            match = _TAG.match(entry.name)
            if match and (entry / STATE_FILE).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The step ``latest`` names, or None when there is no complete checkpoint."""
        pointer = self.directory / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text(encoding="utf-8").strip()
        match = _TAG.match(tag)
        if not match or not (self.directory / tag / STATE_FILE).is_file():
            raise KinoeError(
                f"{pointer} names {tag!r}, which is not a complete checkpoint; set "
                "checkpoint.resume=<step> to one of "
                f"{self.complete_steps() or 'none (no complete checkpoint)'}"
            )
        return int(match.group(1))

    def step_to_resume(self) -> int | None:
        """The step to resume from as ``checkpoint.resume`` asks, or None to start fresh."""
        resume = self.config.resume
        if resume == "none":
            if self.complete_steps():
                raise KinoeError(
                    f"checkpoint.resume=none but {self.directory} holds checkpoints "
                    f"{self.complete_steps()}; resume from them (checkpoint.resume=latest), or "
                    "start over with --force (which deletes them) or a new run.name"
                )
            return None
        if resume == "latest":
            newest = self.latest_step()
            if newest is None:
                return None
            candidates = [step for step in reversed(self.complete_steps()) if step <= newest]
        elif resume not in self.complete_steps():
            raise KinoeError(
                f"checkpoint.resume={resume}: no complete checkpoint for that step in "
                f"{self.directory}; complete ones: {self.complete_steps() or 'none'}"
            )
        else:
            candidates = [int(resume)]
        problems = []
        for step in candidates:
            problem = self._damage(step)
            if problem is None:
                if problems and self.world.is_main:
                    self.logger.warning(
                        "checkpoint.resume=latest: resuming from %s, the newest intact checkpoint",
                        tag_for(step),
                    )
                return step
            problems.append(problem)
            if self.world.is_main:
                self.logger.warning("checkpoint %s is damaged: %s", tag_for(step), problem)
        if resume != "latest":
            raise KinoeError(
                f"{problems[0]}; checkpoint.resume={resume} is damaged: restore it or resume from "
                f"another (complete: {self.complete_steps()})"
            )
        raise KinoeError(
            f"{problems[0]}; every complete checkpoint in {self.directory} is damaged: restore "
            "one from a copy, or start over with --force (which deletes them)"
        )

    def _damage(self, step: int) -> str | None:
        """What is wrong with checkpoint ``step``'s files (checked over all ranks), or None."""
        target = self.directory / tag_for(step)
        try:
            recorded = TrainerState.from_json(target / STATE_FILE).files
        except KinoeError as error:
            return str(error)
        if not recorded:
            if self.world.is_main:
                self.logger.warning(
                    "%s records no file digests (written before kinoe recorded them): loading "
                    "it unverified",
                    target,
                )
            return None
        return agreed_damage(target, recorded, self.world.rank, self.world.size, self.world.control)

    def _check_expert_kind(self, target: Path, state: TrainerState, expert_parallel: int) -> None:
        """Refuse to mix experts saved apart (expert parallelism) with experts in DeepSpeed's state."""
        sharded = (target / EXPERTS_DIR).is_dir()
        if sharded and expert_parallel == 1:
            raise KinoeError(
                f"{target} was written with engine.expert_parallel {state.expert_parallel} (the "
                "experts saved apart from DeepSpeed's state); resume with engine.expert_parallel "
                "> 1 (any divisor of the ranks and of the experts)"
            )
        if not sharded and expert_parallel > 1:
            raise KinoeError(
                f"{target} was written without expert parallelism (the experts are in "
                "DeepSpeed's state); resume with engine.expert_parallel 1"
            )

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def remove_incomplete(self) -> None:
        """Delete tag directories a crash left without ``trainer_state.json`` (rank 0)."""
        if self.world.is_main and self.directory.is_dir():
            for entry in sorted(self.directory.iterdir()):
                if _TAG.match(entry.name) and not (entry / STATE_FILE).is_file():
                    self.logger.warning("removing incomplete checkpoint %s", entry)
                    shutil.rmtree(entry)
        self._barrier()

    def save(
        self, engine, state: TrainerState, while_writing: Callable[[int], None] | None = None
    ) -> Path:
        """Write the checkpoint for ``state.step`` on every rank, then move ``latest`` to it.

        ``while_writing(step)`` runs after this rank's shards are written and before the
        checkpoint is marked complete: the moment a crash drill kills the run.
        """
        started = time.perf_counter()
        tag = tag_for(state.step)
        target = self.directory / tag
        if self.world.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            if target.exists():  # an earlier attempt at this step that did not finish
                shutil.rmtree(target)
        self._barrier()
        files = digesting_engine(engine)
        engine.save_checkpoint(str(self.directory), tag=tag, save_latest=False)
        rng_dir = target / RNG_DIR
        rng_dir.mkdir(parents=True, exist_ok=True)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        files.save(rng, str(rng_dir / f"rank{self.world.rank:05d}.pt"))
        if engine.expert_optimizer is not None:
            engine.expert_optimizer.save(target, files)
        if while_writing is not None:
            while_writing(state.step)
        written = files.written(target)
        waited = files.waited_s
        digests = gather(written, self.world.control)
        self._barrier()
        if self.world.is_main:
            record = asdict(replace(state, files=digests))
            _write_atomically(target / STATE_FILE, json.dumps(record, indent=2) + "\n")
            _write_atomically(self.directory / LATEST, tag + "\n")
            self._prune(state.step)
        self._barrier()
        self.logger.info(
            "checkpoint %s saved in %.2f s: %d files, %.2f GB; this rank waited %.2f s for "
            "digests after its last write",
            target,
            time.perf_counter() - started,
            len(digests),
            sum(entry["bytes"] for entry in digests.values()) / 1e9,
            waited,
        )
        return target

    def _prune(self, newest: int) -> None:
        steps = self.complete_steps()
        keep = set(steps[-self.config.keep_last :]) | {newest}
        if self.config.keep_every:
            keep |= {step for step in steps if step % self.config.keep_every == 0}
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.directory / tag_for(step), ignore_errors=True)

    def check_resumable(self, step: int, current: TrainerState) -> TrainerState:
        """The trainer state of ``step``'s checkpoint, after refusing in one line what this run
        (described by ``current``) cannot resume from it: another data order, another number of
        ranks without a universal checkpoint, the other kind of expert checkpoint.

        Reads only ``trainer_state.json``, so a trainer calls it before building its model and
        a wrong setting is refused in seconds; ``load`` calls it again.
        """
        target = self.directory / tag_for(step)
        state = TrainerState.from_json(target / STATE_FILE)
        if state.data_order != current.data_order:
            changed = sorted(
                key
                for key in state.data_order.keys() | current.data_order.keys()
                if state.data_order.get(key) != current.data_order.get(key)
            )
            raise KinoeError(
                f"{target}: the data order differs from this run's ({', '.join(changed)} changed); "
                "resuming would repeat or skip samples. Restore the original data settings or "
                "start a new run"
            )
        tag = tag_for(step)
        convert = (
            "convert it once with `python -m deepspeed.checkpoint.ds_to_universal "
            f"--input_folder {target} --output_folder {target}_universal` and resume with "
            "checkpoint.load_universal=true"
        )
        if self.config.load_universal:
            tag = f"{tag}_universal"
            if not (self.directory / tag).is_dir():
                raise KinoeError(
                    f"checkpoint.load_universal=true but {self.directory / tag} is missing; "
                    + (
                        "this run has as many ranks as wrote the checkpoint, so set "
                        "checkpoint.load_universal=false"
                        if state.world_size == self.world.size
                        else convert
                    )
                )
        elif state.world_size != self.world.size:
            raise KinoeError(
                f"{target} was written by {state.world_size} ranks but this run has "
                f"{self.world.size}; DeepSpeed cannot reshard ZeRO-{state.zero_stage} state "
                f"directly: {convert}"
            )
        self._check_expert_kind(target, state, current.expert_parallel)
        return state

    def load(self, engine, step: int, current: TrainerState) -> TrainerState:
        """Load the checkpoint of ``step`` into ``engine``; return its trainer state."""
        state = self.check_resumable(step, current)
        target, tag = self.directory / tag_for(step), tag_for(step)
        if self.config.load_universal:
            tag = f"{tag}_universal"
        digesting_engine(engine)
        try:
            with safe_load.weights_only_loads():
                loaded, _ = engine.load_checkpoint(
                    str(self.directory),
                    tag=tag,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                )
        except pickle.UnpicklingError as error:
            raise safe_load.refused(self.directory / tag, error) or KinoeError(
                f"{self.directory / tag}: cannot unpickle the DeepSpeed checkpoint "
                f"({str(error).splitlines()[0]}); resume from an earlier one with "
                f"checkpoint.resume=<step> ({self.complete_steps()})"
            ) from None
        except (FileNotFoundError, RuntimeError, KeyError, EOFError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise KinoeError(
                f"{self.directory / tag}: cannot load the DeepSpeed checkpoint ({first}); it is "
                "damaged: resume from an earlier one with checkpoint.resume=<step> "
                f"({self.complete_steps()})"
            ) from None
        if loaded is None:
            raise KinoeError(f"{target}: DeepSpeed found no checkpoint to load there")
        if engine.expert_optimizer is not None:
            engine.expert_optimizer.load(
                target,
                f"resume from another checkpoint with checkpoint.resume=<step> "
                f"({self.complete_steps()})",
            )
        rng_file = target / RNG_DIR / f"rank{self.world.rank:05d}.pt"
        if state.world_size == self.world.size and rng_file.is_file():
            rng = safe_load.load(
                rng_file, "resume from another checkpoint (checkpoint.resume=<step>)"
            )
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        self.logger.info("resumed from %s (step %d)", target, state.step)
        return state
