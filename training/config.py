"""The config sections every kind of training shares: optimizer, schedule, engine, checkpoints,
monitoring and drills. ``kinoe pretrain`` and ``kinoe finetune`` use them with the same
fields and meaning; what differs between them (model source, data, length) is their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from common.config import Config

# Keys of the generated DeepSpeed config that kinoe derives from its own settings, and the
# setting to change instead. Overriding one through ``engine.deepspeed`` would make DeepSpeed
# and kinoe disagree (a global batch the data order does not have, a clip the log does not
# show), so such a key is refused rather than merged.
DERIVED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (accumulation follows from it)",
    "train_batch_size": "train.global_batch_size",
    "gradient_clipping": "engine.gradient_clipping",
    "bf16": "engine.precision",
    "fp16": "engine.precision (kinoe trains in bf16 or fp32)",
    "optimizer": "the optimizer section (kinoe builds AdamW itself)",
    "scheduler": "the schedule section (kinoe sets the lr every step)",
    "zero_optimization.stage": "engine.zero_stage",
    "checkpoint.load_universal": "checkpoint.load_universal",
}

# DeepSpeed keys that train but leave a run kinoe cannot carry on with, and why. fp32 gradient
# accumulation switches ZeRO-1 to DeepSpeed's BF16_Optimizer, whose checkpoint shards `kinoe
# convert` cannot read, whose gradient norm the expert-parallel optimizer cannot join, and whose
# fp32 gradients preflight's memory estimate does not count; at ZeRO-2 and 3 DeepSpeed 0.19
# ignores the key (gradients still accumulate in bf16). Refused rather than found after the run.
UNSUPPORTED_DEEPSPEED_KEYS = {
    "data_types.grad_accum_dtype": "it switches ZeRO-1 to DeepSpeed's BF16_Optimizer, whose "
    "checkpoints kinoe convert cannot read; leave it out (gradients accumulate in the training "
    "dtype, docs/pretrain.md)",
}


class OptimizerConfig(Config):
    """AdamW; weight decay applies to matrices only (not norms or the embedding)."""

    lr: float = Field(3e-4, gt=0, description="Peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of lr")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)

    @field_validator("betas")
    @classmethod
    def _in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(betas)}")
        return betas


class ScheduleConfig(Config):
    """Learning rate over steps: linear warmup, then warmup-stable-decay or cosine."""

    kind: Literal["wsd", "cosine"] = "wsd"
    warmup_steps: int = Field(0, ge=0)
    decay_start: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="wsd: fraction of training where the decay begins; default: where the last "
        "data phase starts (the post-training mix), else 0.8",
    )
    decay_shape: Literal["linear", "cosine"] = "linear"


class EngineConfig(Config):
    """DeepSpeed: ZeRO stage, precision, clipping, and what is applied to the model from outside."""

    zero_stage: Literal[1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs, fp32 on CPU"
    )
    gradient_clipping: float = Field(1.0, ge=0, description="Max global grad norm; 0: off")
    activation_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each decoder block")
    fp8: Literal["tensorwise", "rowwise"] | None = Field(
        None,
        description="Train the decoder blocks' linear layers in FP8 (torchao float8, dynamic "
        "scaling; embedding, output head, router and experts stay bf16); null: off. Needs "
        "engine.compile and an FP8 GPU (8.9+ tensorwise, 9.0+ rowwise)",
    )
    expert_parallel: int = Field(
        1,
        ge=1,
        description="Mixtral: split each MoE layer's experts over this many consecutive ranks "
        "(all-to-all token exchange; ZeRO 1/2); 1: every rank holds every expert",
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed JSON merged over the generated config (recorded in "
        "deepspeed.json); keys kinoe derives from its own settings are refused",
    )

    @field_validator("deepspeed")
    @classmethod
    def _no_derived_keys(cls, raw: dict[str, Any]) -> dict[str, Any]:
        def present(key: str) -> bool:
            section, _, leaf = key.rpartition(".")
            holder = raw.get(section) if section else raw
            return isinstance(holder, dict) and leaf in holder

        for key, setting in DERIVED_DEEPSPEED_KEYS.items():
            if present(key):
                raise ValueError(
                    f"{key} is derived by kinoe and cannot be set here; set {setting} instead"
                )
        for key, why in UNSUPPORTED_DEEPSPEED_KEYS.items():
            if present(key):
                raise ValueError(f"{key} is not supported: {why}")
        return raw

    @model_validator(mode="after")
    def _fp8_composes(self) -> EngineConfig:
        if self.fp8 is None:
            return self
        if not self.compile:
            # Uncompiled, each scaling cast is its own kernel reading and writing the whole
            # tensor: the casts cost more than the FP8 matmuls save.
            raise ValueError(
                "engine.fp8 needs engine.compile: true (uncompiled, the float8 casts cost more "
                "than the FP8 matmuls save); set engine.compile to true or engine.fp8 to null"
            )
        if self.precision == "fp32":
            raise ValueError(
                "engine.fp8 trains with bf16 activations; set engine.precision to bf16 (or "
                "auto) or engine.fp8 to null"
            )
        return self

    @model_validator(mode="after")
    def _expert_parallel_composes(self) -> EngineConfig:
        if self.expert_parallel > 1 and self.zero_stage == 3:
            raise ValueError(
                "engine.expert_parallel composes with ZeRO stages 1 and 2 only (the expert "
                "shards are stepped beside DeepSpeed, which ZeRO-3's partitioned parameters do "
                "not allow); set engine.zero_stage to 2 or engine.expert_parallel to 1"
            )
        return self


class CheckpointConfig(Config):
    """When to save, what to keep, where to resume from."""

    interval: int = Field(1000, gt=0, description="Save every this many steps (and at the end)")
    keep_last: int = Field(2, ge=1, description="Most recent checkpoints kept")
    keep_every: int | None = Field(
        None, gt=0, description="Also keep checkpoints at multiples of this step count"
    )
    resume: Literal["latest", "none"] | int = Field(
        "latest", description="latest, none (start over is refused if checkpoints exist), or a step"
    )
    directory: Path | None = Field(None, description="Default: <run dir>/checkpoints")
    load_universal: bool = Field(
        False, description="Resume from a DeepSpeed universal checkpoint (any world size)"
    )


class DrillConfig(Config):
    """Fault drills: inject failures on purpose to prove alerting and recovery work."""

    nan_at_steps: list[int] = Field(
        default_factory=list, description="Make the loss of these steps NaN (steps are 1-based)"
    )
    crash_in_checkpoint_at_step: int | None = Field(
        None, description="Kill every rank mid-way through writing this step's checkpoint"
    )
    record_samples: bool = Field(
        False, description="Write each rank's consumed sample positions to <run dir>/samples/"
    )


class WandbConfig(Config):
    """Weights & Biases logging; the API key comes only from WANDB_API_KEY or `wandb login`."""

    enabled: bool = False
    mode: Literal["online", "offline"] = "online"  # offline: no network; upload with `wandb sync`
    entity: str | None = None
    project: str = "kinoe"
    group: str | None = None
    name: str | None = None  # None: the kinoe run name
    tags: list[str] = Field(default_factory=list)


class ExpertLoadConfig(Config):
    """When an expert counts as starving, and for how long before an alert."""

    starved_share: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="An expert starves when its share of assignments is below this fraction of "
        "the even share 1/E",
    )
    starvation_intervals: int = Field(
        3, ge=1, description="Alert after this many consecutive logging intervals of starving"
    )


class EvaluationConfig(Config):
    """Evaluation while training (``training/callbacks/evaluation.py``): what is scored and how often."""

    interval: int = Field(0, ge=0, description="Steps between evaluations (and at the end); 0: off")
    tokenizer: Path | None = Field(
        None,
        description="The Hugging Face tokenizer the model trains with (`kinoe tokenizer`'s export/hf)",
    )
    bpc_texts: list[Path] = Field(
        default_factory=list,
        description="Held-out .jsonl/.jsonl.gz/.txt text for bits per character (as `kinoe eval`'s bpc.texts)",
    )
    bpc_max_documents: int | None = Field(50, ge=1, description="The first N documents; None: all")
    tasks: list[str] = Field(
        default_factory=list,
        description="Evaluation tasks with closed answers, scored by log-likelihood",
    )
    limit: int = Field(100, ge=1, description="The first N test examples of each task")
    shots: int = Field(0, ge=0, description="Few-shot examples in each prompt")
    seed: int = Field(42, description="llm-jp-eval's split and few-shot seed")
    data_dir: Path | None = Field(None, description="As `kinoe eval`'s data_dir")
    jglue_dir: Path | None = Field(None, description="As `kinoe eval`'s jglue_dir")
    micro_batch_size: int = Field(8, ge=1, description="Rows per forward pass on each rank")

    @field_validator("tasks")
    @classmethod
    def _scored_by_loglik(cls, tasks: list[str]) -> list[str]:
        from eval.tasks import REGISTRY

        for name in tasks:
            if name not in REGISTRY:
                raise ValueError(f"unknown task {name}; known: {', '.join(REGISTRY)}")
            if REGISTRY[name].loglik is None:
                closed = [n for n, t in REGISTRY.items() if t.loglik is not None]
                raise ValueError(
                    f"{name} has no closed answer set to score by log-likelihood; "
                    f"use one of {', '.join(closed)}"
                )
        return tasks

    @model_validator(mode="after")
    def _something_to_score(self) -> EvaluationConfig:
        if self.interval and self.tokenizer is None:
            raise ValueError("monitor.evaluation.interval is set but tokenizer is not; set it")
        if self.interval and not (self.bpc_texts or self.tasks):
            raise ValueError(
                "monitor.evaluation.interval is set but neither bpc_texts nor tasks is"
            )
        return self


# A window shorter than this gives z-scores from too few losses to mean anything.
MIN_SPIKE_WINDOW = 10


class MonitorConfig(Config):
    """How often to report, where to, and when the loss is alarming."""

    log_interval: int = Field(
        10,
        ge=1,
        description="Steps between console lines and W&B points; the step's figures are read "
        "from the device once per interval",
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    loss_spike_zscore: float = Field(6.0, gt=0, description="Alert above mean + z * std")
    loss_spike_window: int = Field(
        100, ge=MIN_SPIKE_WINDOW, description="Recent finite losses the spike statistics use"
    )
    peak_flops_per_gpu: float | None = Field(
        None, gt=0, description="Peak FLOP/s per GPU for MFU; None: from the device name"
    )
    experts: ExpertLoadConfig = Field(
        default_factory=ExpertLoadConfig, description="Mixture-of-experts balance alerts"
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Evaluation while training (off by default)"
    )
