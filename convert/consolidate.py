"""DeepSpeed ZeRO checkpoints (stage 1, 2 or 3, any number of ranks) as fp32 tensors read one at a time.

The fp32 master weights live in the optimizer shards, partitioned over the ranks that wrote
them. Every shard is opened memory-mapped, so what is read from disk is what one tensor
needs; the Adam moments beside the weights are never touched.

Before anything is read the checkpoint is checked whole: ``trainer_state.json`` (kinoe writes
it last, so a directory without it is incomplete), one optimizer shard per rank of the
``world_size`` that wrote it, the model-states files, every file's SHA-256 against the one
recorded when the checkpoint was written (training/digests.py, the check resume makes), and
every file unpickled under ``weights_only`` with only DeepSpeed's own checkpoint classes
allowed (training/safe_load.py). Each problem is one line naming the file and what to do.

ZeRO-3 goes through DeepSpeed's ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` in
lazy mode, which gathers each parameter's partitions when it is asked for (its own loads are
forced to ``weights_only`` too). For ZeRO-1/2 that
function first concatenates every rank's partition into one full fp32 copy of the model, so
``_zero2_tensors`` follows the same layout rules (the same offsets, alignment paddings and
consistency check) but slices each parameter out of the memory-mapped partitions on its own;
a test checks it tensor for tensor against DeepSpeed's result.

A checkpoint of expert parallelism holds the experts apart, in ``experts/`` (each rank's part
of its experts' fp32 masters, training/expert_optimizer.py): each expert parameter is read
from there, stacked over the experts as a run without expert parallelism saves it.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from common.config import read_yaml
from common.errors import KinoeError
from common.logs import get_logger
from common.manifest import read_manifest
from convert.sources import Source, TensorRef
from training import safe_load
from training.checkpoint import LATEST, STATE_FILE, TrainerState, tag_for
from training.digests import damage
from training.expert_optimizer import EXPERTS_DIR, ExpertCheckpoint

CONFIG_FILE = "config.yaml"
_TAG = re.compile(r"^step_(\d{8})$")
_OPTIM = re.compile(r"^(?:\w+_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_MODEL_ZERO3 = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
MODEL_STATES = "mp_rank_00_model_states.pt"


def is_pretrain_run(path: Path) -> bool:
    """True when ``path`` holds a pretrain run's ``config.yaml`` (model, data and train sections)."""
    if not (path / CONFIG_FILE).is_file():
        return False
    return {"model", "data", "train"} <= read_yaml(path / CONFIG_FILE).keys()


def checkpoints_dir(run_dir: Path) -> Path:
    """Where a pretrain run keeps its checkpoints (``checkpoint.directory`` or ``checkpoints/``)."""
    section = read_yaml(run_dir / CONFIG_FILE).get("checkpoint") or {}
    return Path(section["directory"]) if section.get("directory") else run_dir / "checkpoints"


def complete_steps(directory: Path) -> list[int]:
    """Steps with a complete checkpoint (``trainer_state.json`` written), ascending."""
    if not directory.is_dir():
        return []
    return sorted(
        int(match.group(1))
        for entry in directory.iterdir()
        if (match := _TAG.match(entry.name)) and (entry / STATE_FILE).is_file()
    )


def resolve_tag(run_dir: Path, step: str | int) -> Path:
    """The tag directory of checkpoint ``step`` (``latest`` or a step number) of a pretrain run."""
    directory = checkpoints_dir(run_dir)
    steps = complete_steps(directory)
    if step == "latest":
        pointer = directory / LATEST
        if not pointer.is_file():
            raise KinoeError(
                f"{directory} has no '{LATEST}' file: the run saved no complete checkpoint yet; "
                f"complete ones: {steps or 'none'}"
            )
        tag = pointer.read_text(encoding="utf-8").strip()
    else:
        tag = tag_for(int(step))
    target = directory / tag
    if not (target / STATE_FILE).is_file():
        raise KinoeError(
            f"{target} is not a complete checkpoint (no {STATE_FILE}: missing, or the run stopped "
            f"while writing it); set step=<n> to one of {steps or 'none (no complete checkpoint)'}"
        )
    return target


