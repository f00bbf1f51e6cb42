"""Speed, MFU and memory of each log interval, added to the report for the console and W&B."""

from __future__ import annotations

import resource

import torch

from training.callbacks.base import Callback, Report, RunInfo

# Dense bf16 tensor-core peaks from NVIDIA's datasheets; the first matching name wins, so the
# PCIe and NVL variants of the H100 (lower clocks) come before the SXM default.
_PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
)


def peak_flops_for(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU model by its CUDA name, or None when not in the table."""
    for fragment, flops in _PEAK_BF16_FLOPS:
        if fragment in device_name:
            return flops
    return None


class SpeedMonitor(Callback):
    """Tokens/s (all ranks and per GPU), seconds per step, MFU and peak memory per interval.

    MFU = flops_per_token x tokens/s per GPU / peak FLOP/s per GPU, with the model's own
    FLOPs per token (6 x non-embedding parameters + the attention term, ``args.flops_per_token``).
    """

    def __init__(self, run: RunInfo, peak_flops_per_gpu: float | None):
        self.run = run
        self.peak_flops = peak_flops_per_gpu
        if self.peak_flops is None and run.device.type == "cuda":
            name = torch.cuda.get_device_name(run.device)
            self.peak_flops = peak_flops_for(name)
            if self.peak_flops is None:
                run.logger.info(
                    "MFU not reported: peak FLOP/s of %s unknown; set monitor.peak_flops_per_gpu",
                    name,
                )

    def on_report(self, report: Report) -> None:
        tokens_per_s = report.tokens / report.seconds if report.seconds > 0 else 0.0
        per_gpu = tokens_per_s / self.run.world_size
        report.values["perf/tokens_per_s"] = tokens_per_s
        report.values["perf/tokens_per_s_per_gpu"] = per_gpu
        report.values["perf/step_seconds"] = report.seconds / report.steps
        if self.peak_flops is not None:
            report.values["perf/mfu"] = self.run.flops_per_token * per_gpu / self.peak_flops
        if self.run.device.type == "cuda":
            report.values["memory/max_allocated_gib"] = (
                torch.cuda.max_memory_allocated(self.run.device) / 2**30
            )
        else:
            # On CPU there is no allocator peak; the process's peak RSS (KiB on Linux) stands in.
            report.values["memory/peak_rss_gib"] = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            )
