"""``kinoe finetune sft|dpo``: prepare data, model, engine and (DPO) the reference
log-probabilities, hand the steps to the training core (``training.loop.Trainer``), then write
the trained model as a verified Hugging Face directory.

A fine-tuning run is stepped, checkpointed, stopped, resumed and watched exactly like a
pretraining run: the loop, checkpoints and callbacks are the core's. What is fine-tuning's own
is here, in ``finetune.objectives`` (SFT and DPO losses), ``finetune.packing`` (the plan of
packed sequences) and ``finetune.held_out`` (the held-out evaluation callback). Every rank
runs this; rank 0 alone writes files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.errors import KinoeError
from common.run import StageContext
from common.secrets import redact
from finetune.config import FinetuneConfig
from finetune.examples import Encoder, Unit, load_units
from finetune.held_out import EVAL_FILE, PAD_ID, HeldOutEvaluation, with_reference
from finetune.model import (
    build_model,
    gather_weights,
    open_model_source,
    parameter_counts,
    trained_source,
    write_adapter,
)
from finetune.objectives import ObjectiveName, build_objective
from finetune.packing import Batch, Plan, collate, rank_micro_batches, targets_in, training_plan
from finetune.reference import reference_logps
from training.callbacks import RunInfo, standard_callbacks
from training.checkpoint import Checkpointer, TrainerState
from training.engine import accumulation_steps, build_engine, deepspeed_config
from training.loop import PreemptionFlag, Trainer
from training.losses import token_loss_function
from training.parallelize import parallelize
from training.schedule import decay_start_step, learning_rate
from training.world import World, init_distributed

REJECTED_FILE = "rejected.jsonl"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"


@dataclass
class Data:
    """The examples of a run: training and held-out units, and the order they are trained in."""

    train: list[Unit]
    held_out: list[Unit]
    plan: Plan
    accounts: dict[str, Any]
    # DPO: log-probabilities of (chosen, rejected) under the reference, per unit; train then held-out.
    reference: torch.Tensor | None = None


class PlanSteps:
    """Fine-tuning's steps: the plan's sequences for a step, this rank's share in micro-batches."""

    def __init__(
        self, data: Data, objective: ObjectiveName, world: World, accumulation: int, config
    ):
        _, self.data_config, self.train_config = config.training()
        self.data, self.objective, self.world, self.accumulation = (
            data,
            objective,
            world,
            accumulation,
        )
        self.total = data.plan.steps

    def micro_batches(self, step: int) -> Iterator[Batch]:
        units, sequences = self.data.train, self.data.plan.step_sequences(step)
        # Normalise by the whole step's count, known from the plan: the gradient is then the
        # mean over every trained token (SFT) or pair (DPO) of the global batch, however the
        # sequences fall on ranks and micro-batches. DeepSpeed divides by ranks x micro-batches.
        per_step = (
            targets_in(units, sequences)
            if self.objective == "sft"
            else sum(1 for s in sequences for _ in s)
        )
        scale = self.world.size * self.accumulation / max(per_step, 1)
        for micro in rank_micro_batches(
            sequences, self.world.rank, self.world.size, self.train_config.micro_batch_size
        ):
            batch = collate(units, micro, self.data_config.max_length, PAD_ID)
            batch.loss_scale = scale
            yield with_reference(batch, self.data.reference, 0)

    def phase(self, step: int) -> str:
        return self.objective

    def sequences(self, step: int) -> int:
        return len([s for s in self.data.plan.step_sequences(step) if s])


