"""``kinoe pretrain``: build the model, engine and global sample order, resume, then hand the
steps to the training core (``training.loop.Trainer``).

What is pretraining's own lives here and in ``pretrain.objective`` (the language-modelling
loss with per-source figures) and ``pretrain.data`` (the order of samples); the loop,
checkpoints and callbacks are the core's. Every rank runs this; rank 0 alone writes files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from common.errors import KinoeError
from common.run import StageContext
from common.secrets import redact
from pretrain.config import PretrainConfig
from pretrain.data import SampleOrder, build_loader, open_sources
from pretrain.data.loader import Batch
from pretrain.objective import LanguageModelling
from training.callbacks import RunInfo, standard_callbacks
from training.checkpoint import Checkpointer, TrainerState
from training.engine import accumulation_steps, build_engine, deepspeed_config
from training.loop import PreemptionFlag, Trainer
from training.losses import token_loss_function
from training.parallelize import parallelize
from training.partitioned import build_initialised
from training.schedule import decay_start_step, learning_rate
from training.world import World, init_distributed


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


class SampleSteps:
    """Pretraining's steps: ``accumulation`` micro-batches per rank per step from the loader,
    in the global sample order; logs each data phase as it begins."""

    def __init__(
        self,
        loader: Any,
        order: SampleOrder,
        config: PretrainConfig,
        accumulation: int,
        logger: logging.Logger,
        is_main: bool,
    ):
        self.total = config.train.steps
        self.order, self.phases = order, config.data.phases
        self.accumulation = accumulation
        self.global_batch_size = config.train.global_batch_size
        self.logger, self.is_main = logger, is_main
        self._batches = iter(loader)
        self._logged_phase: int | None = None

    def micro_batches(self, step: int) -> Iterator[Batch]:
        phase = self.order.phase_at_step(step)
        if self.is_main and phase != self._logged_phase:
            self.logger.info(
                "phase %r from step %d: mixture %s",
                self.phases[phase].name,
                step + 1,
                self.phases[phase].mixture,
            )
        self._logged_phase = phase
        for _ in range(self.accumulation):
            yield next(self._batches)

    def phase(self, step: int) -> str:
        return self.phases[self.order.phase_at_step(step)].name

    def sequences(self, step: int) -> int:
        return self.global_batch_size


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

    state = TrainerState(
        world_size=world.size,
        zero_stage=config.engine.zero_stage,
        expert_parallel=config.engine.expert_parallel,
        data_order=order.identity(),
        consumed_tokens_by_source=dict.fromkeys(names, 0),
        samples_by_source=dict.fromkeys(names, 0),
    )
    checkpointer = Checkpointer(
        config.checkpoint_dir(context.run_dir), config.checkpoint, world, logger
    )
    checkpointer.remove_incomplete()
    resume_step = checkpointer.step_to_resume()
    if resume_step is not None:
        # Before the model is built: a setting the checkpoint cannot resume under is refused
        # in seconds, not after minutes of building a 7B model on every rank.
        checkpointer.check_resumable(resume_step, state)

    ds_config = deepspeed_config(config, world)
    model = build_model(config, args, world, logger, ds_config)
    if world.is_main:
        (context.run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    engine = build_engine(model, config, ds_config)
    if resume_step is not None:
        loaded = checkpointer.load(engine, resume_step, state)
        loaded.world_size, loaded.zero_stage = world.size, config.engine.zero_stage
        loaded.expert_parallel = config.engine.expert_parallel
        state = loaded
    dist.barrier()

    accumulation = accumulation_steps(config, world.size)
    decay_start = decay_start_step(config.schedule, config.train.steps, order.phase_start_steps[-1])
    run = RunInfo(
        name=config.run.name,
        run_dir=context.run_dir,
        config=json.loads(redact(json.dumps(config.model_dump(mode="json")))),
        world_size=world.size,
        device=world.device,
        flops_per_token=args.flops_per_token(config.data.seq_len),
        logger=logger,
        phases=tuple(phase.name for phase in config.data.phases),
    )
    callbacks = standard_callbacks(
        config.monitor, run, world, model, config.drills, total_steps=config.train.steps
    )
    if world.is_main:
        logger.info(
            "pretrain: %s %s, %s parameters (%s non-embedding), %d ranks x %d micro-batches of "
            "%d x %d tokens, steps %d..%d, ZeRO-%d%s, %s",
            config.model.family,
            config.model.preset,
            f"{args.num_parameters():,}",
            f"{args.num_non_embedding_parameters():,}",
            world.size,
            accumulation,
            config.train.micro_batch_size,
            config.data.seq_len,
            state.step + 1,
            config.train.steps,
            config.engine.zero_stage,
            f", experts over {config.engine.expert_parallel} ranks"
            if config.engine.expert_parallel > 1
            else "",
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
        accumulation=accumulation,
        eos_id=eos_id,
        document_masking=config.data.document_masking,
        num_workers=config.data.num_workers,
        prefetch_factor=config.data.prefetch_factor,
        pin_memory=config.data.pin_memory and world.device.type == "cuda",
    )
    trainer = Trainer(
        engine=engine,
        world=world,
        objective=LanguageModelling(names, token_loss_function(config.engine)),
        steps=SampleSteps(loader, order, config, accumulation, logger, world.is_main),
        learning_rate=lambda step: learning_rate(
            step, config.train.steps, config.optimizer, config.schedule, decay_start
        ),
        checkpointer=checkpointer,
        checkpoint_interval=config.checkpoint.interval,
        callbacks=callbacks,
        flag=flag,
    )
    try:
        state = trainer.fit(state)
        summary = {
            "steps": state.step,
            "consumed_samples": state.consumed_samples,
            "consumed_tokens_by_source": state.consumed_tokens_by_source,
            "skipped_steps": state.skipped_steps,
            "checkpoint": str(checkpointer.directory / f"step_{state.step:08d}"),
        }
        callbacks.end("complete", summary)
    finally:
        callbacks.close()
    return summary


def check_vocabulary(shard_vocab_size: int, args: Any) -> None:
    """Refuse token shards whose ids the model's embedding cannot hold."""
    if shard_vocab_size > args.vocab_size:
        raise KinoeError(
            f"the token shards use {shard_vocab_size} ids but the model has vocab_size "
            f"{args.vocab_size}; set model.overrides.vocab_size to at least {shard_vocab_size}"
        )


