"""Mixtral's experts on disk: one tensor per expert, as Hugging Face checkpoints store them.

kinoe (and transformers 5 in memory) stack each layer's experts: ``mlp.experts.gate_up_proj``
(E, 2F, D), gate rows first, and ``mlp.experts.down_proj`` (E, D, F). Checkpoints keep the
original Mixtral layout, ``block_sparse_moe.experts.{e}.w1`` (gate, F x D), ``w3`` (up,
F x D), ``w2`` (down, D x F) and ``block_sparse_moe.gate``: published Mixtral checkpoints use
it, transformers 5's own ``save_pretrained`` writes it and its loader stacks it, and readers
written for Mixtral (transformers 4, converters, inference servers) expect it. to-hf writes
it; from-hf reads either.

Slices and stacks are ``TensorRef``s too, so both directions still read one source tensor at
a time: the slices of one stacked tensor follow one another (all gates, all ups, then all
downs of a layer; file order means nothing to safetensors readers), share one read, and the
stacked tensor is dropped after its last slice.
"""

from __future__ import annotations

import re

import torch

from convert.sources import TensorRef

_STACKED = re.compile(r"^(.*\.)mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(.*\.)mlp\.gate\.weight$")
_PER_EXPERT = re.compile(r"^(.*\.)block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_LEGACY_ROUTER = re.compile(r"^(.*\.)block_sparse_moe\.gate\.weight$")


class _SharedRead:
    """One read of a stacked tensor, shared by its slices and dropped after the last of them."""

    def __init__(self, ref: TensorRef, slices: int):
        self.ref, self.left = ref, slices
        self.tensor: torch.Tensor | None = None

    def slice(self, index: int, rows: slice) -> torch.Tensor:
        if self.tensor is None:
            self.tensor = self.ref.read()
        part = self.tensor[index, rows].clone()
        self.left -= 1
        if self.left == 0:
            self.tensor = None
        return part


def unstack_experts(tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """Hugging Face names with stacked experts -> the per-expert checkpoint layout (others unchanged)."""
    if not any(_STACKED.match(name) for name in tensors):
        return tensors
    out: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        stacked, router = _STACKED.match(name), _ROUTER.match(name)
        if router:
            out[f"{router.group(1)}block_sparse_moe.gate.weight"] = ref
        elif stacked is None:
            out[name] = ref
        elif stacked.group(2) == "gate_up_proj":
            experts, rows, columns = ref.shape
            half = rows // 2
            shared = _SharedRead(ref, 2 * experts)
            for kind, part in (("w1", slice(0, half)), ("w3", slice(half, rows))):
                for e in range(experts):
                    out[f"{stacked.group(1)}block_sparse_moe.experts.{e}.{kind}.weight"] = (
                        TensorRef(
                            (half, columns),
                            ref.dtype,
                            lambda shared=shared, e=e, part=part: shared.slice(e, part),
                        )
                    )
        else:
            experts, rows, columns = ref.shape
            shared = _SharedRead(ref, experts)
            for e in range(experts):
                out[f"{stacked.group(1)}block_sparse_moe.experts.{e}.w2.weight"] = TensorRef(
                    (rows, columns),
                    ref.dtype,
                    lambda shared=shared, e=e: shared.slice(e, slice(None)),
                )
    return out


def stack_experts(tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """The per-expert checkpoint layout -> Hugging Face's stacked names (others unchanged)."""
    if not any(_PER_EXPERT.match(name) for name in tensors):
        return tensors
    experts: dict[str, dict[int, dict[str, TensorRef]]] = {}
    out: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        per_expert, router = _PER_EXPERT.match(name), _LEGACY_ROUTER.match(name)
        if router:
            out[f"{router.group(1)}mlp.gate.weight"] = ref
        elif per_expert is None:
            out[name] = ref
        else:
            prefix, index, kind = per_expert.groups()
            layer = experts.setdefault(prefix, {})
            if not layer:  # the stacked tensors take the place of the first expert tensor
                out[f"{prefix}mlp.experts.gate_up_proj"] = None  # type: ignore[assignment]
                out[f"{prefix}mlp.experts.down_proj"] = None  # type: ignore[assignment]
            layer.setdefault(int(index), {})[kind] = ref
    for prefix, layer in experts.items():
        count = max(layer) + 1
        missing = [
            f"{prefix}block_sparse_moe.experts.{e}.{kind}.weight"
            for e in range(count)
            for kind in ("w1", "w2", "w3")
            if kind not in layer.get(e, {})
        ]
        if missing:
            raise ValueError(
                f"not a Hugging Face Mixtral state dict: missing {', '.join(missing[:3])}"
            )
        w1, w2, w3 = ([layer[e][kind] for e in range(count)] for kind in ("w1", "w2", "w3"))
        rows, columns = w1[0].shape
        out[f"{prefix}mlp.experts.gate_up_proj"] = TensorRef(
            (count, 2 * rows, columns),
            w1[0].dtype,
            lambda w1=w1, w3=w3: torch.stack(
                [torch.cat([g.read(), u.read()]) for g, u in zip(w1, w3, strict=True)]
            ),
        )
        out[f"{prefix}mlp.experts.down_proj"] = TensorRef(
            (count, *w2[0].shape), w2[0].dtype, lambda w2=w2: torch.stack([d.read() for d in w2])
        )
    return out