def deepspeed_source(run_dir: Path, step: str | int) -> Source:
    """The fp32 weights of checkpoint ``step`` of the pretrain run in ``run_dir``, unread."""
    from pretrain.config import ModelConfig

    tag_dir = resolve_tag(run_dir, step)
    model = ModelConfig.model_validate(read_yaml(run_dir / CONFIG_FILE).get("model") or {})
    state = TrainerState.from_json(tag_dir / STATE_FILE)
    tensors = deepspeed_tensors(tag_dir, state)
    manifest = read_manifest(run_dir)
    provenance: dict[str, Any] = {
        "kind": "deepspeed",
        "pretrain_run": str(run_dir),
        "checkpoint": str(tag_dir),
        "step": state.step,
        "zero_stage": state.zero_stage,
        "world_size": state.world_size,
        "consumed_tokens_by_source": state.consumed_tokens_by_source,
        "model": model.model_dump(mode="json"),
    }
    if manifest is not None:
        provenance["pretrain_manifest"] = {
            "status": manifest.status,
            "fingerprint": manifest.fingerprint,
            "git": manifest.git,
            "inputs": {key: record.sha256 for key, record in manifest.inputs.items()},
        }
        tokenizer = manifest.inputs.get("data.tokenizer")
        if tokenizer is not None and len(tokenizer.files) == 1:
            provenance["tokenizer_sha256"] = tokenizer.files[0].sha256
    return Source(model.family, model.build_args(), tensors, provenance)


def deepspeed_tensors(tag_dir: Path, state: TrainerState) -> dict[str, TensorRef]:
    """Every parameter of the checkpoint in ``tag_dir`` under its model name, fp32, unread."""
    optim_files, model_files = _shard_files(tag_dir, state)
    _check_digests(tag_dir, state)
    model_states = [_load(path) for path in model_files]
    optim_states = [_load(path) for path in optim_files]
    for path, loaded in zip(model_files, model_states, strict=True):
        if "param_shapes" not in loaded or "buffer_names" not in loaded:
            raise KinoeError(
                f"{path}: not a DeepSpeed model-states file; the checkpoint is damaged"
            )
    for path, loaded in zip(optim_files, optim_states, strict=True):
        if "zero_stage" not in loaded.get("optimizer_state_dict", {}):
            raise KinoeError(
                f"{path}: not a DeepSpeed ZeRO optimizer shard; the checkpoint is damaged"
            )
    stage = int(optim_states[0]["optimizer_state_dict"]["zero_stage"])
    if stage != state.zero_stage:
        raise KinoeError(
            f"{optim_files[0]} is a ZeRO-{stage} shard but {tag_dir / STATE_FILE} says ZeRO-"
            f"{state.zero_stage}; the directory mixes two checkpoints: convert another step"
        )
    if stage == 3:
        lazy = _zero3_tensors(tag_dir)
    else:
        lazy = _zero2_tensors(model_states[0], [s["optimizer_state_dict"] for s in optim_states])
    refs: dict[int, TensorRef] = {}
    tensors = {}
    for name, value in lazy.items():
        if id(value) not in refs:  # a tied parameter is one object under both names
            refs[id(value)] = TensorRef(
                tuple(value.shape), torch.float32, lambda value=value: _materialise(value)
            )
        tensors[name] = refs[id(value)]
    if (tag_dir / EXPERTS_DIR).is_dir():
        tensors.update(_expert_tensors(tag_dir))
    return tensors


def _expert_tensors(tag_dir: Path) -> dict[str, TensorRef]:
    """Expert parallelism's experts, saved apart from DeepSpeed's state: each parameter stacked
    over all experts, as without expert parallelism, read from the parts when asked for."""
    parts = ExpertCheckpoint(tag_dir, _fix(tag_dir))
    E = parts.layout.num_experts

    def stacked(name: str) -> torch.Tensor:
        return torch.stack([parts.expert(name, expert) for expert in range(E)])

    return {
        name: TensorRef((E, *shape), torch.float32, lambda name=name: stacked(name))
        for name, shape in parts.layout.params
    }


def _materialise(value: Any) -> torch.Tensor:
    tensor = value.contiguous() if not isinstance(value, torch.Tensor) else value
    return tensor.float()


def _shard_files(tag_dir: Path, state: TrainerState) -> tuple[list[Path], list[Path]]:
    """The optimizer shards (one per rank) and model-states files, checked complete."""
    world = state.world_size
    names = [entry.name for entry in tag_dir.iterdir()]
    optim = {int(m.group(1)): tag_dir / n for n in names if (m := _OPTIM.match(n))}
    if state.zero_stage == 3:
        model = {int(m.group(1)): tag_dir / n for n in names if (m := _MODEL_ZERO3.match(n))}
    else:
        model = {0: tag_dir / MODEL_STATES} if MODEL_STATES in names else {}
    model_ranks = range(world) if state.zero_stage == 3 else range(1)
    fix = _fix(tag_dir)
    for rank in range(world):
        if rank not in optim:
            expected = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            raise KinoeError(
                f"{tag_dir}: {expected} is missing (rank {rank} of the {world} that wrote step "
                f"{state.step}); the checkpoint is incomplete: {fix}"
            )
    for rank in model_ranks:
        if rank not in model:
            expected = (
                f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
                if state.zero_stage == 3
                else MODEL_STATES
            )
            raise KinoeError(
                f"{tag_dir}: {expected} is missing; the checkpoint is incomplete: {fix}"
            )
    extra = sorted(set(optim) - set(range(world)))
    if extra:
        raise KinoeError(
            f"{tag_dir} holds optimizer shards of ranks {extra} but {STATE_FILE} says "
            f"{world} ranks wrote it; the directory mixes two checkpoints: {fix}"
        )
    return [optim[rank] for rank in range(world)], [model[rank] for rank in model_ranks]


