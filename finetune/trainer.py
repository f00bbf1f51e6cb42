"""The fine-tuning loop, one for SFT and DPO: only the loss on a micro-batch's logits differs.

Read top to bottom: ``finetune`` prepares data, model, engine and (DPO) the reference
log-probabilities, then ``_run_steps`` is the loop. DeepSpeed, checkpoints, preemption and the
monitor are pretraining's own (``pretrain.engine``, ``pretrain.checkpoint``,
``pretrain.monitor``): a fine-tuning run is stopped, resumed and watched exactly like a
pretraining run. Every rank runs this; rank 0 alone writes files.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.errors import KinoeError, Stopped
from common.run import StageContext
from common.secrets import redact
from finetune.config import FinetuneConfig, LoraConfig
from finetune.examples import Encoder, Unit, load_units
from finetune.model import (
    build_model,
    gather_weights,
    open_model_source,
    parameter_counts,
    trained_source,
    write_adapter,
)
from finetune.packing import (
    Batch,
    Plan,
    collate,
    evaluation_batches,
    rank_micro_batches,
    segment_logps,
    targets_in,
    training_plan,
)
from pretrain.checkpoint import Checkpointer, TrainerState
from pretrain.engine import (
    World,
    accumulation_steps,
    build_engine,
    deepspeed_config,
    init_distributed,
)
from pretrain.expert_load import CONSOLE_KEYS, ExpertLoadTracker
from pretrain.monitor import Monitor, StepMetrics
from pretrain.parallelize import parallelize
from pretrain.schedule import decay_start_step, learning_rate
from pretrain.trainer import (
    METRICS_FILE,
    PreemptionFlag,
    append_metrics,
    grad_norm,
    loss_function,
    truncate_history,
)

Objective = Literal["sft", "dpo"]
EVAL_FILE = "eval.jsonl"
REFERENCE_FILE = "reference_logps.pt"
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


class Sums:
    """Per-step (or per-evaluation) sums, kept on the device and reduced over ranks in one all-reduce."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        self.values = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, **values: float | torch.Tensor) -> None:
        for name, value in values.items():
            self.values[self.names.index(name)] += value

    def reduce(self, extra: list[float] = ()) -> list[float]:
        extra_tensor = torch.tensor(list(extra), dtype=torch.float64, device=self.values.device)
        reduced = torch.cat([self.values, extra_tensor])
        dist.all_reduce(reduced)
        return reduced.cpu().tolist()

    def get(self, reduced: list[float], name: str) -> float:
        return reduced[self.names.index(name)]


SFT_SUMS = ("loss", "targets", "tokens")
DPO_SUMS = ("loss", "pairs", "tokens", "margin", "correct", "chosen", "rejected")


