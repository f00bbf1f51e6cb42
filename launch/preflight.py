"""``kinoe preflight -c <pretrain config>``: GO or NO-GO for a training run, on the hardware it will use.

It estimates the memory a rank needs (launch/memory_estimate.py) and refuses to build what
cannot fit; otherwise it builds the model and DeepSpeed engine as ``kinoe pretrain`` does, runs
the worst-case micro-batch forward, backward and through the optimizer step a few times
(launch/preflight_measure.py), and reports peak memory against capacity, step time, tokens/s,
the projected time and GPU-hours to finish (launch/preflight_projection.py), the checkpoint size
against free disk (launch/preflight_disk.py), and where every parameter and optimizer state
lives (the table: launch/preflight_report.py). With ``--estimate-only`` it judges the config for
a declared cluster instead, building and measuring nothing (launch/preflight_estimate.py).
Exit code 0 means GO, 3 NO-GO (under
``torchrun``, torchrun's own non-zero code); each reason is one line naming the fix
(launch/preflight_verdict.py turns memory and the measurement into reasons).
docs/preflight.md says how to read it.

This module is the command and ``check``, which runs every check in order and assembles the
report (report.json); launch/preflight_measure.py says why the measured micro-batch is the worst.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

from common.command import add_config_arguments
from common.errors import KinoeError
from common.run import Stage, StageContext, load_stage_config, run_stage
from launch.memory_estimate import expert_parallel_size
from launch.preflight_disk import checkpoint_disk
from launch.preflight_projection import projected_time, throughput
from launch.preflight_report import count, format_table, model_section
from launch.preflight_verdict import Verdict, judge_measurement, memory_before_building
from pretrain.cli import STAGE as PRETRAIN_STAGE
from pretrain.config import PretrainConfig

NO_GO_EXIT = 3
REPORT_NAME = "report.json"
TABLE_NAME = "report.txt"


@dataclass(frozen=True)
class Options:
    """The command-line settings besides the pretrain config."""

    memory_gb: float | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    steps: int = 3
    warmup: int = 1
    estimate_only: bool = False
    host_memory_gb: float | None = None
    tokens_per_gpu_s: float | None = None
    disk_free_gb: float | None = None


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
    parser.add_argument(
        "--estimate-only",
        action="store_true",
        help="judge the config for the declared cluster (--nodes, --gpus-per-node, --memory-gb) "
        "without building, measuring or reading shards; no GPU needed",
    )
    parser.add_argument(
        "--host-memory-gb",
        type=float,
        help="with --estimate-only: host memory per node, GiB, to check building the model",
    )
    parser.add_argument(
        "--tokens-per-gpu-s",
        type=float,
        help="with --estimate-only: tokens/s per GPU measured for this model, for tokens/day "
        "and the time to finish",
    )
    parser.add_argument(
        "--disk-free-gb",
        type=float,
        help="with --estimate-only: free space where the checkpoints go, GiB (default: measured "
        "at checkpoint.directory from here)",
    )


def main(args: argparse.Namespace) -> int:
    for name in (
        "memory_gb",
        "nodes",
        "gpus_per_node",
        "host_memory_gb",
        "tokens_per_gpu_s",
        "disk_free_gb",
    ):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise KinoeError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.steps < 1 or args.warmup < 0:
        raise KinoeError("--steps must be at least 1 and --warmup at least 0")
    declared = ("nodes", "gpus_per_node", "memory_gb")
    if args.estimate_only and any(getattr(args, name) is None for name in declared):
        raise KinoeError(
            "--estimate-only judges a declared cluster: give --nodes, --gpus-per-node and "
            "--memory-gb (GPU memory, GiB)"
        )
    if not args.estimate_only and (
        args.host_memory_gb or args.tokens_per_gpu_s or args.disk_free_gb
    ):
        raise KinoeError(
            "--host-memory-gb, --tokens-per-gpu-s and --disk-free-gb go with --estimate-only; a "
            "measured preflight reads them from the machine"
        )
    options = Options(
        args.memory_gb,
        args.nodes,
        args.gpus_per_node,
        args.steps,
        args.warmup,
        args.estimate_only,
        args.host_memory_gb,
        args.tokens_per_gpu_s,
        args.disk_free_gb,
    )
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
    if options.estimate_only:
        # Planning comes before the data: an estimate reads no tokenizer and no shards.
        return Stage("preflight", PretrainConfig, partial(preflight, options=options))
    return Stage(
        "preflight",
        PretrainConfig,
        partial(preflight, options=options),
        inputs=PRETRAIN_STAGE.inputs,
    )


def preflight(context: StageContext[PretrainConfig], options: Options) -> dict[str, Any]:
    """The stage body: check, measure, decide; rank 0 writes report.json and report.txt."""
    if options.estimate_only:
        from launch.preflight_estimate import Cluster, judge

        cluster = Cluster(
            options.nodes,
            options.gpus_per_node,
            options.memory_gb,
            options.host_memory_gb,
            options.tokens_per_gpu_s,
            options.disk_free_gb,
        )
        return _write_report(context, judge(context, cluster))

    import torch.distributed as dist

    from training.world import init_distributed

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
    if not world.is_main:
        return _summary(report)
    return _write_report(context, report)


def _write_report(context: StageContext[PretrainConfig], report: dict[str, Any]) -> dict[str, Any]:
    (context.run_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (context.run_dir / TABLE_NAME).write_text(format_table(report), encoding="utf-8")
    context.logger.info("preflight: %s", report["verdict"])
    for reason in report["reasons"]:
        context.logger.info("NO-GO: %s", reason)
    return _summary(report)


def _summary(report: dict[str, Any]) -> dict[str, Any]:
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
    from launch.preflight_measure import (
        device_name,
        measure,
        measurement_deepspeed_config,
        offload_devices,
        worst_case,
    )
    from pretrain.data import open_sources
    from pretrain.trainer import check_vocabulary
    from training.engine import accumulation_steps, precision

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

    memory, can_build = memory_before_building(
        config, args, dtype, world, ds_config, options.memory_gb, planned["ranks"], verdict
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
        judge_measurement(config, measurement, memory["capacity_bytes"], verdict)

    speed = throughput(config, args, measurement, accumulation, planned, world.device)
    projection = projected_time(config, context, world, speed, planned)
    checkpoint = checkpoint_disk(config, args, dtype, verdict) if world.is_main else {}
    return {
        "verdict": "NO-GO" if verdict.reasons else "GO",
        "reasons": verdict.reasons,
        "notes": verdict.notes,
        "model": model_section(config, args),
        "world": {
            "ranks": world.size,
            "device": world.device.type,
            "device_name": device_name(world.device),
            "precision": dtype,
            "zero_stage": config.engine.zero_stage,
            "expert_parallel": expert_parallel_size(config),
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
