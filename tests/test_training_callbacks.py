"""The training core's callbacks: offline W&B history and alerts read back from the .wandb file,
alerts.jsonl, metrics.jsonl, the console line, speed, ranks, secrets; each reporter alone too."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import wandb
from pydantic import ValidationError

import training.callbacks.dispatch as dispatch_module
from training.callbacks import Callbacks, RunInfo, StepMetrics, standard_callbacks
from training.callbacks.alerts import LossAlerts
from training.callbacks.base import Callback
from training.callbacks.metrics_file import MetricsFile
from training.callbacks.speed import peak_flops_for
from training.config import MonitorConfig
from training.world import World

from wandb_records import offline_runs, records_of

FAKE_KEY = "fake0123456789abcdef0123456789abcdef0123"
RUN_CONFIG = {"data": {"phases": [{"name": "main"}, {"name": "anneal"}]}, "model": {"layers": 2}}


class _Lines(logging.Handler):
    """Keeps each formatted record, so tests can read what the monitor printed."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def console() -> tuple[logging.Logger, _Lines]:
    logger = logging.getLogger(f"test_pretrain_monitor.{id(object())}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = _Lines()
    logger.addHandler(handler)
    return logger, handler


def _config(wandb_on: bool = True, **changes) -> MonitorConfig:
    wandb_section = {"enabled": wandb_on, "mode": "offline", "tags": ["test"]}
    return MonitorConfig.model_validate({"wandb": wandb_section, **changes})


def _run(run_dir: Path, logger: logging.Logger, **changes) -> RunInfo:
    arguments = {
        "name": "monitor-test",
        "run_dir": run_dir,
        "config": RUN_CONFIG,
        "world_size": 2,
        "device": torch.device("cpu"),
        "flops_per_token": 1e9,
        "logger": logger,
        "phases": ("main", "anneal"),
        **changes,
    }
    return RunInfo(**arguments)


def _monitor(
    monitor: MonitorConfig, run_dir: Path, logger: logging.Logger, is_main: bool = True, **changes
) -> Callbacks:
    """The callbacks every run has, as rank 0 (or rank 1) of two builds them."""
    world = World(rank=0 if is_main else 1, local_rank=0, size=2, device=torch.device("cpu"))
    model = torch.nn.Linear(2, 2)  # no experts
    return standard_callbacks(monitor, _run(run_dir, logger, **changes), world, model)


def _step(step: int, total: int = 40, loss: float | None = None, **changes) -> StepMetrics:
    loss = 2.0 + 0.01 * (-1) ** step if loss is None else loss
    fields = {
        "step": step,
        "total_steps": total,
        "phase": "main" if step <= 20 else "anneal",
        "loss": loss,
        "loss_by_source": {"web": loss, "wiki": loss + 0.5},
        "lr": 1e-3,
        "grad_norm": 1.5,
        "tokens": 4096,
        "step_seconds": 0.5,
        "skipped": not math.isfinite(loss),
        "consumed_tokens_by_source": {"web": 3000 * step, "wiki": 1096 * step},
        "extra": {"moe_aux_loss": 0.01},
        **changes,
    }
    return StepMetrics(**fields)


def _items(updates) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}


def _alerts(run_dir: Path) -> list[dict]:
    path = run_dir / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_offline_wandb_history_and_alerts(tmp_path, console):
    logger, _ = console
    config = _config(log_interval=5, loss_spike_window=20, peak_flops_per_gpu=1e13)
    monitor = _monitor(config, tmp_path, logger)
    for step in range(1, 41):
        loss = {15: math.nan, 16: math.inf, 30: 10.0}.get(step)
        monitor.on_step(_step(step, loss=loss))
    monitor.end("complete", {"tokens": 40 * 4096})

    [records] = offline_runs(tmp_path)
    history = {row.step.num: _items(row.item) for row in records_of(records, "history")}
    assert sorted(history) == list(range(5, 41, 5))
    row = history[10]
    assert row["train/loss"] == pytest.approx(2.002)  # steps 6..10 alternate 2.01, 1.99
    assert row["train/loss/wiki"] == pytest.approx(2.502)
    assert row["train/lr"] == 1e-3 and row["train/grad_norm"] == 1.5
    assert row["perf/tokens_per_s"] == 8192 and row["perf/tokens_per_s_per_gpu"] == 4096
    assert row["perf/mfu"] == pytest.approx(1e9 * 4096 / 1e13)
    assert row["perf/step_seconds"] == 0.5
    assert row["memory/peak_rss_gib"] > 0
    assert row["data/consumed_tokens/web"] == 30000
    assert row["train/moe_aux_loss"] == pytest.approx(0.01)
    assert (row["data/phase"], history[25]["data/phase"]) == (0, 1)
    assert history[15]["train/loss"] == pytest.approx(2.0)  # the NaN at step 15 is left out
    assert (history[10]["train/skipped_steps"], history[20]["train/skipped_steps"]) == (0, 2)

    # Two non-finite steps in a row alert once; one spike alerts; the end alerts.
    alerts = [(a.title, a.level) for a in records_of(records, "alert")]
    assert alerts == [
        ("non-finite loss", "ERROR"),
        ("loss spike", "WARN"),
        ("run complete", "INFO"),
    ]
    written = _alerts(tmp_path)
    assert [(a["step"], a["level"], a["title"]) for a in written] == [
        (15, "ERROR", "non-finite loss"),
        (30, "WARN", "loss spike"),
        (40, "INFO", "run complete"),
    ]
    assert written[0]["text"] == "non-finite loss at step 15 (step skipped; 1 so far)"
    assert "loss 10.0000 at step 30" in written[1]["text"]
    [run] = records_of(records, "run")
    assert _items(run.config.update)["model"] == {"layers": 2}
    assert list(run.tags) == ["test"] and run.display_name == "monitor-test"
    assert records_of(records, "exit")[0].exit_code == 0
    summary = {k: v for s in records_of(records, "summary") for k, v in _items(s.update).items()}
    assert summary["status"] == "complete" and summary["tokens"] == 40 * 4096