def _check_digests(tag_dir: Path, state: TrainerState) -> None:
    """Refuse a checkpoint whose files differ from the digests recorded when it was written."""
    if not state.files:
        get_logger("convert").warning(
            "%s records no file digests (written before kinoe recorded them): converting it "
            "unverified",
            tag_dir,
        )
        return
    problem = damage(tag_dir, state.files)
    if problem is not None:
        raise KinoeError(f"{problem}; the file is corrupt or was replaced: {_fix(tag_dir)}")


def _load(path: Path) -> dict[str, Any]:
    """One DeepSpeed file, memory-mapped, unpickled with only tensors and DeepSpeed's own classes."""
    loaded = safe_load.load(path, _fix(path.parent), mmap=True)
    if not isinstance(loaded, dict):
        raise KinoeError(f"{path}: not a DeepSpeed checkpoint file; the checkpoint is damaged")
    return loaded


def _fix(tag_dir: Path) -> str:
    """What to do about a damaged checkpoint: restore it, or convert another complete one."""
    others = [s for s in complete_steps(tag_dir.parent) if tag_for(s) != tag_dir.name]
    if not others:
        return "restore it from a backup (the run has no other complete checkpoint)"
    return f"restore it, or convert another checkpoint with step=<n> (complete: {others})"


def _zero3_tensors(tag_dir: Path) -> dict[str, Any]:
    from deepspeed.utils import zero_to_fp32

    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), safe_load.weights_only_loads():
            state_dict = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True
            )
    except pickle.UnpicklingError as error:
        raise safe_load.refused(tag_dir, error) or KinoeError(
            f"{tag_dir}: DeepSpeed cannot unpickle this ZeRO-3 checkpoint; it is damaged"
        ) from None
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as error:
        raise KinoeError(
            f"{tag_dir}: DeepSpeed cannot consolidate this ZeRO-3 checkpoint "
            f"({str(error).splitlines()[0]}); it is damaged: convert another step"
        ) from None
    get_logger("convert").debug("zero_to_fp32: %s", log.getvalue().strip())
    return state_dict


def _zero2_tensors(
    model_states: dict[str, Any], optim_states: list[dict[str, Any]]
) -> dict[str, Any]:
    """Parameter name -> a lazy fp32 tensor, for a ZeRO-1 or ZeRO-2 checkpoint.

    Each parameter group is, over the ranks in order, one flat vector; its parameters lie in
    it back to back (in ``param_shapes`` order), each followed by its alignment padding.
    """
    groups_key = "single_partition_of_fp32_groups"
    partitions = [state[groups_key] for state in optim_states]  # [rank][group]
    paddings = optim_states[0].get("param_alignment_paddings")
    world = len(partitions)
    lazy: dict[str, Any] = {
        name: tensor
        for name, tensor in model_states["module"].items()
        if name in model_states["buffer_names"]
    }
    lazy.update(model_states.get("frozen_param_fragments") or {})
    for group, shapes in enumerate(model_states["param_shapes"]):
        pieces = [partitions[rank][group] for rank in range(world)]
        offset = 0
        for position, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            lazy[name] = _Slices(pieces, offset, numel, torch.Size(shape))
            offset += numel
            if paddings is not None:
                offset += paddings[group][position]
        # DeepSpeed pads each group to a multiple of 2 x world size; both ends must agree.
        align = 2 * world
        available = sum(piece.numel() for piece in pieces)
        if math.ceil(offset / align) != math.ceil(available / align):
            raise KinoeError(
                f"parameter group {group} holds {available} elements but its parameters need "
                f"{offset}; the optimizer shards do not belong to this model-states file"
            )
    for alias, name in (model_states.get("shared_params") or {}).items():
        if name in lazy:
            lazy[alias] = lazy[name]
    return lazy


class _Slices:
    """One parameter as ranges of the ranks' memory-mapped partitions, read on ``contiguous()``."""

    def __init__(self, pieces: list[torch.Tensor], offset: int, numel: int, shape: torch.Size):
        self.pieces, self.offset, self.numel, self.shape = pieces, offset, numel, shape

    def contiguous(self) -> torch.Tensor:
        parts = []
        start, end, base = self.offset, self.offset + self.numel, 0
        for piece in self.pieces:
            low, high = max(start, base), min(end, base + piece.numel())
            if low < high:
                parts.append(piece[low - base : high - base])
            base += piece.numel()
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return flat.view(self.shape)
