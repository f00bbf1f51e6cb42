"""The training loop of every kind of training: pretraining, SFT and DPO.

Read ``Trainer.fit`` top to bottom. Each step sets the learning rate, runs this rank's
micro-batches through the objective's loss, DeepSpeed's backward and step (the one place
they are called), and queues the step's sums for an all-reduce on the device. Figures are
read from the device once per log interval (and before a checkpoint), then handed to the
callbacks, which do all reporting. The loop owns the checkpoint cadence and stop signals.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from common.errors import Stopped
from training.callbacks import Callbacks, StepMetrics
from training.checkpoint import Checkpointer, TrainerState
from training.objective import Objective, training_loss
from training.world import World, any_rank


class PreemptionFlag:
    """Set by SIGTERM or SIGUSR1 (SLURM's warning before a time limit or preemption)."""

    signals = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        for number in self.signals:
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        self.received = signal.Signals(number).name


class Steps(Protocol):
    """Where each step's data comes from (pretraining's sample order, fine-tuning's plan)."""

    total: int  # optimizer steps in the whole run

    def micro_batches(self, step: int) -> Iterable[Any]:
        """This rank's micro-batches of step ``step`` (0-based), on the host, each with ``.to(device)``."""

    def phase(self, step: int) -> str:
        """The name of the data phase step ``step`` belongs to."""

    def sequences(self, step: int) -> int:
        """Sequences step ``step`` trains on, all ranks together."""


@dataclass
class _Pending:
    """A finished step whose figures are still on the device."""

    step: int
    phase: str
    lr: float
    sums: torch.Tensor
    grad_norm: Any  # float, 0-dim tensor or None (DeepSpeed's, as it gives it)
    applied: bool
    seconds: float


def micro_step(
    engine: Any,
    objective: Objective,
    batch: Any,
    sums: torch.Tensor,
    callbacks: Callbacks | None = None,
) -> torch.Tensor:
    """Forward and backward of one micro-batch on the device, then DeepSpeed's step, which applies
    the optimizer at the accumulation boundary (and the expert shards' optimizer beside it). The
    one place the engine's backward and step are called (``kinoe preflight`` measures through it too). Returns the loss, not read back."""
    loss = training_loss(objective, engine, batch, sums)
    engine.backward(loss)
    if callbacks is not None:
        callbacks.on_backward(engine.module)
    experts = engine.expert_optimizer  # expert shards under expert parallelism, else None
    boundary = experts is not None and engine.is_gradient_accumulation_boundary()
    if boundary:
        experts.reduce_gradients()  # before DeepSpeed's step, whose norm includes them
    engine.step()
    if boundary:
        experts.step(engine.was_step_applied())
    return loss


class Trainer:
    """Steps an engine through ``steps`` with ``objective``, checkpointing and reporting as it goes."""

    def __init__(
        self,
        *,
        engine: Any,
        world: World,
        objective: Objective,
        steps: Steps,
        learning_rate: Callable[[int], float],
        checkpointer: Checkpointer,
        checkpoint_interval: int,
        callbacks: Callbacks,
        flag: PreemptionFlag,
    ):
        self.engine, self.world, self.objective, self.steps = engine, world, objective, steps
        self.learning_rate = learning_rate
        self.checkpointer, self.checkpoint_interval = checkpointer, checkpoint_interval
        self.callbacks, self.flag = callbacks, flag
        self._pending: list[_Pending] = []

    def fit(self, state: TrainerState) -> TrainerState:
        """Train from ``state.step`` to ``steps.total``; raises ``Stopped`` after a stop signal."""
        try:
            return self._fit(state)
        except Stopped:
            self.callbacks.end("preempted", {"step": state.step})
            raise
        except BaseException as error:
            self.callbacks.end(
                "failed", {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
            )
            raise

    def _fit(self, state: TrainerState) -> TrainerState:
        engine, world, model = self.engine, self.world, self.engine.module
        log_interval = self.callbacks.log_interval
        self.callbacks.on_train_start(state.step)
        while state.step < self.steps.total:
            started = time.perf_counter()
            step = state.step  # 0-based index of the step being taken
            lr = self.learning_rate(step)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            self.callbacks.on_step_start(step, model)

            sums = torch.zeros(self.objective.num_sums, dtype=torch.float64, device=world.device)
            for batch in self.steps.micro_batches(step):
                self.callbacks.on_micro_batch(batch)
                micro_step(engine, self.objective, batch.to(world.device), sums, self.callbacks)
            if dist.is_initialized():
                dist.all_reduce(sums)  # queued on the device; read at the next flush

            applied = engine.was_step_applied()
            state.step += 1
            state.consumed_samples += self.steps.sequences(step)
            state.skipped_steps += 0 if applied else 1
            self._pending.append(
                _Pending(
                    step=state.step,
                    phase=self.steps.phase(step),
                    lr=lr,
                    sums=sums,
                    grad_norm=engine.get_global_grad_norm() if applied else None,
                    applied=applied,
                    seconds=time.perf_counter() - started,
                )
            )
            self.callbacks.on_step_end(state.step, model)

            done = state.step == self.steps.total
            stop = any_rank(self.flag.received is not None, world)
            save = done or stop or state.step % self.checkpoint_interval == 0
            if save or state.step % log_interval == 0:
                self._flush(state)
            if save:
                self.checkpointer.save(engine, state, self.callbacks.on_checkpoint_write)
            if stop and not done:
                raise Stopped(
                    f"stopped after step {state.step} on "
                    f"{self.flag.received or 'a signal to another rank'}; checkpoint saved in "
                    f"{self.checkpointer.directory}; rerun the same command to resume"
                )
        return state

    def _flush(self, state: TrainerState) -> None:
        """Read the pending steps' figures from the device (one transfer), update ``state``, report."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        sums = torch.stack([p.sums for p in pending]).cpu().tolist()
        for record, step_sums in zip(pending, sums, strict=True):
            figures = self.objective.figures(step_sums)
            for name, tokens in figures.tokens_by_source.items():
                state.consumed_tokens_by_source[name] = (
                    state.consumed_tokens_by_source.get(name, 0) + tokens
                )
            for name, samples in figures.samples_by_source.items():
                state.samples_by_source[name] = state.samples_by_source.get(name, 0) + samples
            self.callbacks.on_step(
                StepMetrics(
                    step=record.step,
                    total_steps=self.steps.total,
                    phase=record.phase,
                    loss=figures.loss,
                    loss_by_source=figures.loss_by_source,
                    lr=record.lr,
                    grad_norm=_finite_or_none(record.grad_norm),
                    tokens=figures.tokens,
                    step_seconds=record.seconds,
                    skipped=not record.applied,
                    consumed_tokens_by_source=dict(state.consumed_tokens_by_source),
                    extra=dict(figures.extra),
                )
            )


def _finite_or_none(norm: Any) -> float | None:
    if norm is None:
        return None
    value = float(norm)
    return value if math.isfinite(value) else None