def test_resumed_monitor_continues_the_same_wandb_run(tmp_path, console):
    logger, _ = console
    first = _monitor(_config(), tmp_path, logger)
    first.on_step(_step(10))
    first.end("preempted", {})
    run_id = (tmp_path / "wandb_id").read_text().strip()

    second = _monitor(_config(), tmp_path, logger)
    second.on_step(_step(11, loss=math.nan))
    second.close()  # without on_end: the outcome is unknown, so W&B records a failure

    runs = offline_runs(tmp_path)
    assert len(runs) == 2
    assert [records_of(records, "run")[0].run_id for records in runs] == [run_id, run_id]
    assert [records_of(records, "exit")[0].exit_code for records in runs] == [143, 1]
    assert [a.title for a in records_of(runs[0], "alert")] == ["run preempted"]
    assert [a.title for a in records_of(runs[1], "alert")] == ["non-finite loss"]


def test_api_key_never_reaches_a_file(tmp_path, monkeypatch, console):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    logger, _ = console
    # A plain file handler without kinoe's redacting filter: the monitor must redact by itself.
    to_file = logging.FileHandler(tmp_path / "train.log", encoding="utf-8")
    logger.addHandler(to_file)
    run_config = {**RUN_CONFIG, "note": f"launched with {FAKE_KEY}", "key": FAKE_KEY}
    monitor = _monitor(_config(log_interval=1), tmp_path, logger, config=run_config)
    monitor.on_step(_step(1))
    monitor.alert("leak check", f"the key is {FAKE_KEY}", "WARN")
    monitor.end("failed", {"error": f"auth failed for {FAKE_KEY}"})
    to_file.close()

    [records] = offline_runs(tmp_path)
    assert records_of(records, "exit")[0].exit_code == 1
    assert "<redacted:WANDB_API_KEY>" in (tmp_path / "train.log").read_text()
    assert "<redacted:WANDB_API_KEY>" in (tmp_path / "alerts.jsonl").read_text()
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert [path for path in files if FAKE_KEY.encode() in path.read_bytes()] == []


def test_console_line_has_speed_mfu_memory_and_eta(tmp_path, console):
    logger, lines = console
    monitor = _monitor(_config(False, log_interval=2, peak_flops_per_gpu=1e13), tmp_path, logger)
    for step in range(1, 6):
        monitor.on_step(_step(step, total=5))
    assert len(lines.lines) == 3  # steps 2 and 4, and the last step
    line = lines.lines[0]
    assert line.startswith("step 2/5 | phase main | loss 2.0000 | lr 1.000e-03 | grad norm 1.500")
    assert "8,192 tokens/s (4,096/GPU)" in line and "MFU 41.0%" in line
    assert "peak RSS" in line and "skipped 0" in line
    assert line.endswith("ETA 0:00:02")  # 3 steps left at 0.5 s each, rounded
    assert lines.lines[-1].startswith("step 5/5") and lines.lines[-1].endswith("ETA 0:00:00")
    assert not (tmp_path / "wandb").exists()


def test_no_mfu_without_a_known_peak(tmp_path, console):
    logger, lines = console
    monitor = _monitor(_config(False, log_interval=1), tmp_path, logger)
    monitor.on_step(_step(1))
    assert "tokens/s" in lines.lines[0] and "MFU" not in lines.lines[0]


def test_spikes_alert_once_per_window_and_ignore_non_finite_losses(tmp_path, console, monkeypatch):
    logger, _ = console
    monkeypatch.setattr(dispatch_module, "ALERT_REPEAT_S", 0.0)  # only the window cap applies
    config = _config(False, log_interval=100, loss_spike_window=10, loss_spike_zscore=6.0)
    monitor = _monitor(config, tmp_path, logger)
    losses = {11: math.nan, 12: 50.0, 15: 500.0, 22: 5000.0}
    for step in range(1, 31):
        monitor.on_step(_step(step, total=100, loss=losses.get(step)))
    spikes = [a["step"] for a in _alerts(tmp_path) if a["title"] == "loss spike"]
    # 12 follows a NaN, which must not poison the window; 15 falls within 12's window.
    assert spikes == [12, 22]