def build_model(
    config: PretrainConfig, args: Any, world: World, logger, ds_config: dict[str, Any]
) -> torch.nn.Module:
    """The model as training uses it, before DeepSpeed wraps it.

    Seeded random weights or ``model.init_from``'s, built into ZeRO-3 partitions when the
    run is ZeRO-3 and with only this rank's experts under expert parallelism
    (``training.partitioned``), then FP8, activation checkpointing and compilation applied
    from outside. ``kinoe preflight`` builds its model here too, so what it measures
    is what trains.
    """
    model = build_initialised(
        config.model.model_family.model_type,
        args,
        config.train.seed,
        ds_config,
        world,
        config.engine.expert_parallel,
    )
    if config.model.init_from is not None:
        # Continual pretraining: an existing model's weights instead of a random start. On a
        # resume the checkpoint's weights replace these anyway.
        from convert.initial import load_initial_weights

        load_initial_weights(model, config.model.init_from, world.is_main)
        if world.is_main:
            logger.info("initial weights from %s", config.model.init_from)
    fp8_layers = parallelize(model, config.engine)
    if fp8_layers and world.is_main:
        logger.info(
            "engine.fp8 %s: %d linear layers of the blocks train in FP8 (embedding, output "
            "head, router and experts in bf16)",
            config.engine.fp8,
            len(fp8_layers),
        )
    return model


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
