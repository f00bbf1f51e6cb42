"""Speed and time to finish for ``kinoe preflight``: step time from the measured micro-batches
(or, estimate only, from a declared per-GPU rate), tokens/s, tokens/day and MFU, and the time
and GPU-hours of the steps the pretrain run has left on the planned number of ranks."""

from __future__ import annotations

from typing import Any

from common.errors import KinoeError
from common.run import run_directory

SECONDS_PER_DAY = 86_400


def throughput(config, args, measurement, accumulation, planned, device) -> dict[str, Any]:
    """Step time for ``accumulation`` micro-batches (s), tokens/s over the planned ranks and MFU."""
    from launch.preflight_measure import device_name
    from training.callbacks.speed import peak_flops_for

    speed: dict[str, Any] = {
        "micro_batch_seconds": None,
        "final_micro_batch_seconds": None,
        "step_seconds": None,
        "tokens_per_step": config.train.global_batch_size * config.data.seq_len,
        "tokens_per_second": None,
        "tokens_per_second_per_gpu": None,
        "tokens_per_day": None,
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
        peak = peak_flops_for(device_name(device))
    speed.update(
        step_seconds=step,
        tokens_per_second=per_second,
        tokens_per_second_per_gpu=per_gpu,
        tokens_per_day=per_second * SECONDS_PER_DAY,
        mfu=args.flops_per_token(config.data.seq_len) * per_gpu / peak if peak else None,
    )
    return speed


def declared_throughput(config, args, tokens_per_gpu_s: float | None, ranks: int) -> dict[str, Any]:
    """The speed section from a per-GPU rate measured elsewhere (tokens/s), on ``ranks`` GPUs.

    MFU needs ``monitor.peak_flops_per_gpu``: there is no device here to name the GPU.
    """
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    speed: dict[str, Any] = {
        "micro_batch_seconds": None,
        "final_micro_batch_seconds": None,
        "step_seconds": None,
        "tokens_per_step": tokens_per_step,
        "tokens_per_second": None,
        "tokens_per_second_per_gpu": tokens_per_gpu_s,
        "tokens_per_day": None,
        "mfu": None,
        "loss": None,
    }
    if tokens_per_gpu_s is None:
        return speed
    per_second = tokens_per_gpu_s * ranks
    peak = config.monitor.peak_flops_per_gpu
    speed.update(
        step_seconds=tokens_per_step / per_second,
        tokens_per_second=per_second,
        tokens_per_day=per_second * SECONDS_PER_DAY,
        mfu=args.flops_per_token(config.data.seq_len) * tokens_per_gpu_s / peak if peak else None,
    )
    return speed


def projected_time(config, context, world, speed, planned) -> dict[str, Any]:
    """Seconds and GPU-hours for the steps left after the pretrain run's latest checkpoint."""
    from training.checkpoint import Checkpointer

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
