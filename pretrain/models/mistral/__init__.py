"""Mistral: decoder-only transformer with grouped-query attention, RoPE, SwiGLU and sliding windows.

``args`` holds the config and presets, ``model`` the architecture, ``masks`` the attention
mask and position definitions, ``state_dict`` the conversion to and from Hugging Face.
"""

from pretrain.models.mistral.args import PRESETS, MistralArgs
from pretrain.models.mistral.model import Mistral

__all__ = ["PRESETS", "Mistral", "MistralArgs"]