def finetune(context: StageContext[FinetuneConfig], objective: ObjectiveName) -> dict[str, Any]:
    """The ``kinoe finetune sft|dpo`` step body."""
    world = init_distributed()
    try:
        return _finetune(context, world, objective)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _finetune(
    context: StageContext[FinetuneConfig], world: World, objective: ObjectiveName
) -> dict[str, Any]:
    config, logger, run_dir = context.config, context.logger, context.run_dir
    model_config, data_config, train_config = config.training()
    if config.engine.expert_parallel > 1:
        # The fine-tuned model is saved from one rank's module, which would hold its experts only.
        raise KinoeError(
            f"engine.expert_parallel {config.engine.expert_parallel}: fine-tuning keeps every "
            "expert on every rank; set engine.expert_parallel to 1"
        )
    if config.engine.fp8 is not None:
        # LoRA's adapters sit beside the linear layers FP8 would swap, and a fine-tuning run
        # is short enough that bf16's cost is not worth FP8's accuracy risk.
        raise KinoeError(
            f"engine.fp8 {config.engine.fp8}: FP8 is for pretraining; fine-tuning trains in "
            "bf16; set engine.fp8 to null"
        )
    flag = PreemptionFlag()

    source = open_model_source(model_config)
    if data_config.max_length > source.args.max_seq_len:
        raise KinoeError(
            f"data.max_length {data_config.max_length} exceeds the model's max_seq_len "
            f"{source.args.max_seq_len} ({model_config.path}/config.json); lower data.max_length"
        )
    data = _load_data(config, objective, run_dir, world, logger)
    model = build_model(source, model_config, train_config.seed, logger)
    counts = parameter_counts(model)
    parallelize(model, config.engine)
    ds_config = deepspeed_config(config, world)
    if world.is_main:
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    engine = build_engine(model, config, ds_config)
    accumulation = accumulation_steps(config, world.size)

    state = TrainerState(
        world_size=world.size,
        zero_stage=config.engine.zero_stage,
        data_order=data.plan.identity(),
        consumed_tokens_by_source={"train": 0},
        samples_by_source={"train": 0},
    )
    checkpointer = Checkpointer(
        config.checkpoint.directory or run_dir / "checkpoints", config.checkpoint, world, logger
    )
    checkpointer.remove_incomplete()
    resume_step = checkpointer.step_to_resume()
    if objective == "dpo":
        data.reference = reference_logps(
            config, data.train + data.held_out, engine, world, run_dir, resume_step, logger
        )
    if resume_step is not None:
        state = checkpointer.load(engine, resume_step, state)
        state.world_size, state.zero_stage = world.size, config.engine.zero_stage
    dist.barrier()

    loss = build_objective(objective, token_loss_function(config.engine), config.dpo.beta)
    held_out = HeldOutEvaluation(
        objective=loss,
        engine=engine,
        units=data.held_out,
        reference=data.reference,
        reference_offset=len(data.train),
        max_length=data_config.max_length,
        packing=data_config.packing,
        micro_batch_size=train_config.micro_batch_size,
        interval=train_config.eval_interval,
        total_steps=data.plan.steps,
        world=world,
        run_dir=run_dir,
    )
    run = RunInfo(
        name=f"{config.run.name}-{objective}",
        run_dir=run_dir,
        config=json.loads(redact(json.dumps(config.model_dump(mode="json")))),
        world_size=world.size,
        device=world.device,
        flops_per_token=source.args.flops_per_token(data_config.max_length),
        logger=logger,
    )
    callbacks = standard_callbacks(
        config.monitor, run, world, model, stage=[held_out], total_steps=data.plan.steps
    )
    if world.is_main:
        logger.info(
            "finetune %s: %s %s parameters (%s trained%s), %d training and %d held-out examples in "
            "%d sequences of %d tokens, %d ranks x %d micro-batches of %d, steps %d..%d, ZeRO-%d",
            objective,
            source.family,
            f"{counts['total']:,}",
            f"{counts['trainable']:,}",
            ", LoRA" if model_config.lora.enabled else "",
            len(data.train),
            len(data.held_out),
            len(data.plan.sequences),
            data_config.max_length,
            world.size,
            accumulation,
            train_config.micro_batch_size,
            state.step + 1,
            data.plan.steps,
            config.engine.zero_stage,
        )
    decay_start = decay_start_step(config.schedule, data.plan.steps, None)
    trainer = Trainer(
        engine=engine,
        world=world,
        objective=loss,
        steps=PlanSteps(data, objective, world, accumulation, config),
        learning_rate=lambda step: learning_rate(
            step, data.plan.steps, config.optimizer, config.schedule, decay_start
        ),
        checkpointer=checkpointer,
        checkpoint_interval=config.checkpoint.interval,
        callbacks=callbacks,
        flag=flag,
    )
    try:
        state = trainer.fit(state)
        summary = _finish(
            config, objective, source, engine, data, state, counts, world, run_dir, logger
        )
        callbacks.end("complete", {k: summary[k] for k in ("steps", "tokens")})
    finally:
        callbacks.close()
    return summary


