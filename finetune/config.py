"""The ``kinoe finetune`` config: one file for the jaster builder, SFT and DPO of one model.

Optimizer, schedule, DeepSpeed engine, checkpoints and monitoring are the training core's
sections (``training.config``, the same as pretraining's); what differs is where the model and data come from,
how long to train (epochs over examples instead of steps over a token stream) and the LoRA
and DPO settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from common.config import Config
from common.run import StageConfig
from convert.config import VerifySettings
from training.config import (
    CheckpointConfig,
    EngineConfig,
    MonitorConfig,
    OptimizerConfig,
    ScheduleConfig,
)

# The linear layers LoRA adapts by default: every projection of attention and the feed-forward
# block (kinoe's names, which are also the last part of Hugging Face's module names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(Config):
    """Low-rank adapters (peft) instead of updating every weight; merged into the output model."""

    enabled: bool = False
    rank: int = Field(16, gt=0, description="Rank r of each adapter")
    alpha: float = Field(32.0, gt=0, description="Scale: the update is (alpha / r) B A")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        description="Linear layers to adapt, by name (q_proj, ..., down_proj)",
    )

    @field_validator("target_modules")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = sorted(set(names) - set(LORA_TARGETS))
        if unknown or not names:
            raise ValueError(
                f"unknown LoRA target {', '.join(unknown) or '(none given)'}; choose from "
                f"{', '.join(LORA_TARGETS)}"
            )
        return names


class ModelConfig(Config):
    """The Hugging Face model directory to start from (`kinoe convert to-hf` writes one)."""

    path: Path = Field(description="Hugging Face Mistral/Mixtral directory with its tokenizer")
    overrides: dict[str, object] = Field(
        default_factory=dict,
        description="Training-only architecture fields, e.g. {attention: flex}; weights unchanged",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)


class DataConfig(Config):
    """Examples to train on, the held-out split, and how they are packed into sequences."""

    train: list[Path] = Field(
        min_length=1,
        description="JSONL(.gz) files or folders. SFT: {messages: [...]} or {prompt, completion}; "
        "DPO: {prompt, chosen, rejected}",
    )
    eval: list[Path] = Field(
        default_factory=list,
        description="Held-out examples; empty: eval_fraction of train is held out",
    )
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of train held out when eval is empty"
    )
    max_length: int = Field(
        2048, gt=8, description="Tokens per packed sequence; a longer example is rejected"
    )
    packing: bool = Field(
        True,
        description="Several examples per sequence, each attending only to itself; false: one "
        "example per sequence (padded)",
    )
    seed: int = Field(1234, description="Held-out split and the order of examples each epoch")


class TrainConfig(Config):
    """How long to train and in what batches (batches count packed sequences)."""

    epochs: int = Field(1, gt=0, description="Passes over the training examples")
    global_batch_size: int = Field(gt=0, description="Sequences per optimizer step, all ranks")
    micro_batch_size: int = Field(gt=0, description="Sequences per forward pass on one rank")
    eval_interval: int = Field(
        100, gt=0, description="Steps between held-out evaluations (and one at the end)"
    )
    seed: int = Field(1234, description="Seeds LoRA initialisation and dropout")


class DpoConfig(Config):
    """Direct preference optimisation (sigmoid loss) against a frozen reference model."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull toward the reference")
    reference: Path | None = Field(
        None,
        description="Reference model directory; None: the starting model (model.path). Its "
        "log-probabilities are computed once before training, so it is never held in memory "
        "beside the policy",
    )


class JasterConfig(Config):
    """`kinoe finetune jaster`: JGLUE train splits as llm-jp-eval-style instruction data."""

    jglue_dir: Path | None = Field(
        None, description="Folder of JGLUE <task>-train.json files (`kinoe eval download`)"
    )
    data_dir: Path | None = Field(
        None,
        description="Folder of one folder per dataset (jsick/, niilc/, ...) for the non-JGLUE tasks",
    )
    tasks: list[str] = Field(
        default_factory=lambda: ["jcommonsenseqa", "jnli", "jsquad", "jsts"],
        description="Evaluation tasks with a train split; those whose train file is present are "
        "converted, others skipped",
    )
    format: Literal["prompt_completion", "messages"] = Field(
        "prompt_completion",
        description="prompt_completion: llm-jp-eval's prompt text as evaluated; messages: the "
        "instruction and input as a user turn, the answer as the assistant turn",
    )
    scoring: Literal["generation", "loglik"] = Field(
        "generation",
        description="Which of a task's prompt formats: generation (llm-jp-eval's own) or loglik "
        "(the choice-text format kinoe's log-likelihood scoring uses, where a task has one)",
    )
    seed: int = Field(42, description="llm-jp-eval's train/dev split seed; dev is left out")
    limit_per_task: int | None = Field(None, gt=0, description="At most this many per task")

    @field_validator("tasks")
    @classmethod
    def _tasks_with_train_split(cls, tasks: list[str]) -> list[str]:
        from eval.tasks import REGISTRY

        for name in tasks:
            if name not in REGISTRY:
                raise ValueError(f"unknown task {name}; known: {', '.join(REGISTRY)}")
            if "train" not in REGISTRY[name].files:
                raise ValueError(
                    f"{name} has no train split (its few-shot examples come from its evaluation "
                    f"file, which must stay unseen); remove {name}"
                )
        return tasks


class OutputConfig(Config):
    """The Hugging Face directory written at the end, and its verification."""

    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: the dtype of the starting model's weights"
    )
    max_shard_size_mb: int = Field(2000, gt=0)
    verify: VerifySettings = Field(default_factory=VerifySettings)


class FinetuneConfig(StageConfig):
    """``kinoe finetune jaster|sft|dpo``: one config, a run directory per step."""

    fingerprint_exclude: ClassVar[frozenset[str]] = frozenset({"run", "monitor", "checkpoint"})

    model: ModelConfig | None = None
    data: DataConfig | None = None
    train: TrainConfig | None = None
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=2e-5))
    schedule: ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(kind="cosine", warmup_steps=0)
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    jaster: JasterConfig = Field(default_factory=JasterConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.train is not None and self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.train.micro_batch_size})"
            )
        return self

    def training(self) -> tuple[ModelConfig, DataConfig, TrainConfig]:
        """The sections SFT and DPO need, or a one-line error naming the missing one."""
        from common.errors import KinoeError

        for name in ("model", "data", "train"):
            if getattr(self, name) is None:
                raise KinoeError(
                    f"the config has no {name} section, which sft and dpo need; see "
                    "configs/finetune/quickstart.yaml"
                )
        return self.model, self.data, self.train  # type: ignore[return-value]
