"""The expert-balance callback: MoE figures per step and the starving-expert alert (single process;
the trainer tests cover ranks), fed by a model that declares ``ExpertModel``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.experts import ExpertModel, RouterStats
from training.callbacks.experts import ExpertBalance
from training.config import ExpertLoadConfig

from test_training_callbacks import _Recorder, _step


class _Routed(nn.Module, ExpertModel):
    """A stand-in model with experts: reports whatever routing the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: RouterStats | None = None

    def set(self, load_LE, aux: float = 1.0, z: float = 0.0, dropped: int = 0) -> _Routed:
        self.stats = RouterStats(torch.tensor(load_LE), torch.tensor(aux), torch.tensor(z), dropped)
        return self

    def moe_modules(self) -> list[nn.Module]:
        return []

    def auxiliary_loss(self) -> torch.Tensor:
        return self.stats.aux_loss

    def router_stats(self) -> RouterStats:
        return self.stats


def _balance(config: ExpertLoadConfig, log_interval: int) -> tuple[ExpertBalance, _Recorder]:
    recorder = _Recorder()
    balance = ExpertBalance(config, log_interval)
    balance.bind(recorder)
    return balance, recorder


def _take_step(balance: ExpertBalance, step: int, *micro_batches: _Routed) -> dict[str, float]:
    for model in micro_batches:
        balance.on_backward(model)
    balance.on_step_end(step, micro_batches[0])
    metrics = _step(step, total=100, extra={})
    balance.on_step(metrics)
    return metrics.extra


def test_step_figures_average_micro_batches_and_sum_dropped_tokens():
    balance, _ = _balance(ExpertLoadConfig(), log_interval=10)
    figures = _take_step(
        balance,
        1,
        _Routed().set([[0.5, 0.5, 0.0, 0.0]], aux=1.0, dropped=3),
        _Routed().set([[0.5, 0.5, 0.0, 0.0]], aux=2.0, dropped=4),
    )
    assert figures["moe/aux_loss"] == pytest.approx(1.5)
    assert figures["moe/dropped_tokens"] == 7
    assert figures["moe/load/layer00/expert01"] == pytest.approx(0.5)
    # loads 0.5 0.5 0 0: mean 0.25, std 0.25, coefficient of variation 1
    assert figures["moe/load_cv"] == pytest.approx(1.0)
    balanced, _ = _balance(ExpertLoadConfig(), log_interval=10)
    assert _take_step(balanced, 1, _Routed().set([[0.25] * 4]))["moe/load_cv"] == pytest.approx(0)


def test_figures_stay_on_the_device_until_the_interval_is_read():
    balance, _ = _balance(ExpertLoadConfig(), log_interval=10)
    for step in (1, 2):
        balance.on_backward(_Routed().set([[0.25] * 4], aux=float(step)))
        balance.on_step_end(step, None)
    assert sorted(balance._pending) == [1, 2]  # two steps queued, nothing read yet
    first, second = _step(1, extra={}), _step(2, extra={})
    balance.on_step(first)
    balance.on_step(second)
    assert (first.extra["moe/aux_loss"], second.extra["moe/aux_loss"]) == (1.0, 2.0)


def test_starving_expert_alerts_once_after_the_configured_intervals():
    config = ExpertLoadConfig(starved_share=0.1, starvation_intervals=3)
    balance, recorder = _balance(config, log_interval=2)
    starving = [[0.34, 0.33, 0.33, 0.0], [0.25, 0.25, 0.25, 0.25]]
    for step in range(1, 13):
        _take_step(balance, step, _Routed().set(starving))
        if step < 6:
            assert not recorder.alerts, step  # two intervals so far
    assert len(recorder.alerts) == 1, recorder.alerts
    title, text, level = recorder.alerts[0]
    assert title == "expert starving" and level == "WARN"
    assert "layer 0 expert 3" in text and "layer 1" not in text


def test_recovering_expert_resets_its_count():
    balance, recorder = _balance(ExpertLoadConfig(starvation_intervals=2), log_interval=1)
    for step, load in enumerate([0.0, 0.25, 0.0, 0.25, 0.0], start=1):
        _take_step(balance, step, _Routed().set([[0.75 - load, 0.25, load, 0.0]]))
    # expert 2 never starves two intervals in a row; expert 3 (always 0) alerts once
    assert [a[1].split(" received")[0] for a in recorder.alerts] == ["layer 0 expert 3"]
