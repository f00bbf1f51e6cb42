"""The ``kinoe pretrain`` config: model, data mixture and phases, batch; the optimizer, schedule,
engine, checkpoint, monitor and drill sections are the training core's (``training.config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from common.config import Config
from common.run import StageConfig
from models import FAMILIES, ModelFamily
from pretrain.data.config import DataConfig
from training.config import (
    CheckpointConfig,
    DrillConfig,
    EngineConfig,
    MonitorConfig,
    OptimizerConfig,
    ScheduleConfig,
)


class ModelConfig(Config):
    """Which architecture: a family, one of its named presets, and field overrides on top."""

    family: Literal["mistral", "mixtral"] = "mistral"
    preset: str = "tiny"
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Architecture fields over the preset, e.g. {sliding_window: 4096, attention: flex}",
    )
    init_from: Path | None = Field(
        None,
        description="Start from these weights (a `kinoe convert from-hf` directory) instead of a "
        "random initialisation; a resumed run loads its checkpoint instead",
    )

    @model_validator(mode="after")
    def _buildable(self) -> ModelConfig:
        family = FAMILIES[self.family]
        if self.preset not in family.presets:
            raise ValueError(
                f"unknown {self.family} preset {self.preset!r}; choose one of "
                f"{', '.join(family.presets)}"
            )
        self.build_args()  # a bad override fails here, at load time, naming the field
        return self

    @property
    def model_family(self) -> ModelFamily:
        return FAMILIES[self.family]

    def build_args(self) -> Any:
        """The architecture args: the preset with ``overrides`` applied (validated)."""
        preset = self.model_family.presets[self.preset]()
        return type(preset).model_validate({**preset.model_dump(), **self.overrides})


class TrainConfig(Config):
    """How much to train and in what batches."""

    steps: int = Field(gt=0, description="Optimizer steps in the whole run")
    global_batch_size: int = Field(
        gt=0, description="Sequences per optimizer step, over all ranks (fixed for the run)"
    )
    micro_batch_size: int = Field(gt=0, description="Sequences per forward pass on one rank")
    seed: int = Field(1234, description="Seeds model initialisation")


class PretrainConfig(StageConfig):
    """``kinoe pretrain``: one run directory holding checkpoints, metrics and the manifest."""

    # Where the run writes, how it reports and when it checkpoints do not change the model it
    # trains, so changing them does not refuse a resume; nor does how the experts are spread
    # over the ranks (like the number of ranks, it changes the order of sums only).
    fingerprint_exclude: ClassVar[frozenset[str]] = frozenset(
        {"run", "monitor", "checkpoint", "drills", "engine.expert_parallel"}
    )

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    drills: DrillConfig = Field(default_factory=DrillConfig)

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.train.micro_batch_size})"
            )
        max_seq_len = self.model.build_args().max_seq_len
        if self.data.seq_len > max_seq_len:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) exceeds the model's max_seq_len "
                f"({max_seq_len}); lower it or set model.overrides.max_seq_len"
            )
        if self.schedule.warmup_steps >= self.train.steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be below "
                f"train.steps ({self.train.steps})"
            )
        return self

    def checkpoint_dir(self, run_dir: Path) -> Path:
        """Where checkpoints go: ``checkpoint.directory`` or ``<run_dir>/checkpoints``."""
        return (
            Path(self.checkpoint.directory)
            if self.checkpoint.directory
            else run_dir / "checkpoints"
        )
