"""Model architectures: one package per family, each with args, model and state-dict adapter.

``FAMILIES`` is how the rest of kinoe finds a family by the name its config gives; adding a
family is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from common.config import Config
from models import mistral, mixtral
from models.mistral import state_dict as mistral_state_dict
from models.mixtral import state_dict as mixtral_state_dict


@dataclass(frozen=True)
class ModelFamily:
    """A family's args type, named presets, model class and Hugging Face adapter.

    ``to_hf``/``from_hf`` rename a state dict between kinoe's and Hugging Face's parameter
    names (values untouched); ``hf_config`` gives the transformers config of the same
    architecture, whose ``architectures[0]`` is the Hugging Face model class, and
    ``args_from_hf`` is its inverse.
    """

    name: str
    args_type: type[Config]
    presets: dict[str, Callable[[], Config]]
    model_type: Callable[[Config], nn.Module]
    to_hf: Callable[[dict[str, Any]], dict[str, Any]]
    from_hf: Callable[[dict[str, Any]], dict[str, Any]]
    hf_config: Callable[[Config], Any]
    args_from_hf: Callable[[Any], Config]


FAMILIES: dict[str, ModelFamily] = {
    "mistral": ModelFamily(
        "mistral",
        mistral.MistralArgs,
        mistral.PRESETS,
        mistral.Mistral,
        mistral_state_dict.to_hf,
        mistral_state_dict.from_hf,
        mistral_state_dict.hf_config,
        mistral_state_dict.args_from_hf_config,
    ),
    "mixtral": ModelFamily(
        "mixtral",
        mixtral.MixtralArgs,
        mixtral.PRESETS,
        mixtral.Mixtral,
        mixtral_state_dict.to_hf,
        mixtral_state_dict.from_hf,
        mixtral_state_dict.hf_config,
        mixtral_state_dict.args_from_hf_config,
    ),
}
