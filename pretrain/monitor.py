"""Training monitor: console lines, W&B logging, speed/MFU/memory figures and loss alerts, called once per step.

The training loop builds one ``Monitor`` on every rank and calls ``on_step`` after each
optimizer step; only the main rank prints, logs to W&B and writes ``<run_dir>/alerts.jsonl``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import resource
import sys
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from common.config import Config
from common.errors import KinoeError
from common.secrets import redact, secret_values
from pretrain.expert_load import ExpertLoadConfig

AlertLevel = Literal["INFO", "WARN", "ERROR"]
EndStatus = Literal["complete", "preempted", "failed"]

# Identical alerts (same title and level) closer together than this are dropped, here and by W&B.
ALERT_REPEAT_S = 600.0
# A flat loss window has std ~ 0, which would turn float noise into enormous z-scores.
_MIN_RELATIVE_STD = 1e-3
_MIN_SPIKE_WINDOW = 10
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
# SLURM preempts with SIGTERM; 128 + 15 is the shell's exit code for it.
_EXIT_CODES = {"complete": 0, "preempted": 143, "failed": 1}
_END_LEVELS: dict[str, AlertLevel] = {"complete": "INFO", "preempted": "WARN", "failed": "ERROR"}
_LOG_LEVELS = {"INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR}


class WandbConfig(Config):
    """Weights & Biases logging; the API key comes only from WANDB_API_KEY or `wandb login`."""

    enabled: bool = False
    mode: Literal["online", "offline"] = "online"  # offline: no network; upload with `wandb sync`
    entity: str | None = None
    project: str = "kinoe"
    group: str | None = None
    name: str | None = None  # None: the kinoe run name
    tags: list[str] = Field(default_factory=list)


class MonitorConfig(Config):
    """How often to report, where to, and when the loss is alarming."""

    log_interval: int = Field(10, ge=1, description="Steps between console lines and W&B points")
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    loss_spike_zscore: float = Field(6.0, gt=0, description="Alert above mean + z * std")
    loss_spike_window: int = Field(
        100, ge=_MIN_SPIKE_WINDOW, description="Recent finite losses the spike statistics use"
    )
    peak_flops_per_gpu: float | None = Field(
        None, gt=0, description="Peak FLOP/s per GPU for MFU; None: from the device name"
    )
    experts: ExpertLoadConfig = Field(
        default_factory=ExpertLoadConfig, description="Mixture-of-experts balance alerts"
    )


@dataclass
class StepMetrics:
    """What one finished optimizer step reports to the monitor."""

    step: int  # 1-based optimizer step just finished
    total_steps: int
    phase: str
    loss: float  # mean token loss over the global batch; nan/inf possible
    loss_by_source: dict[str, float]
    lr: float
    grad_norm: float | None
    tokens: int  # target tokens processed in this step, all ranks together
    step_seconds: float
    skipped: bool  # not applied (non-finite loss or gradients)
    consumed_tokens_by_source: dict[str, int]  # cumulative over the run
    extra: dict[str, float] = field(default_factory=dict)  # model-specific, logged under train/


def peak_flops_for(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU model by its CUDA name, or None when not in the table."""
    for fragment, flops in _PEAK_BF16_FLOPS:
        if fragment in device_name:
            return flops
    return None


class _Mean:
    """Running mean of the finite values added."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self.total += value
            self.count += 1

    def value(self) -> float | None:
        return self.total / self.count if self.count else None


class _Interval:
    """Sums over the steps since the last report."""

    def __init__(self) -> None:
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        self.loss, self.grad_norm = _Mean(), _Mean()
        self.loss_by_source: dict[str, _Mean] = {}
        self.extra: dict[str, _Mean] = {}

    def add(self, metrics: StepMetrics) -> None:
        self.steps += 1
        self.tokens += metrics.tokens
        self.seconds += metrics.step_seconds
        self.loss.add(metrics.loss)
        self.grad_norm.add(metrics.grad_norm)
        for means, values in (
            (self.loss_by_source, metrics.loss_by_source),
            (self.extra, metrics.extra),
        ):
            for key, value in values.items():
                means.setdefault(key, _Mean()).add(value)


class _SpikeDetector:
    """Flags a loss far above the recent window's mean; only finite losses enter the window."""

    def __init__(self, zscore: float, window: int) -> None:
        self.zscore = zscore
        self.losses: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> tuple[float, float, int] | None:
        """(z-score, window mean, window length) when ``loss`` is a spike, else None; then adds it."""
        found = None
        if len(self.losses) >= _MIN_SPIKE_WINDOW:
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
            std = max(std, _MIN_RELATIVE_STD * abs(mean), sys.float_info.min)
            z = (loss - mean) / std
            if z > self.zscore:
                found = (z, mean, len(self.losses))
        self.losses.append(loss)
        return found


