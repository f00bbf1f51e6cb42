"""Mixtral: Mistral's decoder with each MLP replaced by a sparse mixture of SwiGLU experts.

``args`` holds the config and presets, ``moe`` the router and experts, ``model`` the
architecture, ``state_dict`` the conversion to and from Hugging Face. Attention, RoPE and
RMSNorm are Mistral's.
"""

from models.mixtral.args import PRESETS, MixtralArgs
from models.mixtral.model import Mixtral

__all__ = ["PRESETS", "Mixtral", "MixtralArgs"]
