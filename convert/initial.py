"""kinoe weights directories: a model's weights under kinoe's names, to start pretraining from.

``kinoe convert from-hf`` writes one (continual pretraining of an existing model)::

    weights/model.safetensors        kinoe parameter names (sharded with an index when large)
    model.json                       {"family", "args", "pretrain_model": the model section to train it}
    tokenizer/                       the Hugging Face tokenizer files that came with the model
    manifest.json, config.yaml, logs/

``load_initial_weights`` copies one into a freshly built model (``model.init_from``);
``kinoe convert to-hf`` reads one as its source (``checkpoint=<the directory>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from common.config import Config
from common.errors import KinoeError
from common.manifest import read_manifest
from convert.safetensors_shards import read_sharded, write_sharded
from convert.sources import Source, distinct_state, family_of, tie, unique
from training.partitioned import assign, full_shape

WEIGHTS_DIR = "weights"
MODEL_FILE = "model.json"
TOKENIZER_DIR = "tokenizer"
PREFIX = "model"
EMBEDDING, OUTPUT = "tok_embeddings.weight", "output.weight"
# Args that say how a model is computed or trained, not what its weights compute: they may
# differ between the weights and the model they start.
TRAINING_FIELDS = frozenset(
    {
        "attention",
        "init_std",
        "max_seq_len",
        "moe_implementation",
        "capacity_factor",
        "router_aux_loss_coef",
        "router_z_loss_coef",
    }
)


def is_weights_directory(path: Path) -> bool:
    """True when ``path`` has a ``model.json`` and a ``weights/`` directory."""
    return (path / MODEL_FILE).is_file() and (path / WEIGHTS_DIR).is_dir()


def read_model_json(directory: Path) -> tuple[str, Config, dict[str, Any]]:
    """The family, its validated args and the whole ``model.json`` of a weights directory."""
    path = directory / MODEL_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        family = family_of(data["family"])
        args = family.args_type.model_validate(data["args"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KinoeError(f"{path}: not a kinoe model.json ({first})") from None
    return family.name, args, data


def weights_source(directory: Path) -> Source:
    """The weights of a kinoe weights directory, unread."""
    family, args, data = read_model_json(directory)
    tensors = read_sharded(directory / WEIGHTS_DIR, PREFIX)
    if getattr(args, "tie_embeddings", False):
        tensors = tie(tensors, EMBEDDING, OUTPUT)
    provenance: dict[str, Any] = {
        "kind": "weights",
        "directory": str(directory),
        "converted_from": data.get("converted_from"),
    }
    manifest = read_manifest(directory)
    if manifest is not None:
        provenance["manifest"] = {
            "stage": manifest.stage,
            "status": manifest.status,
            "fingerprint": manifest.fingerprint,
            "inputs": {key: record.sha256 for key, record in manifest.inputs.items()},
        }
    tokenizer = directory / TOKENIZER_DIR
    return Source(family, args, tensors, provenance, tokenizer if tokenizer.is_dir() else None)


def write_weights_directory(
    source: Source, directory: Path, max_shard_bytes: int
) -> dict[str, Any]:
    """Write ``source`` as a kinoe weights directory (weights/ and model.json); what was written.

    Tensors keep their stored dtype, so bf16 weights stay bf16 and a round trip is exact.
    """
    weights = write_sharded(
        unique(source.tensors), directory / WEIGHTS_DIR, PREFIX, None, max_shard_bytes, "weights"
    )
    section = pretrain_model_section(source, directory)
    model_json = {
        "family": source.family,
        "args": source.args.model_dump(mode="json"),
        "pretrain_model": section,
        "converted_from": source.provenance,
    }
    (directory / MODEL_FILE).write_text(
        json.dumps(model_json, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return {"weights": weights, "pretrain_model": section}


def pretrain_model_section(source: Source, directory: Path) -> dict[str, Any]:
    """The pretrain config's ``model`` section that builds this architecture and starts from it.

    The family's preset needing the fewest overrides, and those overrides.
    """
    ours = source.args.model_dump(mode="json")
    choices = []
    for name, preset in source.model_family.presets.items():
        base = preset().model_dump(mode="json")
        overrides = {k: v for k, v in ours.items() if base.get(k) != v and k != "attention"}
        choices.append((len(overrides), name, overrides))
    _, preset, overrides = min(choices, key=lambda choice: choice[0])
    return {
        "family": source.family,
        "preset": preset,
        "overrides": overrides,
        "init_from": str(directory),
    }


def architecture_differences(weights: Config, model: Config) -> list[str]:
    """``field: weights' value != model's value`` for each architecture field that differs."""
    ours, theirs = model.model_dump(), weights.model_dump()
    return [
        f"{name}={theirs.get(name)!r} (the model has {ours.get(name)!r})"
        for name in sorted(ours.keys() | theirs.keys())
        if name not in TRAINING_FIELDS and ours.get(name) != theirs.get(name)
    ]


def load_initial_weights(model: nn.Module, directory: Path, is_main: bool = True) -> None:
    """Copy the weights directory ``directory`` into the freshly built ``model``, tensor by tensor.

    Refuses, in one line, weights of another family or architecture, and any missing,
    unexpected or mis-shaped tensor; nothing is copied unless everything matches. A model
    built into ZeRO-3 partitions is filled one tensor at a time, read by the main rank only.
    """
    directory = Path(directory)
    if not is_weights_directory(directory):
        raise KinoeError(
            f"initial weights {directory}: not a kinoe weights directory (model.json and "
            "weights/); make one with `kinoe convert from-hf`"
        )
    family, args, data = read_model_json(directory)
    expected_type = family_of(family).model_type
    if isinstance(expected_type, type) and not isinstance(model, expected_type):
        raise KinoeError(
            f"initial weights {directory} are a {family} model but this run builds a "
            f"{type(model).__name__}; set model.family: {family} (model.json has the whole model section)"
        )
    model_args = getattr(model, "args", None)
    if model_args is not None:
        differences = architecture_differences(args, model_args)
        if differences:
            raise KinoeError(
                f"initial weights {directory} have {', '.join(differences[:4])}"
                f"{f' and {len(differences) - 4} more' if len(differences) > 4 else ''}; "
                f"set model.preset/model.overrides to match: {json.dumps(data.get('pretrain_model', {}))}"
            )
    tensors = read_sharded(directory / WEIGHTS_DIR, PREFIX)
    targets = distinct_state(model)
    missing = sorted(targets.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - targets.keys())
    misshaped = [
        f"{name} {tensors[name].shape} (the model has {full_shape(targets[name])})"
        for name in targets.keys() & tensors.keys()
        if tensors[name].shape != full_shape(targets[name])
    ]
    problems = [
        *([f"missing {_first(missing)}"] if missing else []),
        *([f"unexpected {_first(unexpected)}"] if unexpected else []),
        *([f"mis-shaped {_first(sorted(misshaped))}"] if misshaped else []),
    ]
    if problems:
        raise KinoeError(f"initial weights {directory}: {'; '.join(problems)}")
    for name, target in targets.items():
        assign(target, tensors[name].read, is_main)


def _first(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
