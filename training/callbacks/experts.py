"""Mixture-of-experts balance: router statistics per step, reduced over micro-batches and ranks
on the device, read once per log interval, and the alert when an expert starves."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from models.experts import ExpertModel
from training.callbacks.base import Callback, StepMetrics
from training.config import ExpertLoadConfig


class ExpertBalance(Callback):
    """Adds ``moe/*`` figures to each step's metrics and alerts on a starving expert.

    Per step: the mean over micro-batches and ranks of each layer's load per expert and of the
    router losses, and the dropped assignments summed. ``moe/load_cv`` is the coefficient of
    variation of the load over experts, averaged over layers (0 is perfectly even).
    """

    def __init__(self, config: ExpertLoadConfig, log_interval: int):
        self.config = config
        self.log_interval = log_interval
        self._callbacks = None
        self._step_load_LE: torch.Tensor | None = None
        self._step_scalars: torch.Tensor | None = None  # aux, z, dropped
        self._micro_batches = 0
        self._pending: dict[int, torch.Tensor] = {}  # step -> reduced figures, on the device
        self._shape: tuple[int, int] | None = None
        self._interval_load_LE: torch.Tensor | None = None
        self._interval_steps = 0
        self._starving_for_LE: torch.Tensor | None = None

    def bind(self, callbacks) -> None:
        self._callbacks = callbacks

    def on_backward(self, model: nn.Module) -> None:
        assert isinstance(model, ExpertModel)
        stats = model.router_stats()
        load_LE = stats.load_LE.detach().double()
        scalars = torch.stack(
            [
                torch.as_tensor(value, dtype=torch.float64, device=load_LE.device)
                for value in (stats.aux_loss, stats.z_loss, stats.dropped_tokens)
            ]
        )
        if self._step_load_LE is None:
            self._step_load_LE, self._step_scalars = load_LE, scalars
        else:
            self._step_load_LE = self._step_load_LE + load_LE
            self._step_scalars = self._step_scalars + scalars
        self._micro_batches += 1

    def on_step_end(self, step: int, model: nn.Module) -> None:
        """Reduce this step's figures over ranks (a collective, queued on the device; no host read)."""
        assert self._step_load_LE is not None, "no micro-batch reported router statistics"
        self._shape = tuple(self._step_load_LE.shape)
        packed = torch.cat([self._step_load_LE.flatten(), self._step_scalars])
        packed = packed / self._micro_batches
        packed[-1] *= self._micro_batches  # dropped tokens are a count: summed, not averaged
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
            packed[:-1] /= dist.get_world_size()
        self._pending[step] = packed
        self._step_load_LE, self._step_scalars, self._micro_batches = None, None, 0

    def on_step(self, metrics: StepMetrics) -> None:
        packed = self._pending.pop(metrics.step).cpu()
        layers, experts = self._shape
        load_LE = packed[: layers * experts].view(layers, experts)
        aux, z, dropped = packed[-3:].tolist()
        cv_L = load_LE.std(dim=1, unbiased=False) / load_LE.mean(dim=1).clamp(min=1e-12)
        figures = {
            "moe/aux_loss": aux,
            "moe/z_loss": z,
            "moe/dropped_tokens": dropped,
            "moe/load_cv": cv_L.mean().item(),
            "moe/load_cv_max": cv_L.max().item(),
        }
        for layer in range(layers):
            for expert in range(experts):
                figures[f"moe/load/layer{layer:02d}/expert{expert:02d}"] = load_LE[
                    layer, expert
                ].item()
        metrics.extra.update(figures)
        self._check_starvation(metrics.step, load_LE)

    def _check_starvation(self, step: int, load_LE: torch.Tensor) -> None:
        self._interval_load_LE = (
            load_LE if self._interval_load_LE is None else self._interval_load_LE + load_LE
        )
        self._interval_steps += 1
        if step % self.log_interval:
            return
        mean_LE = self._interval_load_LE / self._interval_steps
        self._interval_load_LE, self._interval_steps = None, 0
        experts = mean_LE.shape[1]
        starving_LE = mean_LE < self.config.starved_share / experts
        if self._starving_for_LE is None:
            self._starving_for_LE = torch.zeros_like(mean_LE, dtype=torch.long)
        self._starving_for_LE = torch.where(starving_LE, self._starving_for_LE + 1, 0)
        # Alert once, on the interval that reaches the limit, per (layer, expert).
        newly = (self._starving_for_LE == self.config.starvation_intervals).nonzero().tolist()
        if newly:
            names = ", ".join(f"layer {layer} expert {expert}" for layer, expert in newly[:8])
            more = f" and {len(newly) - 8} more" if len(newly) > 8 else ""
            self._callbacks.alert(
                "expert starving",
                f"{names}{more} received under {self.config.starved_share:.0%} of an even share "
                f"of tokens for {self.config.starvation_intervals} logging intervals up to step "
                f"{step}; check the router (monitor.experts, model.overrides.router_aux_loss_coef)",
                "WARN",
            )
