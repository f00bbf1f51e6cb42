"""The optimizer of the expert shards under expert parallelism, stepped beside DeepSpeed's.

With ``engine.expert_parallel`` N > 1 each rank holds different experts, which DeepSpeed's
ZeRO optimizer cannot take: it would average them over all ranks as if every rank held the
same values. So ``shard_experts``'s parameters stay out of its groups, and this class gives
them what DeepSpeed gives the rest, the way ZeRO-1 does:

- each micro-batch's expert gradients are added, as autograd produces them, into one flat
  buffer in the training dtype (DeepSpeed accumulates in that dtype too);
- at the accumulation boundary the buffer is reduce-scattered over the R = world / N ranks
  that hold the same experts (``ExpertGroups.replicas``) and divided by the world size: the
  mean over all ranks that DeepSpeed takes of the dense gradients;
- each of those R ranks keeps fp32 master weights and AdamW moments of its 1/R of the flat
  buffer only, and steps it with the same AdamW (fused, same hyperparameters, the learning
  rate the loop set on DeepSpeed's groups); the new weights are all-gathered back;
- one global gradient norm: DeepSpeed's ``scaled_global_norm`` of its own partitions is
  combined with the experts' (squares summed over the world, each element owned by exactly
  one rank), so DeepSpeed clips the dense part by the same coefficient as here and
  ``engine.get_global_grad_norm()`` is the norm of every parameter.

Flat layout of one rank (``ExpertLayout``): the expert parameters in model order, each as
its G = E / N local experts back to back (so each parameter is a view of the buffer); padded
to a multiple of R; replica q owns elements [q*C, (q+1)*C) with C = padded / R.

Checkpoints (``save``/``load``, called by ``training.checkpoint``): every rank writes its
part, ``experts/ep{rank in N:03d}_part{q:03d}.pt`` (master, exp_avg, exp_avg_sq, the Adam
step and the layout). A rank of another N or R reads the ranges it owns from those files
(memory-mapped), so a run resumes at another expert-parallel size or world size, and
``kinoe convert`` reads any expert whole the same way (``ExpertCheckpoint``). DeepSpeed's own
model-states file leaves the experts out (they differ per rank).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.errors import KinoeError
from training import safe_load
from training.config import OptimizerConfig
from training.expert_parallel import ExpertGroups, expert_parameters

EXPERTS_DIR = "experts"
_PART = re.compile(r"^ep(\d{3})_part(\d{3})\.pt$")
_STATES = ("master", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class ExpertLayout:
    """Where each expert's weights lie in the flat buffers of ``size`` ranks x ``replicas`` parts.

    ``params``: (name, shape of one expert's slice) of every expert parameter, in model order.
    """

    params: tuple[tuple[str, tuple[int, ...]], ...]
    num_experts: int
    size: int
    replicas: int

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.size

    @property
    def numel(self) -> int:
        """Elements of one rank's experts (unpadded)."""
        return sum(self.local_experts * math.prod(shape) for _, shape in self.params)

    @property
    def part(self) -> int:
        """Elements each of the ``replicas`` ranks owns (the padded buffer / replicas)."""
        return math.ceil(self.numel / self.replicas)

    def offsets(self) -> dict[str, int]:
        """Where each parameter starts in one rank's flat buffer."""
        found, offset = {}, 0
        for name, shape in self.params:
            found[name] = offset
            offset += self.local_experts * math.prod(shape)
        return found

    def locate(self, name: str, expert: int) -> tuple[int, int, int]:
        """(expert-parallel rank holding ``expert``, start in its flat buffer, numel) of one slice."""
        shape = dict(self.params)[name]
        numel = math.prod(shape)
        rank, local = divmod(expert, self.local_experts)
        return rank, self.offsets()[name] + local * numel, numel

    def to_json(self) -> dict[str, Any]:
        return {
            "params": [[name, list(shape)] for name, shape in self.params],
            "num_experts": self.num_experts,
            "size": self.size,
            "replicas": self.replicas,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExpertLayout:
        return cls(
            params=tuple((name, tuple(shape)) for name, shape in data["params"]),
            num_experts=int(data["num_experts"]),
            size=int(data["size"]),
            replicas=int(data["replicas"]),
        )


class ExpertCheckpoint:
    """The expert parts of one checkpoint directory, read by range, memory-mapped."""

    def __init__(self, tag_dir: Path, what_to_do: str):
        self.directory = Path(tag_dir) / EXPERTS_DIR
        self.what_to_do = what_to_do
        parts = {}
        for entry in sorted(self.directory.iterdir()) if self.directory.is_dir() else []:
            match = _PART.match(entry.name)
            if match:
                parts[(int(match.group(1)), int(match.group(2)))] = entry
        if not parts:
            raise KinoeError(f"{self.directory}: no expert parts; {what_to_do}")
        self._files = parts
        self._loaded: dict[tuple[int, int], dict[str, Any]] = {}
        self.layout = ExpertLayout.from_json(self._part(*min(parts))["layout"])
        missing = [
            f"ep{rank:03d}_part{part:03d}.pt"
            for rank in range(self.layout.size)
            for part in range(self.layout.replicas)
            if (rank, part) not in parts
        ]
        if missing:
            raise KinoeError(
                f"{self.directory}: {missing[0]} is missing ({len(missing)} of "
                f"{self.layout.size * self.layout.replicas} parts); {what_to_do}"
            )

    def _part(self, rank: int, part: int) -> dict[str, Any]:
        if (rank, part) not in self._loaded:
            path = self._files[(rank, part)]
            loaded = safe_load.load(path, self.what_to_do, mmap=True)
            if not isinstance(loaded, dict) or "layout" not in loaded:
                raise KinoeError(
                    f"{path}: not an expert part of a kinoe checkpoint; {self.what_to_do}"
                )
            self._loaded[(rank, part)] = loaded
        return self._loaded[(rank, part)]

    @property
    def step(self) -> torch.Tensor:
        """The Adam step count the parts were written at."""
        return self._part(0, 0)["step"]

    def read(self, state: str, rank: int, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of expert-parallel rank ``rank``'s flat ``state`` (fp32)."""
        part = self.layout.part
        pieces = []
        position = start
        while position < end:
            index, offset = divmod(position, part)
            take = min(end - position, part - offset)
            pieces.append(self._part(rank, index)[state][offset : offset + take])
            position += take
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def expert(self, name: str, expert: int, state: str = "master") -> torch.Tensor:
        """One expert's slice of parameter ``name`` (fp32, its own shape)."""
        rank, start, numel = self.layout.locate(name, expert)
        shape = dict(self.layout.params)[name]
        return self.read(state, rank, start, start + numel).view(shape)


class ExpertOptimizer:
    """AdamW of this rank's share of its experts, with DeepSpeed's reduction, norm and clip."""

    def __init__(
        self,
        engine: Any,
        groups: ExpertGroups,
        config: OptimizerConfig,
        gradient_clipping: float,
    ):
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        zero = engine.optimizer
        if not isinstance(zero, DeepSpeedZeroOptimizer):
            raise KinoeError(
                f"engine.expert_parallel needs DeepSpeed's ZeRO-1/2 optimizer, not "
                f"{type(zero).__name__}; set engine.zero_stage to 1 or 2"
            )
        module = engine.module
        self.engine, self.zero, self.groups = engine, zero, groups
        self.clip = gradient_clipping
        params = expert_parameters(module)
        names = {id(p): name for name, p in module.named_parameters()}
        first = module.moe_modules()[0]
        self.layout = ExpertLayout(
            params=tuple((names[id(p)], tuple(p.shape[1:])) for p in params),
            num_experts=first.num_experts,
            size=groups.size,
            replicas=groups.world_size // groups.size,
        )
        self.part_index = dist.get_rank(groups.replicas) if self.layout.replicas > 1 else 0
        part, padded = self.layout.part, self.layout.part * self.layout.replicas
        dtype, device = params[0].dtype, params[0].device
        # The parameters become views of one buffer, so the all-gather after a step writes
        # them in place; the gradients are added into a buffer of the same layout.
        self.flat_param = torch.zeros(padded, dtype=dtype, device=device)
        self.flat_grad = torch.zeros(padded, dtype=dtype, device=device)
        offset = 0
        self._grad_views = {}
        for p in params:
            view = self.flat_param[offset : offset + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
            self._grad_views[id(p)] = self.flat_grad[offset : offset + p.numel()].view_as(p)
            p.register_post_accumulate_grad_hook(self._accumulate)
            offset += p.numel()
        self.params = params
        mine = slice(self.part_index * part, (self.part_index + 1) * part)
        self.master = self.flat_param[mine].float().clone()
        self.adamw = torch.optim.AdamW(
            [self.master],
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,  # every expert weight is a matrix: all decay
            fused=True,
        )
        self._norm = torch.zeros((), dtype=torch.float32, device=device)
        self._grad_part: torch.Tensor | None = None
        self._wrap_norm(zero)
        # DeepSpeed writes the module's state from rank 0 alone, but each rank's experts
        # differ: they are left out there and written as parts by ``save``.
        self._expert_names = {name for name, _ in self.layout.params}
        # (torch marks the hooks it is given, which a bound method does not allow.)
        module.register_state_dict_post_hook(lambda *args: self._drop_experts(*args))
        module.register_load_state_dict_pre_hook(lambda *args: self._keep_experts(*args))

    # --- gradients -----------------------------------------------------------------------

    def _accumulate(self, param: nn.Parameter) -> None:
        self._grad_views[id(param)].add_(param.grad)
        param.grad = None

    def reduce_gradients(self) -> None:
        """At the accumulation boundary, before DeepSpeed's step: the mean gradient of this
        rank's part and the experts' share of the global norm (both stay on the device)."""
        part = self.layout.part
        if self.layout.replicas > 1:
            reduced = torch.empty(part, dtype=self.flat_grad.dtype, device=self.flat_grad.device)
            dist.reduce_scatter_tensor(reduced, self.flat_grad, group=self.groups.replicas)
        else:
            reduced = self.flat_grad[:part]
        # A copy in fp32 (with R = 1 ``reduced`` is a view of the buffer zeroed next).
        self._grad_part = reduced.to(torch.float32, copy=True).div_(self.groups.world_size)
        self.flat_grad.zero_()
        squares = self._grad_part.square().sum()
        dist.all_reduce(squares)  # every element of every expert is owned by one rank
        self._norm = squares.sqrt()

    def _wrap_norm(self, zero: Any) -> None:
        from deepspeed.runtime.utils import combine_grad_norm_groups

        dense_norm = zero.scaled_global_norm

        def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
            # DeepSpeed's norms are scaled by its loss scale (1 in bf16 and fp32).
            experts = self._norm.to(zero.device) * zero.loss_scale
            return combine_grad_norm_groups([dense_norm(norm_type), experts], norm_type)

        zero.scaled_global_norm = scaled_global_norm

    # --- the step ------------------------------------------------------------------------

    def step(self, applied: bool) -> None:
        """After DeepSpeed's step: clip as it did, AdamW on this rank's part, gather the weights.

        ``applied`` is DeepSpeed's verdict (False when it skipped a non-finite step)."""
        grad, self._grad_part = self._grad_part, None
        if not applied or grad is None:
            return
        norm = self.zero._global_grad_norm
        if self.clip > 0 and norm is not None:
            # DeepSpeed's coefficient (unscale_and_clip_grads), on the same global norm.
            coefficient = torch.clamp((torch.as_tensor(norm) + 1e-6) / self.clip, min=1.0)
            grad.mul_(1.0 / coefficient.to(grad.device))
        for group in self.adamw.param_groups:
            group["lr"] = self.zero.param_groups[0]["lr"]  # set by the loop for this step
        self.master.grad = grad
        self.adamw.step()
        self.master.grad = None
        self._gather()

    def _gather(self) -> None:
        mine = self.master.to(self.flat_param.dtype)
        if self.layout.replicas > 1:
            dist.all_gather_into_tensor(self.flat_param, mine, group=self.groups.replicas)
        else:
            self.flat_param.copy_(mine)

    # --- checkpoints -----------------------------------------------------------------------

    def _drop_experts(self, module, state_dict, prefix, local_metadata) -> None:
        for name in self._expert_names:
            state_dict.pop(prefix + name, None)

    def _keep_experts(self, module, state_dict, prefix, *args) -> None:
        # Loaded by ``load`` from the expert parts; here they keep their current values.
        named = dict(module.named_parameters())
        for name in self._expert_names:
            state_dict.setdefault(prefix + name, named[name])

    def _states(self) -> dict[str, torch.Tensor]:
        state = self.adamw.state.get(self.master) or {}
        zeros = torch.zeros_like(self.master)
        return {
            "master": self.master.detach(),
            "exp_avg": state.get("exp_avg", zeros),
            "exp_avg_sq": state.get("exp_avg_sq", zeros),
            "step": torch.as_tensor(state.get("step", 0.0), dtype=torch.float32).cpu(),
        }

    def save(self, tag_dir: Path, files: Any) -> None:
        """Write this rank's part into ``tag_dir/experts`` through DeepSpeed's checkpoint
        engine ``files`` (so it is hashed like every other file of the checkpoint)."""
        directory = Path(tag_dir) / EXPERTS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        part = {name: value.cpu() for name, value in self._states().items()}
        part["layout"] = self.layout.to_json()
        files.save(part, str(directory / f"ep{self.groups.rank:03d}_part{self.part_index:03d}.pt"))

    def load(self, tag_dir: Path, what_to_do: str) -> None:
        """Read the ranges this rank owns from the parts of ``tag_dir`` (any N and R)."""
        saved = ExpertCheckpoint(tag_dir, what_to_do)
        if saved.layout.params != self.layout.params or (
            saved.layout.num_experts != self.layout.num_experts
        ):
            raise KinoeError(
                f"{saved.directory}: the experts were written for another model "
                f"({saved.layout.num_experts} experts, {len(saved.layout.params)} expert "
                f"parameters); {what_to_do}"
            )
        states = {name: torch.zeros_like(self.master) for name in _STATES}
        part = self.layout.part
        low, high = self.part_index * part, (self.part_index + 1) * part
        offsets = self.layout.offsets()
        G = self.layout.local_experts
        for name, shape in self.layout.params:
            numel = math.prod(shape)
            for local in range(G):
                start = offsets[name] + local * numel
                begin, end = max(start, low), min(start + numel, high)
                if begin >= end:
                    continue
                expert = self.groups.rank * G + local
                rank, old_start, _ = saved.layout.locate(name, expert)
                for state in _STATES:
                    states[state][begin - low : end - low] = saved.read(
                        state, rank, old_start + begin - start, old_start + end - start
                    )
        self.master.copy_(states["master"])
        self.adamw.load_state_dict(
            {
                "state": {
                    0: {
                        "step": saved.step.clone(),
                        "exp_avg": states["exp_avg"],
                        "exp_avg_sq": states["exp_avg_sq"],
                    }
                },
                "param_groups": self.adamw.state_dict()["param_groups"],
            }
        )
        self._gather()