def _finish(
    config: FinetuneConfig,
    objective: ObjectiveName,
    source,
    engine,
    data: Data,
    state: TrainerState,
    counts: dict[str, int],
    world: World,
    run_dir: Path,
    logger,
) -> dict[str, Any]:
    """Gather the trained weights, write the model (and LoRA adapter) directory; the run's summary."""
    model_config, data_config, _ = config.training()
    weights, adapters = gather_weights(engine, source, model_config.lora, world.is_main)
    summary: dict[str, Any] = {
        "objective": objective,
        "steps": state.step,
        "parameters": counts,
        "lora": model_config.lora.enabled,
        "data": data.accounts,
        "sequences": len(data.plan.sequences),
        "sequences_per_epoch": data.plan.sequences_per_epoch,
        "packing_efficiency": round(_packing_efficiency(data, data_config.max_length), 4),
        "tokens": state.consumed_tokens_by_source["train"],
        "evaluations": _eval_history(run_dir) if world.is_main else {},
    }
    if world.is_main:
        summary.update(_write_output(config, source, weights, run_dir, logger))
        if adapters:
            summary.update(
                write_adapter(
                    adapters, source, model_config.lora, model_config.path, run_dir / ADAPTER_DIR
                )
            )
    return summary


def _load_data(
    config: FinetuneConfig, objective: ObjectiveName, run_dir: Path, world: World, logger
) -> Data:
    """Every rank reads and encodes the same examples (deterministic); rank 0 writes the rejects."""
    model_config, data_config, train_config = config.training()
    encoder = Encoder(model_config.path, data_config.max_length)
    rejected = run_dir / REJECTED_FILE if world.is_main else None
    if rejected is not None:
        rejected.unlink(missing_ok=True)  # a resumed run writes the same ones again
    units, account = load_units(encoder, data_config.train, "data.train", objective, rejected)
    accounts = {"train": account.as_dict()}
    if data_config.eval:
        held_out, eval_account = load_units(
            encoder, data_config.eval, "data.eval", objective, rejected
        )
        accounts["eval"] = eval_account.as_dict()
        train = units
    elif data_config.eval_fraction > 0 and len(units) > 1:
        count = min(len(units) - 1, max(1, round(len(units) * data_config.eval_fraction)))
        chosen = set(random.Random(data_config.seed).sample(range(len(units)), count))
        held_out = [unit for index, unit in enumerate(units) if index in chosen]
        train = [unit for index, unit in enumerate(units) if index not in chosen]
    else:
        train, held_out = units, []
    for name, counted in accounts.items():
        if counted["rejected"] and world.is_main:
            logger.warning(
                "data.%s: %d of %d records rejected (%s), the first %s; they are in %s",
                name,
                sum(counted["rejected"].values()),
                counted["read"],
                ", ".join(f"{r} {n}" for r, n in counted["rejected"].items()),
                counted["first_rejected"],
                rejected,
            )
    plan = training_plan(
        train,
        train_config.epochs,
        data_config.seed,
        data_config.max_length,
        data_config.packing,
        train_config.global_batch_size,
    )
    accounts["train_examples"], accounts["held_out_examples"] = len(train), len(held_out)
    return Data(train, held_out, plan, accounts)


def _eval_history(run_dir: Path) -> dict[str, Any]:
    """The first and last held-out evaluation of the run (eval.jsonl)."""
    path = run_dir / EVAL_FILE
    records = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.is_file()
        else []
    )
    return {"first": records[0], "last": records[-1], "count": len(records)} if records else {}


def _packing_efficiency(data: Data, max_length: int) -> float:
    used = sum(data.train[i].length for sequence in data.plan.sequences for i in sequence)
    return used / max(1, len(data.plan.sequences) * max_length)


def _write_output(config: FinetuneConfig, source, weights, run_dir: Path, logger) -> dict[str, Any]:
    """The trained model as a verified Hugging Face directory in ``<run dir>/model``."""
    from convert.hf_write import write_hf_directory
    from convert.verify import stored_dtypes, verify

    model_path = Path(config.model.path)
    dtype = config.output.dtype
    if dtype == "auto":
        dtype = "bf16" if torch.bfloat16 in stored_dtypes(model_path) else "fp32"
    out = run_dir / MODEL_DIR
    trained = trained_source(
        source, weights, {"kind": "finetune", "directory": str(run_dir), "base": str(model_path)}
    )
    written = write_hf_directory(
        trained, out, dtype, model_path, config.output.max_shard_size_mb * 1_000_000
    )
    result: dict[str, Any] = {"output": str(out), "dtype": dtype, **written}
    if config.output.verify.enabled:
        result["verification"] = verify(trained, out, out, config.output.verify)
    else:
        logger.warning("finetune: verification of the output is off (output.verify.enabled=false)")
    logger.info("finetune: Hugging Face model written to %s", out)
    return result
