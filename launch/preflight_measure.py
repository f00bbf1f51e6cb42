"""What ``kinoe preflight`` measures on the machine: memory capacity and peak, the worst-case
micro-batch's step times, and where the engine's parameters and optimizer states live; and what
the measurement runs: the worst-case micro-batch and the DeepSpeed config of the measured step.

On a GPU, memory is the device's: capacity is its total (or ``--memory-gb``, to which the
caching allocator is then capped), the peak is what the allocator reserved at most plus what
lies outside it (CUDA context, NCCL), read from the driver. On CPU, standing in for a GPU in
tests and on workstations, it is the process's: capacity is what it holds plus the RAM
available to each local rank (or ``--memory-gb``), the peak its peak resident set.

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

import logging
import os
import resource
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eval.placement import inspect_placement
from pretrain.config import PretrainConfig
from pretrain.data import make_batch
from pretrain.objective import LanguageModelling
from pretrain.trainer import build_model
from tokenizer.indexed import IndexedDataset
from training.engine import build_engine
from training.loop import micro_step
from training.losses import token_loss_function
from training.world import World

GiB = 2**30


def _meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_available_bytes() -> int:
    """RAM the kernel could give processes now without swapping (MemAvailable)."""
    available = _meminfo_bytes("MemAvailable")
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available


def _process_resident_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name(device: torch.device) -> str:
    """The GPU's name (``NVIDIA H200``), or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def capacity_bytes(device: torch.device, memory_gb: float | None) -> tuple[int, str]:
    """Memory one rank may use, and where that figure comes from."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if memory_gb is None:
            return total, f"{torch.cuda.get_device_name(device)} total"
        capacity = min(int(memory_gb * GiB), total)
        # The allocator then fails where a GPU of this size would, instead of succeeding here.
        torch.cuda.set_per_process_memory_fraction(capacity / total, device)
        return capacity, "--memory-gb"
    if memory_gb is not None:
        return int(memory_gb * GiB), "--memory-gb"
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = _process_resident_bytes() + host_available_bytes() // local_ranks
    return available, "RAM available to this rank"


def resident_bytes(device: torch.device) -> int:
    """Memory in use before the model is built: the device's (context and all), or this process's."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free
    return _process_resident_bytes()


def peak_bytes(device: torch.device) -> tuple[int, int]:
    """(peak in use, peak allocated by tensors) since the process started, bytes."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        outside_allocator = (total - free) - torch.cuda.memory_reserved(device)
        return (
            torch.cuda.max_memory_reserved(device) + max(outside_allocator, 0),
            torch.cuda.max_memory_allocated(device),
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak, peak


def _reduce(value: float, device: torch.device, op) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.item()


def reduce_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks."""
    return int(_reduce(value, device, dist.ReduceOp.MAX))


def reduce_min(value: int, device: torch.device) -> int:
    """The smallest ``value`` over all ranks."""
    return int(_reduce(value, device, dist.ReduceOp.MIN))


def worst_case(config: PretrainConfig, sources) -> dict[str, Any]:
    """The phase whose sources hold the longest document, and the batch that is measured."""
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


def worst_case_batch(config: PretrainConfig, eos_id: int, vocab_size: int, seed: int = 0):
    """``micro_batch_size`` samples of ``seq_len`` tokens, each one document (no EOS inside)."""
    rng = np.random.default_rng(seed)
    shape = (config.train.micro_batch_size, config.data.seq_len + 1)
    tokens = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
    tokens[tokens == eos_id] = (eos_id + 1) % vocab_size
    micro = config.train.micro_batch_size
    return make_batch(
        tokens,
        np.zeros(micro, dtype=np.int64),
        np.arange(micro, dtype=np.int64),
        eos_id,
        config.data.document_masking,
    )


def measurement_deepspeed_config(
    config: PretrainConfig, world, accumulation: int
) -> dict[str, Any]:
    """The run's DeepSpeed config (overrides included) with ``accumulation`` micro-batches a step."""
    from training.engine import deepspeed_config

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


def _on(tensor_device: torch.device, device: torch.device) -> bool:
    return tensor_device.type == device.type and (
        device.index is None or tensor_device.index in (device.index, None)
    )


def inspect_engine_placement(engine, device: torch.device, offload_allowed: bool) -> dict[str, Any]:
    """Where the engine's parameters, ZeRO-3 partitions and optimizer states are, and which are off ``device``."""
    placement = inspect_placement(engine.module, str(device))
    devices = dict(placement.devices)
    misplaced = list(placement.misplaced)
    for name, parameter in engine.module.named_parameters():
        # ZeRO-3 leaves an empty placeholder in the parameter and keeps this rank's share here.
        shard = getattr(parameter, "ds_tensor", None)
        if shard is None:
            continue
        key = f"ZeRO-3 partitions {shard.device}"
        devices[key] = devices.get(key, 0) + 1
        if not _on(shard.device, device):
            misplaced.append(f"{name} (ZeRO-3 partition) on {shard.device}")
    for what, tensor in _optimizer_tensors(engine.optimizer):
        key = f"optimizer {tensor.device}"
        devices[key] = devices.get(key, 0) + 1
        if not _on(tensor.device, device):
            misplaced.append(f"optimizer {what} on {tensor.device}")
    return {
        "device": str(device),
        "tensors_per_device": devices,
        "misplaced": len(misplaced),
        "misplaced_examples": misplaced[:10],
        "offload_allowed": offload_allowed,
    }


