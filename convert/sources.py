"""Weights to convert: named tensors read one at a time, and the architecture they belong to.

Every conversion reads a ``Source`` and writes its tensors out one by one, so no step holds
more than one tensor of the model (plus what is being written) in memory. A source is a
DeepSpeed checkpoint of a pretrain run (``consolidate``) or a kinoe weights directory
(``initial``); ``open_source`` tells them apart by their files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import Config
from common.errors import KinoeError
from models import FAMILIES, ModelFamily


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A tensor not read yet: its shape and stored dtype, and how to read it.

    The same object under two names is one tensor shared by both (tied embeddings).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor] = field(repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Source:
    """A model's weights under kinoe's parameter names, with its family, args and provenance."""

    family: str
    args: Config
    tensors: dict[str, TensorRef]
    provenance: dict[str, Any]
    # A Hugging Face tokenizer directory that belongs to these weights, when the source has one.
    tokenizer: Path | None = None

    @property
    def model_family(self) -> ModelFamily:
        return family_of(self.family)

    @property
    def origin(self) -> str:
        """Where the weights come from, for messages: the checkpoint or the directory."""
        return str(self.provenance.get("checkpoint") or self.provenance.get("directory"))

    def num_parameters(self) -> int:
        """Elements of every distinct tensor (a tied matrix counts once)."""
        return sum(ref.numel for ref in unique(self.tensors).values())


def family_of(name: str) -> ModelFamily:
    """The registered model family ``name``, or a one-line error naming the ones there are."""
    if name not in FAMILIES:
        raise KinoeError(
            f"kinoe has no model family {name!r} (known: {', '.join(FAMILIES)}); "
            "this kinoe version cannot convert it"
        )
    return FAMILIES[name]


def unique(tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """``tensors`` with each shared tensor kept under its first name only.

    safetensors stores a tensor once; Hugging Face and kinoe both re-tie the second name
    (``lm_head.weight``, ``output.weight``) from the config when loading.
    """
    seen: set[int] = set()
    kept = {}
    for name, ref in tensors.items():
        if id(ref) not in seen:
            seen.add(id(ref))
            kept[name] = ref
    return kept


def tie(tensors: dict[str, TensorRef], first: str, second: str) -> dict[str, TensorRef]:
    """``tensors`` with ``second`` naming the same tensor as ``first`` (tied embeddings)."""
    if first not in tensors:
        return tensors
    return {**{k: v for k, v in tensors.items() if k != second}, second: tensors[first]}


def open_source(path: Path, step: str | int = "latest") -> Source:
    """The weights at ``path``: a pretrain run directory (checkpoint ``step``) or a weights directory."""
    from convert.consolidate import deepspeed_source, is_pretrain_run
    from convert.initial import is_weights_directory, weights_source

    path = Path(path)
    if is_weights_directory(path):
        return weights_source(path)
    if is_pretrain_run(path):
        return deepspeed_source(path, step)
    raise KinoeError(
        f"checkpoint = {path} is neither a pretrain run directory (config.yaml and checkpoints/) "
        "nor a `kinoe convert from-hf` directory (model.json and weights/); fix checkpoint in the config"
    )


def inference_args(args: Config) -> Config:
    """``args`` for comparing with Hugging Face: SDPA attention, and every expert assignment kept.

    Neither changes a weight: the attention backend is how the same attention is computed,
    and an expert capacity (dropping assignments) exists only in kinoe's training forward.
    """
    changes: dict[str, Any] = {"attention": "sdpa"}
    if "capacity_factor" in type(args).model_fields:
        changes["capacity_factor"] = None
    return type(args).model_validate({**args.model_dump(), **changes})


def distinct_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``model`` by name, a tied tensor under its first name only."""
    seen: set[int] = set()
    distinct = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            distinct[name] = tensor
    return distinct


def module_source(family: str, model: torch.nn.Module, provenance: dict[str, Any]) -> Source:
    """The weights of a built ``model`` of ``family`` (its ``args``) as a source."""
    tensors = {
        name: TensorRef(tuple(tensor.shape), tensor.dtype, lambda tensor=tensor: tensor.detach())
        for name, tensor in distinct_state(model).items()
    }
    if getattr(model.args, "tie_embeddings", False):
        tensors = tie(tensors, "tok_embeddings.weight", "output.weight")
    return Source(family, model.args, tensors, provenance)


def load_weights(model: torch.nn.Module, source: Source) -> None:
    """Copy ``source``'s tensors into ``model`` (built for its args), refusing any that do not fit."""
    targets = distinct_state(model)
    missing = sorted(targets.keys() - source.tensors.keys())
    unexpected = sorted(unique(source.tensors).keys() - targets.keys())
    misshaped = sorted(
        name
        for name in targets.keys() & source.tensors.keys()
        if tuple(source.tensors[name].shape) != tuple(targets[name].shape)
    )
    if missing or unexpected or misshaped:
        raise KinoeError(
            f"{source.origin}: the weights do not fit a {source.family} of these args "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, mis-shaped {misshaped[:3]})"
        )
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(source.tensors[name].read())