def test_no_spike_alert_before_ten_losses(tmp_path, console):
    logger, _ = console
    monitor = _monitor(_config(False, log_interval=100), tmp_path, logger)
    for step in range(1, 10):
        monitor.on_step(_step(step, total=100))
    monitor.on_step(_step(10, total=100, loss=1000.0))
    assert not (tmp_path / "alerts.jsonl").exists()


def test_identical_alerts_are_rate_limited(tmp_path, console, monkeypatch):
    logger, lines = console
    monitor = _monitor(_config(False), tmp_path, logger)
    monitor.alert("checkpoint slow", "took 900 s", "WARN")
    monitor.alert("checkpoint slow", "took 950 s", "WARN")
    monitor.alert("checkpoint failed", "disk full", "ERROR")
    monkeypatch.setattr(dispatch_module, "ALERT_REPEAT_S", 0.0)
    monitor.alert("checkpoint slow", "took 990 s", "WARN")
    texts = [a["text"] for a in _alerts(tmp_path)]
    assert texts == [
        "took 900 s",
        "disk full",
        "took 990 s (1 similar alert(s) dropped since the last one)",
    ]
    assert lines.lines[0] == "alert checkpoint slow: took 900 s"
    assert _alerts(tmp_path)[0]["step"] is None


def test_non_main_ranks_write_and_print_nothing(tmp_path, console):
    logger, lines = console
    run_dir = tmp_path / "run"
    monitor = _monitor(_config(log_interval=1), run_dir, logger, is_main=False)
    assert list(monitor) == []  # no reporter is built on other ranks
    for step in range(1, 5):
        monitor.on_step(_step(step, total=4, loss=math.nan if step == 2 else None))
    monitor.alert("hello", "from rank 1", "INFO")
    monitor.end("complete", {})
    monitor.close()
    assert not run_dir.exists() and lines.lines == []
    assert wandb.run is None


def test_config_checks():
    assert MonitorConfig().wandb.enabled is False
    for bad in ({"log_interval": 0}, {"loss_spike_window": 9}, {"peak_flops_per_gpu": 0}):
        with pytest.raises(ValidationError):
            MonitorConfig.model_validate(bad)
    # The key has no place in the config: it comes from the environment only.
    with pytest.raises(ValidationError, match="api_key"):
        MonitorConfig.model_validate({"wandb": {"api_key": "abc"}})


def test_peak_flops_by_device_name():
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("Tesla V100-SXM2-32GB") is None


class _Recorder:
    """Stands in for the run's ``Callbacks`` where a callback is tested alone: keeps its alerts."""

    def __init__(self) -> None:
        self.alerts: list[tuple[str, str, str]] = []

    def alert(self, title: str, text: str, level: str) -> None:
        self.alerts.append((title, text, level))


def test_loss_alerts_alone_flag_non_finite_and_spikes():
    recorder = _Recorder()
    alerts = LossAlerts(zscore=6.0, window=10)
    alerts.bind(recorder)
    for step in range(1, 13):
        alerts.on_step(_step(step, loss={5: math.inf, 12: 80.0}.get(step)))
    assert [(title, level) for title, _, level in recorder.alerts] == [
        ("non-finite loss", "ERROR"),
        ("loss spike", "WARN"),
    ]
    assert "at step 5 (step skipped; 1 so far)" in recorder.alerts[0][1]


def test_metrics_file_writes_every_step_and_drops_redone_steps_on_resume(tmp_path):
    first = MetricsFile(tmp_path)
    first.on_train_start(0)
    for step in range(1, 7):
        first.on_step(_step(step, extra={"reward_margin": 0.5}))
    resumed = MetricsFile(tmp_path)
    resumed.on_train_start(4)  # the checkpoint was at step 4; steps 5 and 6 are redone
    resumed.on_step(_step(5))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["reward_margin"] == 0.5 and "reward_margin" not in records[-1]
    assert records[0]["loss_by_source"] == {"web": 1.99, "wiki": 2.49}


class _AddsFigure(Callback):
    """A producer of figures, as the expert balance is: it adds to each step's extras."""

    def on_step(self, metrics: StepMetrics) -> None:
        metrics.extra["produced"] = float(metrics.step)


def test_callbacks_run_in_list_order_so_producers_reach_the_reporters(tmp_path, console):
    logger, _ = console
    reporters = [MetricsFile(tmp_path)]
    Callbacks([_AddsFigure(), *reporters], _run(tmp_path, logger), 2).on_step(_step(1))
    Callbacks([*reporters, _AddsFigure()], _run(tmp_path, logger), 2).on_step(_step(2))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["produced"] == 1.0 and "produced" not in records[1]