def _optimizer_tensors(optimizer) -> list[tuple[str, torch.Tensor]]:
    """The fp32 master weights and the moments of a (ZeRO-wrapped) optimizer, each once.

    ZeRO-1/2 keep this rank's master weights in ``single_partition_of_fp32_groups``, ZeRO-3 in
    ``fp32_partitioned_groups_flat`` (and hands them to the base optimizer only during a step);
    the base optimizer's state holds the moments, keyed by those tensors.
    """
    base = getattr(optimizer, "optimizer", optimizer)
    found: dict[int, tuple[str, torch.Tensor]] = {}
    masters = [
        *getattr(optimizer, "single_partition_of_fp32_groups", []),
        *getattr(optimizer, "fp32_partitioned_groups_flat", []),
        *(p for group in getattr(base, "param_groups", []) for p in group["params"]),
        *getattr(base, "state", {}).keys(),
    ]
    for tensor in masters:
        if isinstance(tensor, torch.Tensor):
            found.setdefault(id(tensor), ("master weights", tensor))
    for state in getattr(base, "state", {}).values():
        for key, value in state.items():
            # AdamW's step counter is a 0-dim tensor that may live on the host by design.
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                found.setdefault(id(value), (key, value))
    return list(found.values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    config: PretrainConfig,
    args: Any,
    world: World,
    ds_config: dict[str, Any],
    accumulation: int,
    eos_id: int,
    vocab_size: int,
    options,
    offload_allowed: bool,
    logger: logging.Logger,
) -> dict[str, Any]:
    """Build model and engine as training does, run the worst-case micro-batch, measure.

    Each step is ``accumulation`` micro-batches (1 or 2); the last of a step includes the
    gradient reduction and the optimizer step, the others only forward and backward. Times
    are medians over ``options.steps`` steps after ``options.warmup``, the slowest rank's. An
    out-of-memory error, while building or stepping, is recorded rather than raised.
    """
    device = world.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plain, final, losses = [], [], []
    out_of_memory = None
    engine = None
    try:
        model = build_model(config, args, world, logger, ds_config)
        engine = build_engine(model, config, ds_config)
        batch = worst_case_batch(config, eos_id, min(vocab_size, args.vocab_size)).to(device)
        objective = LanguageModelling(["worst_case"], token_loss_function(config.engine))
        sums = torch.zeros(objective.num_sums, dtype=torch.float64, device=device)
        for step in range(options.warmup + options.steps):
            for micro in range(accumulation):
                _synchronize(device)
                started = time.perf_counter()
                loss = micro_step(engine, objective, batch, sums)
                _synchronize(device)
                elapsed = time.perf_counter() - started
                losses.append(loss.item())
                if step >= options.warmup:
                    (final if micro == accumulation - 1 else plain).append(elapsed)
            if world.is_main:
                logger.info("preflight: step %d of %d", step + 1, options.warmup + options.steps)
    except torch.OutOfMemoryError as error:
        # "CUDA out of memory. Tried to allocate 3.97 GiB. GPU 0 has ...": the first two sentences.
        out_of_memory = ". ".join(str(error).splitlines()[0].split(". ")[:2])[:200]
        logger.error("preflight: out of memory: %s", out_of_memory)
    peak, peak_allocated = peak_bytes(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # after an out-of-memory error, room for the reductions below
    # After the steps: the optimizer allocates its moments in the first one.
    placement = (
        inspect_engine_placement(engine, device, offload_allowed) if engine is not None else None
    )
    figures = torch.tensor(
        [
            float(peak),
            float(peak_allocated),
            statistics.median(plain) if plain else 0.0,
            statistics.median(final) if final else 0.0,
            1.0 if out_of_memory else 0.0,
            0.0 if all(np.isfinite(losses)) else 1.0,
            float(placement["misplaced"]) if placement else 0.0,
        ],
        dtype=torch.float64,
        device=device,
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    peak, peak_allocated, plain_s, final_s, oom, nonfinite, misplaced = figures.cpu().tolist()
    if oom and out_of_memory is None:
        out_of_memory = "on another rank"
    if placement:
        placement["misplaced"] = int(misplaced)
    return {
        "peak_bytes": int(peak),
        "peak_allocated_bytes": int(peak_allocated),
        "micro_batch_seconds": plain_s if accumulation > 1 and not oom else None,
        "final_micro_batch_seconds": final_s if not oom else None,
        "out_of_memory": out_of_memory,
        "nonfinite_loss": bool(nonfinite),
        "loss": losses[-1] if losses else None,
        "placement": placement,
    }
