"""Mistral: decoder-only transformer with grouped-query attention, RoPE, SwiGLU and sliding windows.

``args`` holds the config and presets, ``model`` the architecture, ``state_dict`` the
conversion to and from Hugging Face. Masks, positions and attention backends are shared by
the model families and live in ``models.masks`` and ``models.attention``.
"""

from models.mistral.args import PRESETS, MistralArgs
from models.mistral.model import Mistral

__all__ = ["PRESETS", "Mistral", "MistralArgs"]
