"""The pretraining config and the learning-rate schedule: shipped configs, one-line errors, shapes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml

from common.errors import ConfigError
from common.run import load_stage_config
from pretrain.config import OptimizerConfig, PretrainConfig, ScheduleConfig
from training.schedule import decay_start_step, learning_rate

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "pretrain"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_pretrain_configs_load(path):
    """Every config under configs/pretrain validates (paths are checked when a run starts)."""
    config = load_stage_config(PretrainConfig, path)
    assert config.data.phases[-1].start == pytest.approx(0.8)
    assert "instructions" in config.data.phases[-1].mixture
    assert config.data.seq_len <= config.model.build_args().max_seq_len


def write(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        data[section][key] = value
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"train.global_batch_size": 10}, "multiple of train.micro_batch_size"),
        ({"data.seq_len": 4096}, "exceeds the model's max_seq_len"),
        ({"model.preset": "mistral_70b"}, "unknown mistral preset 'mistral_70b'"),
        ({"model.overrides": {"num_kv_heads": 3}}, "num_kv_heads (3) must divide num_heads"),
        ({"model.overrides": {"attention": "xformers"}}, "attention"),
        ({"schedule.warmup_steps": 200}, "must be below train.steps"),
        ({"engine.zero_stage": 4}, "zero_stage"),
        (
            {"engine.deepspeed": {"train_micro_batch_size_per_gpu": 8}},
            "in 'engine.deepspeed': train_micro_batch_size_per_gpu is derived by kinoe "
            "and cannot be set here; set train.micro_batch_size instead",
        ),
        (
            {"engine.deepspeed": {"zero_optimization": {"stage": 3, "overlap_comm": False}}},
            "zero_optimization.stage is derived by kinoe and cannot be set here; set "
            "engine.zero_stage instead",
        ),
        ({"engine.deepspeed": {"bf16": {"enabled": False}}}, "set engine.precision instead"),
        (
            {"engine.deepspeed": {"gradient_accumulation_steps": 4}},
            "set train.global_batch_size (accumulation follows from it) instead",
        ),
        (
            {"engine.deepspeed": {"data_types": {"grad_accum_dtype": "fp32"}}},
            "data_types.grad_accum_dtype is not supported: it switches ZeRO-1 to DeepSpeed's "
            "BF16_Optimizer, whose checkpoints kinoe convert cannot read",
        ),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(tmp_path, changes, expected):
    with pytest.raises(ConfigError) as error:
        load_stage_config(PretrainConfig, write(tmp_path, **changes))
    message = str(error.value)
    assert expected in message, message
    assert len(message.splitlines()) == 1 and str(tmp_path) in message


def test_engine_deepspeed_still_tunes_what_kinoe_does_not_derive(tmp_path):
    from training.engine import deepspeed_config
    from training.world import World

    raw = {"zero_optimization": {"reduce_bucket_size": 2e8}, "activation_checkpointing": {}}
    config = load_stage_config(PretrainConfig, write(tmp_path, **{"engine.deepspeed": raw}))
    generated = deepspeed_config(config, World(0, 0, 1, torch.device("cpu")))
    assert generated["zero_optimization"]["reduce_bucket_size"] == 2e8
    assert generated["zero_optimization"]["stage"] == config.engine.zero_stage
    assert generated["activation_checkpointing"] == {}


def test_wsd_warms_up_holds_then_decays_with_the_last_phase():
    optimizer, schedule = (
        OptimizerConfig(lr=1e-3, min_lr_ratio=0.1),
        ScheduleConfig(warmup_steps=10),
    )
    decay = decay_start_step(schedule, 100, last_phase_step=80)
    assert decay == 80
    lrs = [learning_rate(step, 100, optimizer, schedule, decay) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:80])
    assert all(a > b for a, b in itertools.pairwise(lrs[80:]))
    assert lrs[99] == pytest.approx(1e-4)  # ends exactly at the floor
    assert decay_start_step(ScheduleConfig(decay_start=0.5), 100, last_phase_step=80) == 50
    assert decay_start_step(ScheduleConfig(), 100, last_phase_step=None) == 80


def test_cosine_decays_from_the_end_of_warmup():
    optimizer = OptimizerConfig(lr=1e-3, min_lr_ratio=0.0)
    schedule = ScheduleConfig(kind="cosine", warmup_steps=10)
    lrs = [learning_rate(step, 110, optimizer, schedule, 0) for step in range(110)]
    assert lrs[9] == pytest.approx(1e-3)
    assert lrs[59] == pytest.approx(5e-4, rel=0.05)
    assert lrs[109] == pytest.approx(0.0, abs=1e-12)