class Monitor:
    """Reports training progress on the main rank: console, W&B, alerts; a no-op elsewhere."""

    def __init__(
        self,
        config: MonitorConfig,
        *,
        run_name: str,
        run_dir: Path,
        run_config: dict,
        is_main: bool,
        world_size: int,
        flops_per_token: float,
        device: torch.device,
        logger: logging.Logger,
        console_extra: Sequence[str] = (),
    ) -> None:
        self.config = config
        # Model-specific figures worth a place on the console line (e.g. MoE balance); every
        # extra goes to W&B regardless.
        self.console_extra = tuple(console_extra)
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.device = device
        self.logger = logger
        self.peak_flops = config.peak_flops_per_gpu
        if self.peak_flops is None and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            self.peak_flops = peak_flops_for(name)
            if self.peak_flops is None and is_main:
                logger.info(
                    "MFU not reported: peak FLOP/s of %s unknown; set monitor.peak_flops_per_gpu",
                    name,
                )
        self._secrets = secret_values()
        # The config's phase order is the same on every resume; first-seen order is not.
        data = run_config.get("data")
        phases = data.get("phases") or [] if isinstance(data, dict) else []
        self._phases = [p["name"] for p in phases if isinstance(p, dict) and "name" in p]
        self._interval = _Interval()
        self._spikes = _SpikeDetector(config.loss_spike_zscore, config.loss_spike_window)
        self._next_spike_alert_step = 0
        self._last_alert: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._skipped_steps = 0
        self._last: StepMetrics | None = None
        self._run: Any = None
        if is_main and config.wandb.enabled:
            self._run = self._start_wandb(run_name, run_config)

    def _start_wandb(self, run_name: str, run_config: dict) -> Any:
        import wandb

        settings = self.config.wandb
        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / "wandb_id"
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n", encoding="utf-8")
        try:
            return wandb.init(
                entity=settings.entity,
                project=settings.project,
                group=settings.group,
                name=settings.name or run_name,
                tags=settings.tags,
                mode=settings.mode,
                dir=self.run_dir,
                config=redact(run_config, self._secrets),
                id=run_id,
                resume="allow",
                # kinoe's own log file already holds the console, redacted; W&B's capture is not.
                settings=wandb.Settings(console="off"),
            )
        except wandb.errors.Error as err:
            raise KinoeError(
                f"W&B could not start ({err}); set WANDB_API_KEY or run `wandb login`, "
                "or set monitor.wandb.mode=offline"
            ) from None

    def on_step(self, metrics: StepMetrics) -> None:
        """Check this step's loss, add it to the interval, and report every log_interval steps."""
        if not self.is_main:
            return
        self._last = metrics
        self._skipped_steps += metrics.skipped
        if not math.isfinite(metrics.loss):
            count = f"{self._skipped_steps} so far"
            state = "step skipped" if metrics.skipped else "step applied anyway; skipped steps"
            self.alert(
                "non-finite loss",
                f"non-finite loss at step {metrics.step} ({state}; {count})",
                "ERROR",
            )
        else:
            spike = self._spikes.check(metrics.loss)
            if spike is not None and metrics.step >= self._next_spike_alert_step:
                self._next_spike_alert_step = metrics.step + self.config.loss_spike_window
                z, mean, window = spike
                self.alert(
                    "loss spike",
                    f"loss {metrics.loss:.4f} at step {metrics.step} is {z:.1f} standard deviations "
                    f"above the mean {mean:.4f} of the previous {window} steps",
                    "WARN",
                )
        self._interval.add(metrics)
        if metrics.step % self.config.log_interval == 0 or metrics.step >= metrics.total_steps:
            self._report()

    def _report(self) -> None:
        """Log the interval since the last report to the console and W&B, then start a new one."""
        interval, last = self._interval, self._last
        if last is None or interval.steps == 0:
            return
        self._interval = _Interval()
        tokens_per_s = interval.tokens / interval.seconds if interval.seconds > 0 else 0.0
        per_gpu = tokens_per_s / self.world_size
        step_seconds = interval.seconds / interval.steps
        loss, grad_norm = interval.loss.value(), interval.grad_norm.value()
        if last.phase not in self._phases:
            self._phases.append(last.phase)
        row: dict[str, float] = {
            "train/lr": last.lr,
            "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_gpu": per_gpu,
            "perf/step_seconds": step_seconds,
            "data/phase": self._phases.index(last.phase),
            "train/skipped_steps": self._skipped_steps,
        }
        if loss is not None:
            row["train/loss"] = loss
        if grad_norm is not None:
            row["train/grad_norm"] = grad_norm
        for source, mean in interval.loss_by_source.items():
            if mean.value() is not None:
                row[f"train/loss/{source}"] = mean.value()
        for key, mean in interval.extra.items():
            if mean.value() is not None:
                row[f"train/{key}"] = mean.value()
        for source, tokens in last.consumed_tokens_by_source.items():
            row[f"data/consumed_tokens/{source}"] = tokens

        parts = [
            f"step {last.step:,}/{last.total_steps:,}",
            f"phase {last.phase}",
            f"loss {loss:.4f}" if loss is not None else "loss nan",
            f"lr {last.lr:.3e}",
        ]
        if grad_norm is not None:
            parts.append(f"grad norm {grad_norm:.3f}")
        parts.append(f"{tokens_per_s:,.0f} tokens/s ({per_gpu:,.0f}/GPU)")
        if self.peak_flops is not None:
            mfu = self.flops_per_token * per_gpu / self.peak_flops
            row["perf/mfu"] = mfu
            parts.append(f"MFU {100 * mfu:.1f}%")
        if self.device.type == "cuda":
            gib = torch.cuda.max_memory_allocated(self.device) / 2**30
            row["memory/max_allocated_gib"] = gib
            parts.append(f"max allocated {gib:.1f} GiB")
        else:
            # On CPU there is no allocator peak; the process's peak RSS (KiB on Linux) stands in.
            gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            row["memory/peak_rss_gib"] = gib
            parts.append(f"peak RSS {gib:.1f} GiB")
        for key in self.console_extra:
            mean = interval.extra.get(key)
            if mean is not None and mean.value() is not None:
                parts.append(f"{key.rsplit('/', 1)[-1].replace('_', ' ')} {mean.value():.4g}")
        parts.append(f"skipped {self._skipped_steps}")
        # Same H:MM:SS form as common.progress.format_progress.
        remaining = max(last.total_steps - last.step, 0) * step_seconds
        parts.append(f"ETA {dt.timedelta(seconds=round(remaining))}")
        self.logger.info(" | ".join(parts))
        if self._run is not None:
            self._run.log(row, step=last.step)

    def record(self, step: int, title: str, values: dict[str, float]) -> None:
        """Log figures taken outside the step interval (a held-out evaluation): console and W&B."""
        if not self.is_main:
            return
        self.logger.info(
            "%s at step %s: %s",
            title,
            f"{step:,}",
            ", ".join(f"{k} {v:.4g}" for k, v in values.items()),
        )
        if self._run is not None:
            self._run.log(values, step=step)

    def alert(self, title: str, text: str, level: AlertLevel) -> None:
        """Raise an alert: console, ``<run_dir>/alerts.jsonl`` and W&B; repeats within ALERT_REPEAT_S are dropped."""
        if not self.is_main:
            return
        title, text = redact(title, self._secrets), redact(text, self._secrets)
        key, now = (title, level), time.monotonic()
        last = self._last_alert.get(key)
        if last is not None and now - last < ALERT_REPEAT_S:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last_alert[key] = now
        dropped = self._suppressed.pop(key, 0)
        if dropped:
            text += f" ({dropped} similar alert(s) dropped since the last one)"
        step = self._last.step if self._last is not None else None
        self.logger.log(_LOG_LEVELS[level], "alert %s: %s", title, text)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "step": step,
            "level": level,
            "title": title,
            "text": text,
        }
        with (self.run_dir / "alerts.jsonl").open("a", encoding="utf-8") as out:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self._run is not None:
            # W&B refuses titles of 64 characters or more.
            self._run.alert(title=title[:63], text=text, level=level, wait_duration=ALERT_REPEAT_S)

    def on_end(self, status: EndStatus, summary: dict) -> None:
        """Report the last partial interval, alert the outcome, and finish the W&B run."""
        if not self.is_main:
            return
        self._report()
        summary = redact(summary, self._secrets)
        where = f" at step {self._last.step:,}/{self._last.total_steps:,}" if self._last else ""
        details = ", ".join(f"{key} {value}" for key, value in summary.items())
        self.alert(
            f"run {status}",
            f"run {status}{where}" + (f": {details}" if details else ""),
            _END_LEVELS[status],
        )
        if self._run is not None:
            self._run.summary.update({**summary, "status": status})
            if status == "preempted":
                self._run.mark_preempting()
            self._finish(_EXIT_CODES[status])

    def close(self) -> None:
        """Finish the W&B run if on_end did not (then as failed: the outcome is unknown)."""
        self._finish(_EXIT_CODES["failed"])

    def _finish(self, exit_code: int) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish(exit_code=exit_code)