def finetune(context: StageContext[FinetuneConfig], objective: Objective) -> dict[str, Any]:
    """The ``kinoe finetune sft|dpo`` step body."""
    world = init_distributed()
    try:
        return _finetune(context, world, objective)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _finetune(
    context: StageContext[FinetuneConfig], world: World, objective: Objective
) -> dict[str, Any]:
    config, logger, run_dir = context.config, context.logger, context.run_dir
    model_config, data_config, train_config = config.training()
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
        data.reference = _reference_logps(config, data, engine, world, run_dir, resume_step, logger)
    if resume_step is not None:
        state = checkpointer.load(engine, resume_step, state)
        state.world_size, state.zero_stage = world.size, config.engine.zero_stage
    if world.is_main:
        truncate_history(run_dir / METRICS_FILE, state.step)
        truncate_history(run_dir / EVAL_FILE, state.step)
    dist.barrier()

    args = source.args
    monitor = Monitor(
        config.monitor,
        run_name=f"{config.run.name}-{objective}",
        run_dir=run_dir,
        run_config=json.loads(redact(json.dumps(config.model_dump(mode="json")))),
        is_main=world.is_main,
        world_size=world.size,
        flops_per_token=args.flops_per_token(data_config.max_length),
        device=world.device,
        logger=logger,
        console_extra=CONSOLE_KEYS if hasattr(model, "router_stats") else (),
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
    loop = _Loop(
        config, objective, world, engine, data, accumulation, monitor, run_dir, flag, checkpointer
    )
    if state.step == 0 and data.held_out:
        loop.evaluate(0)  # where the held-out figures start
    try:
        state = loop.run(state)
    except Stopped:
        monitor.on_end("preempted", {"step": state.step})
        raise
    except BaseException as error:
        monitor.on_end("failed", {"error": f"{type(error).__name__}: {error}".splitlines()[0]})
        raise

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
    monitor.on_end("complete", {k: summary[k] for k in ("steps", "tokens")})
    return summary


def _load_data(
    config: FinetuneConfig, objective: Objective, run_dir: Path, world: World, logger
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
                "data.%s: %d of %d records rejected (%s); they are in %s",
                name,
                sum(counted["rejected"].values()),
                counted["read"],
                ", ".join(f"{r} {n}" for r, n in counted["rejected"].items()),
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


class _Loop:
    """The optimizer steps, the held-out evaluation and the losses of both objectives."""

    def __init__(
        self,
        config: FinetuneConfig,
        objective: Objective,
        world: World,
        engine: Any,
        data: Data,
        accumulation: int,
        monitor: Monitor,
        run_dir: Path,
        flag: PreemptionFlag,
        checkpointer: Checkpointer,
    ):
        self.config, self.objective, self.world, self.engine = config, objective, world, engine
        self.data, self.accumulation, self.monitor = data, accumulation, monitor
        self.run_dir, self.flag, self.checkpointer = run_dir, flag, checkpointer
        _, self.data_config, self.train_config = config.training()
        self.loss = loss_function(config)
        # Models with experts add their router losses and report their balance, as in pretraining.
        self.experts = (
            ExpertLoadTracker(config.monitor.experts, config.monitor.log_interval, monitor.alert)
            if hasattr(engine.module, "router_stats")
            else None
        )
        # Padding positions are a document of their own with no targets: their ids never matter.
        self.pad_id = 0
        self.names = SFT_SUMS if objective == "sft" else DPO_SUMS

    # -- losses ----------------------------------------------------------------------------

    def _losses(
        self, batch: Batch, units: list[Unit], reference_offset: int, sums: Sums
    ) -> torch.Tensor:
        """The summed loss of ``batch`` (token losses for SFT, pair losses for DPO); adds its figures to ``sums``."""
        logits_BTV = self.engine(batch.input_ids_BT, batch.document_ids_BT)
        token_loss_BT = self.loss(logits_BTV, batch.labels_BT)
        if self.objective == "sft":
            loss = token_loss_BT.sum()
            sums.add(loss=loss.detach(), targets=batch.targets, tokens=batch.tokens)
            return loss
        logps_S = segment_logps(token_loss_BT, batch)
        chosen_P, rejected_P = logps_S[0::2], logps_S[1::2]
        reference = self.data.reference[[reference_offset + u for u in batch.units]].to(
            logps_S.device
        )
        beta = self.config.dpo.beta
        chosen_reward_P = beta * (chosen_P - reference[:, 0])
        rejected_reward_P = beta * (rejected_P - reference[:, 1])
        margin_P = chosen_reward_P - rejected_reward_P
        loss_P = -F.logsigmoid(margin_P)
        figures_P = torch.stack(
            [
                loss_P,
                margin_P,
                (margin_P > 0).to(margin_P.dtype),
                chosen_reward_P,
                rejected_reward_P,
            ]
        )
        loss_sum, margin, correct, chosen, rejected = figures_P.detach().sum(dim=1)
        sums.add(
            loss=loss_sum,
            pairs=len(batch.units),
            tokens=batch.tokens,
            margin=margin,
            correct=correct,
            chosen=chosen,
            rejected=rejected,
        )
        return loss_P.sum()

    def _figures(self, sums: Sums, reduced: list[float]) -> dict[str, float]:
        if self.objective == "sft":
            return {"loss": sums.get(reduced, "loss") / max(sums.get(reduced, "targets"), 1)}
        pairs = max(sums.get(reduced, "pairs"), 1)
        return {
            "loss": sums.get(reduced, "loss") / pairs,
            "reward_margin": sums.get(reduced, "margin") / pairs,
            "reward_accuracy": sums.get(reduced, "correct") / pairs,
            "reward_chosen": sums.get(reduced, "chosen") / pairs,
            "reward_rejected": sums.get(reduced, "rejected") / pairs,
        }

    # -- the loop ----------------------------------------------------------------------------

    def run(self, state: TrainerState) -> TrainerState:
        config, world, engine, plan = self.config, self.world, self.engine, self.data.plan
        units = self.data.train
        decay_start = decay_start_step(config.schedule, plan.steps, None)
        while state.step < plan.steps:
            started = time.perf_counter()
            step = state.step
            lr = learning_rate(step, plan.steps, config.optimizer, config.schedule, decay_start)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            sequences = plan.step_sequences(step)
            # Normalise by the whole step's count, known from the plan: the gradient is then the
            # mean over every trained token (SFT) or pair (DPO) of the global batch, however the
            # sequences fall on ranks and micro-batches. DeepSpeed divides by ranks x micro-batches.
            per_step = (
                targets_in(units, sequences)
                if self.objective == "sft"
                else sum(1 for s in sequences for _ in s)
            )
            scale = world.size * self.accumulation / max(per_step, 1)
            sums = Sums(self.names, self.world.device)
            micro_batches = rank_micro_batches(
                sequences, world.rank, world.size, self.train_config.micro_batch_size
            )
            for micro in micro_batches:
                batch = collate(units, micro, self.data_config.max_length, self.pad_id).to(
                    world.device
                )
                loss = self._losses(batch, units, 0, sums) * scale
                if self.experts is not None:
                    # Mixtral: the router's balance losses, a mean per micro-batch as in pretraining.
                    loss = loss + engine.module.auxiliary_loss()
                    self.experts.add(engine.module.router_stats())
                engine.backward(loss)
                engine.step()
            stop = 1.0 if self.flag.received else 0.0
            reduced = sums.reduce([stop])
            stop_requested = reduced[-1] > 0
            figures = self._figures(sums, reduced)
            if self.experts is not None:
                figures.update(self.experts.step_metrics(state.step + 1, world.device))
            applied = engine.was_step_applied()
            state.step += 1
            state.consumed_samples += len([s for s in sequences if s])
            state.skipped_steps += 0 if applied else 1
            state.consumed_tokens_by_source["train"] += int(sums.get(reduced, "tokens"))
            state.samples_by_source["train"] += sum(len(s) for s in sequences)
            metrics = StepMetrics(
                step=state.step,
                total_steps=plan.steps,
                phase=self.objective,
                loss=figures.pop("loss"),
                loss_by_source={},
                lr=lr,
                grad_norm=grad_norm(engine) if applied else None,
                tokens=int(sums.get(reduced, "tokens")),
                step_seconds=time.perf_counter() - started,
                skipped=not applied,
                consumed_tokens_by_source=dict(state.consumed_tokens_by_source),
                extra=figures,
            )
            self.monitor.on_step(metrics)
            if world.is_main:
                append_metrics(self.run_dir / METRICS_FILE, metrics)
            done = state.step == plan.steps
            if self.data.held_out and (done or state.step % self.train_config.eval_interval == 0):
                self.evaluate(state.step)
            if done or stop_requested or state.step % config.checkpoint.interval == 0:
                self.checkpointer.save(engine, state)
            if stop_requested and not done:
                raise Stopped(
                    f"stopped after step {state.step} on {self.flag.received or 'a signal to another rank'}; "
                    f"checkpoint saved in {self.checkpointer.directory}; rerun the same command to resume"
                )
        return state

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Loss (and DPO reward figures) over the held-out examples, every rank a share."""
        units = self.data.held_out
        sums = Sums(self.names, self.world.device)
        self.engine.eval()
        for micro in _equal_shares(
            evaluation_batches(
                len(units),
                [unit.length for unit in units],
                self.data_config.max_length,
                self.data_config.packing,
                self.world.rank,
                self.world.size,
                self.train_config.micro_batch_size,
            ),
            self.world,
        ):
            batch = collate(units, micro, self.data_config.max_length, self.pad_id).to(
                self.world.device
            )
            self._losses(batch, units, len(self.data.train), sums)
        self.engine.train()
        figures = self._figures(sums, sums.reduce())
        self.monitor.record(
            step, "held-out evaluation", {f"eval/{k}": v for k, v in figures.items()}
        )
        if self.world.is_main:
            with (self.run_dir / EVAL_FILE).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **figures}) + "\n")
        return figures


def _equal_shares(
    micro_batches: list[list[tuple[int, ...]]], world: World
) -> list[list[tuple[int, ...]]]:
    """Pad a rank's micro-batches with empty ones so every rank runs as many forwards (ZeRO-3 gathers in each)."""
    count = torch.tensor([len(micro_batches)], device=world.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return micro_batches + [[()]] * (int(count.item()) - len(micro_batches))


def _reference_logps(
    config: FinetuneConfig,
    data: Data,
    engine: Any,
    world: World,
    run_dir: Path,
    resume_step: int | None,
    logger: logging.Logger,
) -> torch.Tensor:
    """Log-probabilities (units, 2) of each pair's chosen and rejected answer under the reference.

    Computed once, before the first step, with the starting weights (or ``dpo.reference``) and
    saved in the run directory: a resumed run must not take its already-trained weights for
    the reference.
    """
    path = run_dir / REFERENCE_FILE
    units = data.train + data.held_out
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored.shape == (len(units), 2):
            return stored
    if resume_step is not None:
        raise KinoeError(
            f"{path} is missing or does not match the data, and the run has checkpoints: the "
            "reference log-probabilities of the starting model cannot be recomputed from trained "
            "weights; restore the file or start a new run (checkpoint.resume=none with a new run.name)"
        )
    _, data_config, train_config = config.training()
    reference = torch.zeros(len(units), 2, dtype=torch.float64)
    scorer = engine
    if config.dpo.reference is not None:
        # The reference computes as the policy does (same training overrides), without adapters.
        reference_model = config.model.model_copy(
            update={"path": config.dpo.reference, "lora": LoraConfig()}
        )
        other = open_model_source(reference_model)
        scorer = build_model(other, reference_model, 0, logger).to(world.device)
        scorer = scorer.to(next(engine.module.parameters()).dtype)
    scorer.eval()
    loss = loss_function(config)
    started = time.perf_counter()
    with torch.no_grad():
        shares = evaluation_batches(
            len(units),
            [u.length for u in units],
            data_config.max_length,
            data_config.packing,
            world.rank,
            world.size,
            train_config.micro_batch_size,
        )
        for micro in _equal_shares(shares, world):
            batch = collate(units, micro, data_config.max_length, 0).to(world.device)
            logits_BTV = scorer(batch.input_ids_BT, batch.document_ids_BT)
            token_loss_BT = loss(logits_BTV, batch.labels_BT)
            logps_S = segment_logps(token_loss_BT.double(), batch).cpu()
            for index, unit in enumerate(batch.units):
                reference[unit] = logps_S[2 * index : 2 * index + 2]
    engine.train()
    reduced = reference.to(world.device)
    dist.all_reduce(reduced)
    reference = reduced.cpu()
    if world.is_main:
        torch.save(reference, path)
        logger.info(
            "reference log-probabilities of %d pairs computed in %.1f s",
            len(units),
            time.perf_counter() - started,
        )
    if scorer is not engine:
        del scorer
    return reference


def _write_output(config: FinetuneConfig, source, weights, run_dir: Path, logger) -> dict[str, Any]:
    """The trained model as a verified Hugging Face directory in ``<run dir>/model``."""
    from pretrain.convert.hf_write import write_hf_directory
    from pretrain.convert.verify import stored_dtypes, verify

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
