"""The training loop: build, resume, then step through the global sample order until done.

Read top to bottom: ``train`` sets everything up and ``_run_steps`` is the loop. Logging, W&B
and alerts live in ``pretrain.monitor``; checkpoints in ``pretrain.checkpoint``; the order of
samples in ``pretrain.data``. Every rank runs this; rank 0 alone writes files.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.errors import KinoeError, Stopped
from common.run import StageContext
from common.secrets import redact
from pretrain.checkpoint import Checkpointer, TrainerState
from pretrain.config import PretrainConfig
from pretrain.data import SampleOrder, build_loader, open_sources
from pretrain.engine import (
    TrainingConfig,
    World,
    accumulation_steps,
    build_engine,
    deepspeed_config,
    init_distributed,
)
from pretrain.expert_load import CONSOLE_KEYS, ExpertLoadTracker
from pretrain.monitor import Monitor, StepMetrics
from pretrain.parallelize import compiled_loss, parallelize
from pretrain.schedule import decay_start_step, learning_rate

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
IGNORE = -100


class PreemptionFlag:
    """Set by SIGTERM or SIGUSR1 (SLURM's warning before a time limit or preemption)."""

    signals = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        for number in self.signals:
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        self.received = signal.Signals(number).name


@dataclass
class Setup:
    """What ``train`` builds once and the loop uses."""

    config: PretrainConfig
    world: World
    engine: Any
    order: SampleOrder
    source_names: list[str]
    accumulation: int
    decay_start: int
    flops_per_token: float
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train(context: StageContext[PretrainConfig]) -> dict[str, Any]:
    """The ``kinoe pretrain`` stage body."""
    world = init_distributed()
    try:
        return _train(context, world)
    finally:
        # Joins the process group's threads before interpreter shutdown, where leaving them
        # joinable aborts the process ("terminate called without an active exception")
        # after the work is done, turning a finished run into a failed job.
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(context: StageContext[PretrainConfig], world: World) -> dict[str, Any]:
    config = context.config
    logger = context.logger
    flag = PreemptionFlag()

    names, sources, eos_id, vocab_size = open_sources(config.data)
    args = config.model.build_args()
    check_vocabulary(vocab_size, args)
    order = SampleOrder(
        names,
        [source.num_samples for source in sources],
        config.data.phases,
        config.train.steps,
        config.train.global_batch_size,
        config.data.seed,
    )
    _warn_about_repeats(order, logger, world)

    model = build_model(config, args, world, logger)
    ds_config = deepspeed_config(config, world)
    if world.is_main:
        (context.run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    engine = build_engine(model, config, ds_config)

    state = TrainerState(
        world_size=world.size,
        zero_stage=config.engine.zero_stage,
        data_order=order.identity(),
        consumed_tokens_by_source=dict.fromkeys(names, 0),
        samples_by_source=dict.fromkeys(names, 0),
    )
    checkpointer = Checkpointer(
        config.checkpoint_dir(context.run_dir), config.checkpoint, world, logger, config.drills
    )
    checkpointer.remove_incomplete()
    resume_step = checkpointer.step_to_resume()
    if resume_step is not None:
        loaded = checkpointer.load(engine, resume_step, state)
        loaded.world_size, loaded.zero_stage = world.size, config.engine.zero_stage
        state = loaded
    if world.is_main:
        # Steps after the checkpoint are redone, by however many ranks this run has.
        truncate_history(context.run_dir / METRICS_FILE, state.step)
        for path in (context.run_dir / SAMPLES_DIR).glob("rank*.jsonl"):
            truncate_history(path, state.step)
    dist.barrier()

    setup = Setup(
        config=config,
        world=world,
        engine=engine,
        order=order,
        source_names=names,
        accumulation=accumulation_steps(config, world.size),
        decay_start=decay_start_step(
            config.schedule, config.train.steps, order.phase_start_steps[-1]
        ),
        flops_per_token=args.flops_per_token(config.data.seq_len),
        loss=loss_function(config),
    )
    monitor = Monitor(
        config.monitor,
        run_name=config.run.name,
        run_dir=context.run_dir,
        run_config=json.loads(redact(json.dumps(config.model_dump(mode="json")))),
        is_main=world.is_main,
        world_size=world.size,
        flops_per_token=setup.flops_per_token,
        device=world.device,
        logger=logger,
        console_extra=CONSOLE_KEYS if hasattr(model, "router_stats") else (),
    )
    if world.is_main:
        logger.info(
            "pretrain: %s %s, %s parameters (%s non-embedding), %d ranks x %d micro-batches of "
            "%d x %d tokens, steps %d..%d, ZeRO-%d, %s",
            config.model.family,
            config.model.preset,
            f"{args.num_parameters():,}",
            f"{args.num_non_embedding_parameters():,}",
            world.size,
            setup.accumulation,
            config.train.micro_batch_size,
            config.data.seq_len,
            state.step + 1,
            config.train.steps,
            config.engine.zero_stage,
            (ds_config["bf16"]["enabled"] and "bf16") or "fp32",
        )
    loader = build_loader(
        sources,
        order,
        start_step=state.step,
        stop_step=config.train.steps,
        rank=world.rank,
        world_size=world.size,
        micro_batch_size=config.train.micro_batch_size,
        accumulation=setup.accumulation,
        eos_id=eos_id,
        document_masking=config.data.document_masking,
        num_workers=config.data.num_workers,
        prefetch_factor=config.data.prefetch_factor,
        pin_memory=config.data.pin_memory and world.device.type == "cuda",
    )
    try:
        state = _run_steps(setup, state, loader, checkpointer, monitor, flag, context.run_dir)
    except Stopped:
        monitor.on_end("preempted", {"step": state.step})
        raise
    except BaseException as error:
        monitor.on_end("failed", {"error": f"{type(error).__name__}: {error}".splitlines()[0]})
        raise
    summary = {
        "steps": state.step,
        "consumed_samples": state.consumed_samples,
        "consumed_tokens_by_source": state.consumed_tokens_by_source,
        "skipped_steps": state.skipped_steps,
        "checkpoint": str(checkpointer.directory / f"step_{state.step:08d}"),
    }
    monitor.on_end("complete", summary)
    return summary


def _run_steps(
    setup: Setup,
    state: TrainerState,
    loader,
    checkpointer: Checkpointer,
    monitor: Monitor,
    flag: PreemptionFlag,
    run_dir: Path,
) -> TrainerState:
    config, world, engine = setup.config, setup.world, setup.engine
    # Models with experts add their router losses to the loss and report their balance.
    model = engine.module
    experts = (
        ExpertLoadTracker(config.monitor.experts, config.monitor.log_interval, monitor.alert)
        if hasattr(model, "router_stats")
        else None
    )
    batches = iter(loader)
    num_sources = len(setup.source_names)
    phase = setup.order.phase_at_step(state.step)
    while state.step < config.train.steps:
        started = time.perf_counter()
        step = state.step  # 0-based index of the step being taken
        if setup.order.phase_at_step(step) != phase or step == 0:
            phase = setup.order.phase_at_step(step)
            if world.is_main:
                monitor.logger.info(
                    "phase %r from step %d: mixture %s",
                    config.data.phases[phase].name,
                    step + 1,
                    config.data.phases[phase].mixture,
                )
        lr = learning_rate(
            step, config.train.steps, config.optimizer, config.schedule, setup.decay_start
        )
        for group in engine.optimizer.param_groups:
            group["lr"] = lr

        # Per source: summed token loss, target tokens, samples; reduced over ranks once a step.
        totals = torch.zeros(3, num_sources, dtype=torch.float64)
        positions = []
        for _ in range(setup.accumulation):
            batch = next(batches).to(world.device)
            positions.extend(batch.position_B.tolist())
            loss, token_loss_BT, targets_B = micro_batch_loss(engine, batch, setup.loss)
            if experts is not None:
                experts.add(model.router_stats())
            if step + 1 in config.drills.nan_at_steps and world.is_main:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            sample_loss_B = token_loss_BT.detach().sum(dim=1).double().cpu()
            if step + 1 in config.drills.nan_at_steps and world.is_main:
                sample_loss_B = sample_loss_B * float("nan")
            source_B = batch.source_B.cpu()
            totals[0].index_add_(0, source_B, sample_loss_B)
            totals[1].index_add_(0, source_B, targets_B.double().cpu())
            totals[2].index_add_(0, source_B, torch.ones_like(sample_loss_B))

        stop = torch.tensor([1.0 if flag.received else 0.0], dtype=torch.float64)
        reduced = torch.cat([totals.flatten(), stop]).to(world.device)
        dist.all_reduce(reduced)
        reduced = reduced.cpu()
        totals, stop_requested = reduced[:-1].view(3, num_sources), reduced[-1].item() > 0
        applied = engine.was_step_applied()
        state.step += 1
        state.consumed_samples += config.train.global_batch_size
        state.skipped_steps += 0 if applied else 1
        for index, name in enumerate(setup.source_names):
            state.consumed_tokens_by_source[name] += int(totals[1, index])
            state.samples_by_source[name] += int(totals[2, index])

        extra = experts.step_metrics(state.step, world.device) if experts is not None else {}
        loss_sum, targets = totals[0].sum().item(), max(totals[1].sum().item(), 1.0)
        metrics = StepMetrics(
            step=state.step,
            total_steps=config.train.steps,
            phase=config.data.phases[phase].name,
            loss=loss_sum / targets,
            loss_by_source={
                name: totals[0, index].item() / totals[1, index].item()
                for index, name in enumerate(setup.source_names)
                if totals[1, index] > 0
            },
            lr=lr,
            grad_norm=grad_norm(engine) if applied else None,
            tokens=int(totals[1].sum().item()),
            step_seconds=time.perf_counter() - started,
            skipped=not applied,
            consumed_tokens_by_source=dict(state.consumed_tokens_by_source),
            extra=extra,
        )
        monitor.on_step(metrics)
        if world.is_main:
            append_metrics(run_dir / METRICS_FILE, metrics)
        if config.drills.record_samples:
            path = run_dir / SAMPLES_DIR / f"rank{world.rank:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                handle.write(json.dumps({"step": state.step, "positions": positions}) + "\n")

        done = state.step == config.train.steps
        if done or stop_requested or state.step % config.checkpoint.interval == 0:
            checkpointer.save(engine, state)
        if stop_requested and not done:
            raise Stopped(
                f"stopped after step {state.step} on {flag.received or 'a signal to another rank'}; "
                f"checkpoint saved in {checkpointer.directory}; rerun the same command to resume"
            )
    return state


def check_vocabulary(shard_vocab_size: int, args: Any) -> None:
    """Refuse token shards whose ids the model's embedding cannot hold."""
    if shard_vocab_size > args.vocab_size:
        raise KinoeError(
            f"the token shards use {shard_vocab_size} ids but the model has vocab_size "
            f"{args.vocab_size}; set model.overrides.vocab_size to at least {shard_vocab_size}"
        )


def build_model(config: PretrainConfig, args: Any, world: World, logger) -> torch.nn.Module:
    """The model as training uses it, before DeepSpeed wraps it.

    Seeded random weights or ``model.init_from``'s, then activation checkpointing and
    compilation applied from outside. ``kinoe preflight`` builds its model here too, so what
    it measures is what trains.
    """
    torch.manual_seed(config.train.seed)
    model = config.model.model_family.model_type(args)
    if config.model.init_from is not None:
        # Continual pretraining: an existing model's weights instead of a random start. On a
        # resume the checkpoint's weights replace these anyway.
        from pretrain.convert.initial import load_initial_weights

        load_initial_weights(model, config.model.init_from)
        if world.is_main:
            logger.info("initial weights from %s", config.model.init_from)
    parallelize(model, config.engine)
    return model


def loss_function(config: TrainingConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``next_token_losses``, compiled when ``engine.compile`` is on."""
    return compiled_loss(next_token_losses) if config.engine.compile else next_token_losses


def micro_batch_loss(
    engine, batch, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward one micro-batch: the loss to back-propagate, each token's loss (B, T), targets (B,).

    The loss is the mean over target tokens, plus the router losses of a model with experts.
    """
    logits_BTV = engine(batch.input_ids_BT, batch.document_ids_BT)
    token_loss_BT = loss(logits_BTV, batch.labels_BT)
    targets_B = (batch.labels_BT != IGNORE).sum(dim=1)
    mean_loss = token_loss_BT.sum() / targets_B.sum().clamp(min=1)
    model = engine.module
    if hasattr(model, "auxiliary_loss"):
        mean_loss = mean_loss + model.auxiliary_loss()
    return mean_loss, token_loss_BT, targets_B


def next_token_losses(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of each label under the logits, in float32; 0 where the label is -100."""
    return F.cross_entropy(
        logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(labels_BT)


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    value = float(norm)
    return value if math.isfinite(value) else None


def append_metrics(path: Path, metrics: StepMetrics) -> None:
    record = {
        "step": metrics.step,
        "phase": metrics.phase,
        "loss": metrics.loss,
        "loss_by_source": metrics.loss_by_source,
        "lr": metrics.lr,
        "grad_norm": metrics.grad_norm,
        "tokens": metrics.tokens,
        "skipped": metrics.skipped,
        "step_seconds": round(metrics.step_seconds, 4),
        **metrics.extra,  # model- or objective-specific figures (MoE balance, DPO rewards)
    }
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_history(path: Path, step: int) -> None:
    """Drop records after ``step`` from a per-step JSONL file: a resumed run writes them again."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _warn_about_repeats(order: SampleOrder, logger, world: World) -> None:
    if not world.is_main:
        return
    for name, epochs in order.epochs_by_source().items():
        if epochs > 1:
            logger.warning(
                "source %r is drawn %.2f times over (its samples repeat); add data or lower its weight",
                name,
                epochs,
            )
