"""How ``kinoe preflight``'s memory figures and measurement become NO-GO reasons, each one line
naming the fix: memory before building (the estimate against capacity, and host memory for
building) and after measuring (peak against capacity, out of memory, a non-finite loss, tensors
off the GPU). ``Verdict`` collects the reasons and notes; the data, batch and disk checks add
theirs where they are made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from launch.memory_estimate import estimate_memory, host_build_bytes, memory_fixes
from launch.preflight_report import gib
from pretrain.config import PretrainConfig

# GO needs the measured peak below this share of capacity: over a long run the allocator's
# fragmentation grows and communicators that a few steps never create (checkpoint gathers)
# take their buffers, so a run measured at 99% would not last.
MEMORY_LIMIT_SHARE = 0.95


@dataclass
class Verdict:
    """Reasons for NO-GO (one line each, naming the fix) and notes that do not block."""

    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def memory_before_building(
    config: PretrainConfig,
    args,
    dtype: str,
    world,
    ds_config: dict[str, Any],
    memory_gb: float | None,
    planned_ranks: int,
    verdict: Verdict,
) -> tuple[dict[str, Any], bool]:
    """Capacity (``memory_gb`` if given), the estimate here and on ``planned_ranks`` and the
    host-memory check: the report's memory section, and whether building is worth trying."""
    from launch.preflight_measure import (
        capacity_bytes,
        host_available_bytes,
        reduce_max,
        reduce_min,
        resident_bytes,
    )

    on_gpu = world.device.type == "cuda"
    capacity, source = capacity_bytes(world.device, memory_gb)
    capacity = reduce_min(capacity, world.device)
    runtime = reduce_max(resident_bytes(world.device), world.device)
    estimate = estimate_memory(config, dtype, world.size, ds_config, on_gpu, runtime)
    memory: dict[str, Any] = {
        "capacity_bytes": capacity,
        "capacity_source": source,
        "limit_share": MEMORY_LIMIT_SHARE,
        "estimate": estimate.summary(),
        "estimate_planned": estimate_memory(
            config, dtype, planned_ranks, ds_config, on_gpu, runtime
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
        host_need = host_build_bytes(config, dtype) * local_ranks
        host_free = reduce_min(host_available_bytes(), world.device)
        memory.update(host_build_bytes=host_need, host_available_bytes=host_free)
        if host_need > host_free:
            verdict.reasons.append(
                f"host memory: {local_ranks} ranks each build the model on the host "
                f"({'one parameter at a time' if config.engine.zero_stage == 3 else 'all of it'}, "
                f"{gib(host_need)} together) but {gib(host_free)} is available; not built; "
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


def judge_measurement(
    config: PretrainConfig, measurement: dict[str, Any], capacity: int, verdict: Verdict
) -> None:
    """The reasons the measurement gives for NO-GO: memory (``capacity`` bytes), loss, placement."""
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
