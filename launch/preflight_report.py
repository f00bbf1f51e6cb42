"""The table ``kinoe preflight`` prints (and writes to report.txt) from its report; report.json
holds every figure."""

from __future__ import annotations

from typing import Any

from launch.memory_estimate import GiB


def model_section(config: Any, args: Any) -> dict[str, Any]:
    """The report's ``model`` section: what is judged, the same with or without a GPU."""
    return {
        "family": config.model.family,
        "preset": config.model.preset,
        "parameters": args.num_parameters(),
        "non_embedding_parameters": args.num_non_embedding_parameters(),
        "flops_per_token": args.flops_per_token(config.data.seq_len),
        "attention": args.attention,
        "activation_checkpointing": config.engine.activation_checkpointing,
        "compile": config.engine.compile,
    }


def count(number: int, noun: str) -> str:
    """``1 rank``, ``8 ranks``."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def gib(value: float) -> str:
    """Bytes as ``12.34 GiB``."""
    return f"{value / GiB:,.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    text = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days} d {text}" if days else text


def format_table(report: dict[str, Any]) -> str:
    """The report as the lines people read; report.json holds every figure."""
    model, world, batch = report["model"], report["world"], report["batch"]
    memory, speed, projection = report["memory"], report["speed"], report["projection"]
    checkpoint, placement, planned = report["checkpoint"], report["placement"], world["planned"]
    worst = batch["worst_case"]
    estimate_only = report.get("mode") == "estimate-only"
    parallel = f"ZeRO-{world['zero_stage']}"
    if world.get("expert_parallel", 1) > 1:
        parallel += f", experts over {world['expert_parallel']} ranks"
    rows = [
        (
            "model",
            f"{model['family']} {model['preset']}, {model['parameters']:,} parameters, "
            f"attention {model['attention']}",
        ),
        (
            "declared" if estimate_only else "measured on",
            f"{world['ranks']} x {world['device_name']}, {world['precision']}, {parallel}",
        ),
        (
            "planned",
            f"{count(planned['nodes'], 'node')} x {planned['gpus_per_node']} = "
            f"{count(planned['ranks'], 'rank')}, "
            f"{batch['accumulation_planned'] or '?'} micro-batches per step",
        ),
    ]
    if worst:
        rows.append(
            (
                "worst-case batch",
                f"{worst['batch']}; longest documents in phase {worst['phase']} "
                f"({worst['longest_document_tokens']:,} tokens)",
            )
        )
    estimate = memory["estimate"]
    parts = ", ".join(f"{k} {v / GiB:,.2f}" for k, v in estimate["parts_bytes"].items())
    rows.append(("memory estimate", f"at least {gib(estimate['total_bytes'])} ({parts} GiB)"))
    capacity = f"{gib(memory['capacity_bytes'])} ({memory['capacity_source']})"
    if memory["out_of_memory"]:
        measured = f"out of memory; capacity {capacity}"
    elif memory["peak_bytes"] is not None:
        share = memory["peak_bytes"] / memory["capacity_bytes"]
        measured = (
            f"peak {gib(memory['peak_bytes'])} of {capacity}: {share:.0%} "
            f"(GO at most {memory['limit_share']:.0%})"
        )
    elif estimate_only:
        share = estimate["total_bytes"] / memory["capacity_bytes"]
        measured = (
            f"not built: the estimate is {share:.0%} of {capacity} "
            f"(GO from the estimate at most {memory['limit_share']:.0%})"
        )
    else:
        measured = f"not built; capacity {capacity}"
    rows.append(("memory measured", measured))
    if memory.get("host_build_bytes") is not None:
        available = memory.get("host_available_bytes")
        rows.append(
            (
                "host memory",
                f"{gib(memory['host_build_bytes'])} per node to build the model"
                + (f", {gib(available)} available" if available is not None else ""),
            )
        )
    if speed["step_seconds"] is not None:
        if speed["final_micro_batch_seconds"] is None:
            split = f"from {speed['tokens_per_second_per_gpu']:,.0f} tokens/s per GPU, declared"
        elif speed["micro_batch_seconds"] is not None:
            split = (
                f"{batch['accumulation_planned'] - 1} x {speed['micro_batch_seconds']:.4f} s + "
                f"{speed['final_micro_batch_seconds']:.4f} s"
            )
        else:
            split = f"one micro-batch {speed['final_micro_batch_seconds']:.4f} s"
        rows.append(("step time", f"{_duration(speed['step_seconds'])} ({split})"))
        mfu = f", MFU {speed['mfu']:.1%}" if speed["mfu"] is not None else ""
        rows.append(
            (
                "throughput",
                f"{speed['tokens_per_second']:,.0f} tokens/s, "
                f"{speed['tokens_per_second_per_gpu']:,.0f} per GPU{mfu}; "
                f"{speed['tokens_per_day'] / 1e9:,.2f}B tokens/day",
            )
        )
    if projection["seconds"] is not None:
        rows.append(
            (
                "projection",
                f"{projection['steps_remaining']:,} of {projection['steps']:,} steps left: "
                f"{_duration(projection['seconds'])}, {projection['gpu_hours']:,.1f} GPU-hours "
                f"on {count(projection['ranks'], 'rank')}",
            )
        )
    if checkpoint:
        rows.append(
            (
                "checkpoints",
                f"{gib(checkpoint['bytes'])} each, up to {checkpoint['retained']} on disk: need "
                f"{gib(checkpoint['needed_bytes'])}, {gib(checkpoint['free_bytes'])} free at "
                f"{checkpoint['measured_at']}",
            )
        )
    if placement:
        where = ", ".join(f"{k}: {v}" for k, v in placement["tensors_per_device"].items())
        state = (
            f"{placement['misplaced']} not on {placement['device']}"
            if placement["misplaced"]
            else f"all on {placement['device']}"
        )
        rows.append(("placement", f"{state} ({where})"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"note: {note}" for note in report["notes"]]
    lines += ["", report["verdict"]]
    lines += [f"  - {reason}" for reason in report["reasons"]]
    return "\n".join(lines) + "\n"
