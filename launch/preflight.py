"""``kinoe preflight -c <pretrain config>``: GO or NO-GO for a training run, on the hardware it will use.

It estimates the memory a rank needs (launch/memory_estimate.py) and refuses to build what
cannot fit; otherwise it builds the model and DeepSpeed engine as ``kinoe pretrain`` does, runs
the worst-case micro-batch forward, backward and through the optimizer step a few times
(launch/preflight_measure.py), and reports peak memory against capacity, step time, tokens/s,
the projected time and GPU-hours to finish, the checkpoint size against free disk, and where
every parameter and optimizer state lives (the table: launch/preflight_report.py). Exit code
0 means GO, 3 NO-GO (under ``torchrun``, torchrun's own non-zero code); each reason is one line
naming the fix. docs/preflight.md says how to read it.

The worst-case micro-batch: every sample is ``data.seq_len`` tokens (documents are packed), so
length cannot vary; what varies with the data is where documents end. With document masking,
attention cost grows with the square of each document's length (FlexAttention skips blocks
across documents, flash-attn runs each document on its own) and a sample filled by one document
costs the most; SDPA's dense mask and unmasked attention cost the same whatever the documents.
So the measured batch is ``train.micro_batch_size`` samples of one document each (no EOS): an
upper bound for every phase. The report names the phase whose sources hold the longest
documents, where such samples are likeliest, and notes when no document fills a sample.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from common.command import add_config_arguments
from common.errors import KinoeError
from common.run import Stage, StageContext, load_stage_config, run_directory, run_stage
from launch.memory_estimate import (
    checkpoint_bytes,
    estimate_memory,
    host_build_bytes,
    memory_fixes,
)
from launch.preflight_report import count, format_table, gib
from pretrain.cli import STAGE as PRETRAIN_STAGE
from pretrain.config import CheckpointConfig, PretrainConfig

NO_GO_EXIT = 3
REPORT_NAME = "report.json"
TABLE_NAME = "report.txt"
# GO needs the measured peak below this share of capacity: over a long run the allocator's
# fragmentation grows and communicators that a few steps never create (checkpoint gathers)
# take their buffers, so a run measured at 99% would not last.
MEMORY_LIMIT_SHARE = 0.95


@dataclass(frozen=True)
class Options:
    """The command-line settings besides the pretrain config."""

    memory_gb: float | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    steps: int = 3
    warmup: int = 1


@dataclass
class Verdict:
    """Reasons for NO-GO (one line each, naming the fix) and notes that do not block."""

    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--memory-gb",
        type=float,
        help="memory per rank to check against, GiB (default: the GPU's; on CPU the RAM "
        "available); on a GPU the allocator is capped to it",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        help="nodes of the planned run, for the projection (default: this run's)",
    )
    parser.add_argument(
        "--gpus-per-node", type=int, help="ranks per node of the planned run (default: this node's)"
    )
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured steps before them (default 1)"
    )


def main(args: argparse.Namespace) -> int:
    for name in ("memory_gb", "nodes", "gpus_per_node"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise KinoeError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.steps < 1 or args.warmup < 0:
        raise KinoeError("--steps must be at least 1 and --warmup at least 0")
    options = Options(args.memory_gb, args.nodes, args.gpus_per_node, args.steps, args.warmup)
    config = load_stage_config(PretrainConfig, args.config, args.overrides)
    # A preflight measures this machine now, so a rerun measures again (and replaces the report)
    # rather than skipping as a stage with the same config and inputs would.
    result = run_stage(make_stage(options), config, force=True, command=["kinoe", *sys.argv[1:]])
    summary = result.manifest.summary or {}
    table = result.run_dir / TABLE_NAME
    if int(os.environ.get("RANK", "0")) == 0 and table.is_file():
        print(table.read_text(encoding="utf-8"), end="")
        print(f"report: {result.run_dir / REPORT_NAME}")
    return 0 if summary.get("verdict") == "GO" else NO_GO_EXIT


def make_stage(options: Options) -> Stage[PretrainConfig]:
    """The ``preflight`` stage: the pretrain config and inputs, run in ``<run.root>/preflight/<run.name>``."""
    return Stage(
        "preflight",
        PretrainConfig,
        partial(preflight, options=options),
        inputs=PRETRAIN_STAGE.inputs,
    )


def preflight(context: StageContext[PretrainConfig], options: Options) -> dict[str, Any]:
    """The stage body: check, measure, decide; rank 0 writes report.json and report.txt."""
    import torch.distributed as dist

    from pretrain.engine import init_distributed

    world = init_distributed()
    try:
        report = check(context, world, options)
        if world.size > 1:
            # Rank 0 alone looked at the disk; every rank must reach the same verdict and exit code.
            shared = [report]
            dist.broadcast_object_list(shared, src=0)
            report = shared[0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if world.is_main:
        (context.run_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        (context.run_dir / TABLE_NAME).write_text(format_table(report), encoding="utf-8")
        context.logger.info("preflight: %s", report["verdict"])
        for reason in report["reasons"]:
            context.logger.info("NO-GO: %s", reason)
    return {
        "verdict": report["verdict"],
        "reasons": report["reasons"],
        "peak_memory_bytes": report["memory"]["peak_bytes"],
        "capacity_bytes": report["memory"]["capacity_bytes"],
        "step_seconds": report["speed"]["step_seconds"],
        "projected_seconds": report["projection"]["seconds"],
        "report": REPORT_NAME,
    }


def check(context: StageContext[PretrainConfig], world, options: Options) -> dict[str, Any]:
    """Every check and measurement on this rank; the report (figures reduced over ranks)."""
    from launch.preflight_measure import measure
    from pretrain.data import open_sources
    from pretrain.engine import accumulation_steps, precision
    from pretrain.trainer import check_vocabulary

    config, logger = context.config, context.logger
    verdict = Verdict()
    args = config.model.build_args()
    dtype = precision(config, world.device)
    planned = planned_world(options, world.size)
    if world.device.type != "cuda":
        verdict.notes.append(
            "measured on CPU, which stands in for a GPU here: run preflight on the training "
            "hardware for figures that hold there"
        )
    if planned["ranks"] != world.size:
        verdict.notes.append(
            f"measured on {count(world.size, 'rank')}, projected for {planned['ranks']}: assumes each GPU "
            "keeps its measured speed (communication between nodes is not measured); memory per "
            "GPU is lower with more ZeRO ranks"
        )

    _, sources, eos_id, shard_vocab = open_sources(config.data)
    try:
        check_vocabulary(shard_vocab, args)
    except KinoeError as error:
        verdict.reasons.append(f"data: {error}")
    worst = worst_case(config, sources)
    if config.data.document_masking and worst["longest_document_tokens"] < config.data.seq_len:
        verdict.notes.append(
            f"no document fills a sample (longest {worst['longest_document_tokens']:,} tokens of "
            f"{config.data.seq_len:,}): the measured one-document batch is an upper bound"
        )
    try:
        accumulation = accumulation_steps(config, planned["ranks"])
    except KinoeError as error:
        verdict.reasons.append(f"batch: {error}")
        accumulation = None
    # A measured step is one plain micro-batch (forward and backward) and the one that ends the
    # step (with the gradient reduction and optimizer step): a step of A micro-batches takes
    # A - 1 plain ones and one final one, without running all A.
    measured_accumulation = 1 if accumulation == 1 else 2
    ds_config = measurement_deepspeed_config(config, world, measured_accumulation)
    if world.is_main:
        (context.run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    offload = offload_devices(ds_config)
    if offload:
        verdict.notes.append(
            f"engine.deepspeed offloads {', '.join(offload)}: those tensors live off the GPU by "
            "request and every step copies them"
        )

    memory, can_build = _memory_before_building(
        config, args, dtype, world, ds_config, options, verdict
    )
    measurement = None
    if can_build:
        measurement = measure(
            config,
            args,
            world,
            ds_config,
            measured_accumulation,
            eos_id,
            shard_vocab,
            options,
            bool(offload),
            logger,
        )
        memory.update(
            built=True,
            peak_bytes=measurement["peak_bytes"],
            peak_allocated_bytes=measurement["peak_allocated_bytes"],
            out_of_memory=measurement["out_of_memory"],
        )
        _judge_measurement(config, measurement, memory["capacity_bytes"], verdict)

    speed = _speed(config, args, measurement, accumulation, planned, world.device)
    projection = _projection(config, context, world, speed, planned)
    checkpoint = _checkpoint(config, args, dtype, verdict) if world.is_main else {}
    return {
        "verdict": "NO-GO" if verdict.reasons else "GO",
        "reasons": verdict.reasons,
        "notes": verdict.notes,
        "model": {
            "family": config.model.family,
            "preset": config.model.preset,
            "parameters": args.num_parameters(),
            "non_embedding_parameters": args.num_non_embedding_parameters(),
            "flops_per_token": args.flops_per_token(config.data.seq_len),
            "attention": args.attention,
            "activation_checkpointing": config.engine.activation_checkpointing,
            "compile": config.engine.compile,
        },
        "world": {
            "ranks": world.size,
            "device": world.device.type,
            "device_name": _device_name(world.device),
            "precision": dtype,
            "zero_stage": config.engine.zero_stage,
            "planned": planned,
        },
        "batch": {
            "micro_batch_size": config.train.micro_batch_size,
            "seq_len": config.data.seq_len,
            "global_batch_size": config.train.global_batch_size,
            "accumulation_planned": accumulation,
            "accumulation_measured": measured_accumulation,
            "worst_case": worst,
        },
        "memory": memory,
        "speed": speed,
        "projection": projection,
        "checkpoint": checkpoint,
        "placement": measurement["placement"] if measurement else None,
        "options": {
            "memory_gb": options.memory_gb,
            "steps": options.steps,
            "warmup": options.warmup,
        },
    }


def planned_world(options: Options, ranks: int) -> dict[str, int]:
    """Nodes, GPUs per node and ranks of the run to project for (default: this one)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(ranks)))
    gpus_per_node = options.gpus_per_node or local
    nodes = options.nodes or max(1, ranks // max(local, 1))
    return {"nodes": nodes, "gpus_per_node": gpus_per_node, "ranks": nodes * gpus_per_node}


def worst_case(config: PretrainConfig, sources) -> dict[str, Any]:
    """The phase whose sources hold the longest document, and the batch that is measured."""
    from tokenizer.indexed import IndexedDataset

    longest_by_source = {}
    for source in sources:
        lengths = [IndexedDataset(prefix).sequence_lengths for prefix in source.prefixes]
        longest_by_source[source.name] = max((int(x.max()) for x in lengths if len(x)), default=0)
    by_phase = {
        phase.name: max(longest_by_source[name] for name in phase.mixture)
        for phase in config.data.phases
    }
    phase = max(by_phase, key=lambda name: by_phase[name])
    return {
        "phase": phase,
        "longest_document_tokens": by_phase[phase],
        "longest_document_by_phase": by_phase,
        "document_masking": config.data.document_masking,
        "batch": f"{config.train.micro_batch_size} x {config.data.seq_len} tokens, "
        "one document per sample",
    }


def measurement_deepspeed_config(
    config: PretrainConfig, world, accumulation: int
) -> dict[str, Any]:
    """The run's DeepSpeed config (overrides included) with ``accumulation`` micro-batches a step."""
    from pretrain.engine import deepspeed_config

    batch = config.train.micro_batch_size * world.size * accumulation
    measured = config.model_copy(
        update={"train": config.train.model_copy(update={"global_batch_size": batch})}
    )
    ds_config = deepspeed_config(measured, world)
    ds_config.update(
        train_micro_batch_size_per_gpu=config.train.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        train_batch_size=batch,
    )
    return ds_config


def offload_devices(ds_config: dict[str, Any]) -> list[str]:
    """What the DeepSpeed config offloads off the GPU: ``optimizer to cpu``, ``parameters to nvme``."""
    zero = ds_config.get("zero_optimization", {})
    offloaded = []
    for key, what in (("offload_optimizer", "optimizer"), ("offload_param", "parameters")):
        target = str((zero.get(key) or {}).get("device", "none")).lower()
        if target not in ("none", ""):
            offloaded.append(f"{what} to {target}")
    return offloaded


def _memory_before_building(
    config: PretrainConfig,
    args,
    dtype: str,
    world,
    ds_config: dict[str, Any],
    options: Options,
    verdict: Verdict,
) -> tuple[dict[str, Any], bool]:
    """Capacity, the estimate and the host-memory check; whether building is worth trying."""
    from launch.preflight_measure import (
        capacity_bytes,
        host_available_bytes,
        reduce_max,
        reduce_min,
        resident_bytes,
    )

    on_gpu = world.device.type == "cuda"
    capacity, source = capacity_bytes(world.device, options.memory_gb)
    capacity = reduce_min(capacity, world.device)
    runtime = reduce_max(resident_bytes(world.device), world.device)
    estimate = estimate_memory(config, dtype, world.size, ds_config, on_gpu, runtime)
    planned = planned_world(options, world.size)["ranks"]
    memory: dict[str, Any] = {
        "capacity_bytes": capacity,
        "capacity_source": source,
        "limit_share": MEMORY_LIMIT_SHARE,
        "estimate": estimate.summary(),
        "estimate_planned": estimate_memory(
            config, dtype, planned, ds_config, on_gpu, runtime
        ).summary(),
        "built": False,
        "peak_bytes": None,
        "peak_allocated_bytes": None,
        "out_of_memory": None,
    }
    can_build = True
    if estimate.total > capacity:
        fixes = memory_fixes(config, dtype, world.size, ds_config, on_gpu, runtime, capacity)
        verdict.reasons.append(
            f"memory: at least {gib(estimate.total)} per rank estimated ({estimate.describe()}) "
            f"but {gib(capacity)} is available ({source}); not built; {fixes}"
        )
        can_build = False
    if on_gpu:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        host_need = host_build_bytes(args, dtype) * local_ranks
        host_free = reduce_min(host_available_bytes(), world.device)
        memory.update(host_build_bytes=host_need, host_available_bytes=host_free)
        if host_need > host_free:
            verdict.reasons.append(
                f"host memory: {local_ranks} ranks each build the model on the host "
                f"({gib(host_need)} together) but {gib(host_free)} is available; not built; "
                "use fewer ranks per node or nodes with more memory"
            )
            can_build = False
    return memory, can_build


def _memory_fix_hint(config: PretrainConfig) -> str:
    hints = []
    if config.train.micro_batch_size > 1:
        hints.append(f"lower train.micro_batch_size (now {config.train.micro_batch_size})")
    if not config.engine.activation_checkpointing:
        hints.append("set engine.activation_checkpointing=true")
    if config.engine.zero_stage < 3:
        hints.append(f"raise engine.zero_stage (now {config.engine.zero_stage}) to 3")
    hints.append("train on more GPUs or lower data.seq_len")
    return ", ".join(hints[:-1]) + f" or {hints[-1]}" if len(hints) > 1 else hints[0]


def _judge_measurement(
    config: PretrainConfig, measurement: dict[str, Any], capacity: int, verdict: Verdict
) -> None:
    hint = _memory_fix_hint(config)
    if measurement["out_of_memory"]:
        verdict.reasons.append(
            f"memory: out of memory on the worst-case micro-batch "
            f"({measurement['out_of_memory']}); {hint}"
        )
    elif measurement["peak_bytes"] > MEMORY_LIMIT_SHARE * capacity:
        share = measurement["peak_bytes"] / capacity
        verdict.reasons.append(
            f"memory: peak {gib(measurement['peak_bytes'])} on the worst-case micro-batch is "
            f"{share:.0%} of {gib(capacity)} (GO needs at most {MEMORY_LIMIT_SHARE:.0%}); {hint}"
        )
    if measurement["nonfinite_loss"]:
        verdict.reasons.append(
            "loss: not finite on the worst-case micro-batch at the start of training; check "
            "model.init_from, model.overrides and engine.precision"
        )
    placement = measurement["placement"]
    if placement and placement["misplaced"] and not placement["offload_allowed"]:
        examples = "; ".join(placement["misplaced_examples"][:3])
        verdict.reasons.append(
            f"placement: {placement['misplaced']} parameters or optimizer states are not on "
            f"{placement['device']} ({examples}) and engine.deepspeed configures no offload; "
            "check `kinoe doctor` (a CPU-only torch?) and engine.deepspeed"
        )


def _speed(config, args, measurement, accumulation, planned, device) -> dict[str, Any]:
    from pretrain.monitor import peak_flops_for

    speed: dict[str, Any] = {
        "micro_batch_seconds": None,
        "final_micro_batch_seconds": None,
        "step_seconds": None,
        "tokens_per_step": config.train.global_batch_size * config.data.seq_len,
        "tokens_per_second": None,
        "tokens_per_second_per_gpu": None,
        "mfu": None,
        "loss": None,
    }
    if not measurement or measurement["out_of_memory"]:
        return speed
    plain, final = measurement["micro_batch_seconds"], measurement["final_micro_batch_seconds"]
    speed.update(
        micro_batch_seconds=plain, final_micro_batch_seconds=final, loss=measurement["loss"]
    )
    if accumulation is None:
        return speed
    step = (accumulation - 1) * (plain or 0.0) + final
    per_second = speed["tokens_per_step"] / step
    per_gpu = per_second / planned["ranks"]
    peak = config.monitor.peak_flops_per_gpu
    if peak is None and device.type == "cuda":
        peak = peak_flops_for(_device_name(device))
    speed.update(
        step_seconds=step,
        tokens_per_second=per_second,
        tokens_per_second_per_gpu=per_gpu,
        mfu=args.flops_per_token(config.data.seq_len) * per_gpu / peak if peak else None,
    )
    return speed


def _projection(config, context, world, speed, planned) -> dict[str, Any]:
    from pretrain.checkpoint import Checkpointer

    directory = config.checkpoint_dir(run_directory("pretrain", config))
    try:
        done = Checkpointer(directory, config.checkpoint, world, context.logger).latest_step()
    except KinoeError:
        done = None  # a broken `latest`: the pretrain run itself will say so
    remaining = max(config.train.steps - (done or 0), 0)
    step = speed["step_seconds"]
    seconds = remaining * step if step is not None else None
    return {
        "steps": config.train.steps,
        "steps_done": done or 0,
        "steps_remaining": remaining,
        "seconds": seconds,
        "gpu_hours": seconds * planned["ranks"] / 3600 if seconds is not None else None,
        "ranks": planned["ranks"],
    }


def retained_checkpoints(checkpoint: CheckpointConfig, steps: int) -> int:
    """Most checkpoints on disk at once: ``keep_last``, the one being written, every kept multiple."""
    saved = set(range(checkpoint.interval, steps + 1, checkpoint.interval)) | {steps}
    kept_for_good = (
        {step for step in saved if step % checkpoint.keep_every == 0}
        if checkpoint.keep_every
        else set()
    )
    return min(checkpoint.keep_last + 1 + len(kept_for_good), len(saved))


def _checkpoint(config: PretrainConfig, args, dtype: str, verdict: Verdict) -> dict[str, Any]:
    directory = config.checkpoint_dir(run_directory("pretrain", config)).resolve()
    size = checkpoint_bytes(args, dtype)
    retained = retained_checkpoints(config.checkpoint, config.train.steps)
    existing = _tree_bytes(directory)  # a resumed run's checkpoints count towards those kept
    needed = max(retained * size - existing, 0)
    measured_at = directory
    while not measured_at.exists():
        measured_at = measured_at.parent
    free = shutil.disk_usage(measured_at).free
    if free < needed:
        verdict.reasons.append(
            f"disk: {gib(free)} free at {measured_at}, but up to {retained} checkpoints of "
            f"{gib(size)} need {gib(needed)} more; free space there, lower "
            f"checkpoint.keep_last (now {config.checkpoint.keep_last}), or set "
            "checkpoint.directory on a larger filesystem"
        )
    return {
        "directory": str(directory),
        "bytes": size,
        "retained": retained,
        "existing_bytes": existing,
        "needed_bytes": needed,
        "free_bytes": free,
        "measured_at": str(measured_at),
    }


def _tree_bytes(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
