"""Hugging Face Mistral and Mixtral directories as conversion sources: architecture and tensors.

``config.json``'s ``model_type`` decides the family (Hugging Face's model types are kinoe's
family names); each family's ``args_from_hf`` maps its Hugging Face config back to kinoe's args.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import Config
from common.errors import KinoeError
from convert.experts import stack_experts
from convert.safetensors_shards import read_sharded
from convert.sources import Source, family_of, tie
from models import FAMILIES

HF_PREFIX = "model"
HF_EMBEDDING, HF_OUTPUT = "model.embed_tokens.weight", "lm_head.weight"


# Hugging Face model_type -> (kinoe family, its args from the Hugging Face config).
ARGS_FROM_HF: dict[str, tuple[str, Callable[[Any], Config]]] = {
    name: (name, family.args_from_hf) for name, family in FAMILIES.items()
}


def read_hf_config(hf_dir: Path) -> Any:
    """The transformers config of the model in ``hf_dir`` (its config.json)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    if not (hf_dir / "config.json").is_file():
        raise KinoeError(
            f"hf_model = {hf_dir} has no config.json; point hf_model at a Hugging Face model directory"
        )
    try:
        return AutoConfig.from_pretrained(str(hf_dir))
    except (ValueError, OSError, KeyError, TypeError, StrictDataclassError) as error:
        # A wrongly typed field ("hidden_size": "big") is a StrictDataclassError, no ValueError.
        reason = " ".join(str(error).split())
        raise KinoeError(
            f"{hf_dir / 'config.json'}: transformers cannot read it ({reason[:200]}); fix the file"
        ) from None


def hf_args(hf_dir: Path) -> tuple[str, Config, Any]:
    """The kinoe family, args and transformers config of the Hugging Face model in ``hf_dir``."""
    config = read_hf_config(hf_dir)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARGS_FROM_HF:
        raise KinoeError(
            f"{hf_dir / 'config.json'}: model_type {model_type!r} is not one kinoe converts "
            f"({', '.join(ARGS_FROM_HF)})"
        )
    family, to_args = ARGS_FROM_HF[model_type]
    family_of(family)  # registered in this kinoe?
    try:
        args = to_args(config)
    except ValueError as error:
        first = str(error).splitlines()[0]
        raise KinoeError(f"{hf_dir / 'config.json'}: {first}") from None
    return family, args, config


def hf_source(hf_dir: Path) -> Source:
    """The weights of a Hugging Face Mistral or Mixtral directory under kinoe's names, unread."""
    hf_dir = Path(hf_dir)
    family, args, config = hf_args(hf_dir)
    if not any(hf_dir.glob("*.safetensors")):
        raise KinoeError(
            f"{hf_dir} has no .safetensors weights (pickled .bin files are not read, they can run "
            "code); save the model with save_pretrained(safe_serialization=True) first"
        )
    tensors = read_sharded(hf_dir, HF_PREFIX)
    if getattr(args, "tie_embeddings", False):
        tensors = tie(tensors, HF_EMBEDDING, HF_OUTPUT)
    try:
        renamed = family_of(family).from_hf(stack_experts(tensors))
    except ValueError as error:
        raise KinoeError(f"{hf_dir}: {str(error).splitlines()[0]}") from None
    provenance = {
        "kind": "huggingface",
        "directory": str(hf_dir),
        "model_type": config.model_type,
        "name_or_path": getattr(config, "_name_or_path", "") or str(hf_dir),
    }
    return Source(family, args, renamed, provenance, hf_dir)
