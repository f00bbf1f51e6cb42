"""``kinoe preflight --estimate-only``: GO or NO-GO for a declared cluster, with no GPU and no data.

Before the GPUs are allocated (or the shards exist) the question is whether a config can run on
N nodes x G GPUs of M GiB: this judges the floor of each rank's GPU memory
(launch/memory_estimate.py, on the planned number of ranks), the host memory a node's ranks
need to build the model, the checkpoints' size on disk, whether the batch and expert
parallelism split over the ranks, and, from a per-GPU rate measured elsewhere, tokens/day and
the time to finish. Nothing is built and no shard is read. The report has the measured
preflight's sections (report.json, report.txt), with ``mode: estimate-only``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from common.errors import KinoeError
from common.run import StageContext
from launch.memory_estimate import (
    GiB,
    estimate_memory,
    expert_parallel_size,
    host_build_bytes,
    memory_fixes,
)
from launch.preflight_disk import checkpoint_disk
from launch.preflight_projection import declared_throughput, projected_time
from launch.preflight_report import gib, model_section
from launch.preflight_verdict import Verdict
from pretrain.config import PretrainConfig
from training.world import World

# The measured verdict needs the device peak within 95% of capacity, and measured device peaks
# have been up to 1.35 times the floor (docs/preflight.md, "The estimate against measurement":
# the caching allocator's reserve, grouped GEMMs, communicator buffers). A floor above
# 0.95 / 1.35 of capacity may well run out of memory, so the estimate alone says GO below it.
ESTIMATE_LIMIT_SHARE = 0.70


@dataclass(frozen=True)
class Cluster:
    """The declared cluster: its shape, memory per GPU and per node, measured per-GPU speed."""

    nodes: int
    gpus_per_node: int
    memory_gb: float
    host_memory_gb: float | None = None
    tokens_per_gpu_s: float | None = None
    disk_free_gb: float | None = None

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node


def judge(context: StageContext[PretrainConfig], cluster: Cluster) -> dict[str, Any]:
    """The estimate-only report for ``cluster``: every figure, reasons and notes, the verdict."""
    from launch.preflight_measure import measurement_deepspeed_config, offload_devices
    from training.engine import accumulation_steps, precision

    config = context.config
    verdict = Verdict()
    args = config.model.build_args()
    # The declared ranks as a world: the device type decides precision and DeepSpeed's buffers.
    world = World(rank=0, local_rank=0, size=cluster.ranks, device=torch.device("cuda"))
    dtype = precision(config, world.device)
    planned = {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "ranks": world.size}
    verdict.notes.append(
        "estimate only: nothing was built or measured; measure on one node of the cluster "
        "(kinoe preflight without --estimate-only) before the long run"
    )
    try:
        accumulation = accumulation_steps(config, world.size)
    except KinoeError as error:
        verdict.reasons.append(f"batch: {error}")
        accumulation = None
    expert_parallel = expert_parallel_size(config)
    _check_expert_parallel(args, expert_parallel, world.size, verdict)
    ds_config = measurement_deepspeed_config(config, world, accumulation or 1)
    offload = offload_devices(ds_config)
    if offload:
        verdict.notes.append(
            f"engine.deepspeed offloads {', '.join(offload)}: the estimate counts those tensors "
            "on the GPU, so it is higher than the run's"
        )

    memory = _gpu_memory(config, dtype, world.size, ds_config, cluster, verdict)
    memory.update(_host_memory(config, dtype, cluster, verdict))
    speed = declared_throughput(config, args, cluster.tokens_per_gpu_s, world.size)
    if speed["mfu"] is not None and speed["mfu"] > 1:
        raise KinoeError(
            f"--tokens-per-gpu-s {cluster.tokens_per_gpu_s:,.0f} would be {speed['mfu']:.0%} of "
            f"the GPU's peak (monitor.peak_flops_per_gpu); give the per-GPU rate a run measured"
        )
    if speed["tokens_per_second"] is None:
        verdict.notes.append(
            "no --tokens-per-gpu-s: give a per-GPU rate measured on this model (kinoe preflight "
            "on one node, or a run's tokens/s per GPU) to project tokens/day and time"
        )
    projection = projected_time(config, context, world, speed, planned)
    declared_free = int(cluster.disk_free_gb * GiB) if cluster.disk_free_gb else None
    checkpoint = checkpoint_disk(config, args, dtype, verdict, declared_free)
    return {
        "mode": "estimate-only",
        "verdict": "NO-GO" if verdict.reasons else "GO",
        "reasons": verdict.reasons,
        "notes": verdict.notes,
        "model": model_section(config, args),
        "world": {
            "ranks": world.size,
            "device": "declared",
            "device_name": f"GPU of {cluster.memory_gb:g} GiB",
            "precision": dtype,
            "zero_stage": config.engine.zero_stage,
            "expert_parallel": expert_parallel,
            "planned": planned,
        },
        "batch": {
            "micro_batch_size": config.train.micro_batch_size,
            "seq_len": config.data.seq_len,
            "global_batch_size": config.train.global_batch_size,
            "accumulation_planned": accumulation,
            "accumulation_measured": None,
            "worst_case": None,
        },
        "memory": memory,
        "speed": speed,
        "projection": projection,
        "checkpoint": checkpoint,
        "placement": None,
        "options": {
            "memory_gb": cluster.memory_gb,
            "host_memory_gb": cluster.host_memory_gb,
            "tokens_per_gpu_s": cluster.tokens_per_gpu_s,
            "disk_free_gb": cluster.disk_free_gb,
        },
    }


def _check_expert_parallel(args, expert_parallel: int, ranks: int, verdict: Verdict) -> None:
    if expert_parallel == 1:
        return
    experts = getattr(args, "num_experts", None)
    if experts is None:
        verdict.reasons.append(
            f"parallel: engine.expert_parallel={expert_parallel} but the model has no experts; "
            "set engine.expert_parallel=1"
        )
    elif experts % expert_parallel:
        verdict.reasons.append(
            f"parallel: {experts} experts do not split over engine.expert_parallel="
            f"{expert_parallel} ranks; use a divisor of {experts}"
        )
    if ranks % expert_parallel:
        verdict.reasons.append(
            f"parallel: {ranks} ranks are not a multiple of engine.expert_parallel="
            f"{expert_parallel}; change the cluster shape or engine.expert_parallel"
        )


def _gpu_memory(config, dtype, ranks, ds_config, cluster, verdict) -> dict[str, Any]:
    capacity = int(cluster.memory_gb * GiB)
    # The CUDA context and NCCL's own memory: about what an H100 or H200 holds before building.
    runtime = int(0.5 * GiB)
    estimate = estimate_memory(config, dtype, ranks, ds_config, True, runtime)
    limit = int(ESTIMATE_LIMIT_SHARE * capacity)
    if estimate.total > limit:
        fixes = memory_fixes(config, dtype, ranks, ds_config, True, runtime, limit)
        verdict.reasons.append(
            f"memory: at least {gib(estimate.total)} per rank estimated ({estimate.describe()}) "
            f"on {ranks} ranks, {estimate.total / capacity:.0%} of {gib(capacity)} (--memory-gb; "
            f"GO from the estimate alone needs at most {ESTIMATE_LIMIT_SHARE:.0%}); {fixes}"
        )
    return {
        "capacity_bytes": capacity,
        "capacity_source": "--memory-gb",
        "limit_share": ESTIMATE_LIMIT_SHARE,
        "estimate": estimate.summary(),
        "estimate_planned": estimate.summary(),
        "built": False,
        "peak_bytes": None,
        "peak_allocated_bytes": None,
        "out_of_memory": None,
    }


def _host_memory(config, dtype, cluster, verdict) -> dict[str, Any]:
    need = host_build_bytes(config, dtype) * cluster.gpus_per_node
    available = int(cluster.host_memory_gb * GiB) if cluster.host_memory_gb else None
    how = "one parameter at a time" if config.engine.zero_stage == 3 else "all of its part"
    if available is None:
        verdict.notes.append(
            f"host memory: a node's {cluster.gpus_per_node} ranks build the model ({how}) in "
            f"{gib(need)} together; give --host-memory-gb to check it"
        )
    elif need > available:
        verdict.reasons.append(
            f"host memory: a node's {cluster.gpus_per_node} ranks each build the model on the "
            f"host ({how}, {gib(need)} together) but a node has {gib(available)} "
            "(--host-memory-gb); use fewer ranks per node or nodes with more memory"
            + (
                ""
                if config.engine.zero_stage == 3
                else ", or engine.zero_stage=3 (which builds "
                "straight into partitions) without expert parallelism"
            )
        )
    return {"host_build_bytes": need, "host_available_bytes": available}
