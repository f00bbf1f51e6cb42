"""DeepSpeed wiring: the generated DeepSpeed config, the AdamW groups and the engine.

The DeepSpeed config is generated from the kinoe config (pretraining's, or fine-tuning's,
which has the same ``train``/``optimizer``/``engine``/``checkpoint`` fields) so that there is one source of
truth; ``engine.deepspeed`` adds or tunes keys kinoe does not derive (a derived one is refused
when the config loads, ``training.config.DERIVED_DEEPSPEED_KEYS``), and the final config is
written to ``<run dir>/deepspeed.json`` and recorded with the run.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from common.errors import KinoeError
from models.experts import ExpertModel
from training.config import CheckpointConfig, EngineConfig, OptimizerConfig
from training.expert_optimizer import ExpertOptimizer
from training.expert_parallel import expert_groups, expert_parameters, shard_experts
from training.world import World


class TrainingConfig(Protocol):
    """What the engine reads of a stage config: ``kinoe pretrain``'s and ``kinoe finetune``'s."""

    train: Any  # global_batch_size and micro_batch_size (sequences)
    optimizer: OptimizerConfig
    engine: EngineConfig
    checkpoint: CheckpointConfig


def precision(config: TrainingConfig, device: torch.device) -> str:
    """``bf16`` or ``fp32``: ``auto`` means bf16 on GPUs and fp32 on CPU."""
    if config.engine.precision != "auto":
        return config.engine.precision
    return "bf16" if device.type == "cuda" else "fp32"


def accumulation_steps(config: TrainingConfig, world_size: int) -> int:
    """Micro-batches per rank per step, so that the global batch stays what the config says."""
    per_pass = config.train.micro_batch_size * world_size
    if config.train.global_batch_size % per_pass:
        raise KinoeError(
            f"train.global_batch_size {config.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size {config.train.micro_batch_size} x {world_size} ranks; "
            "change the micro-batch size or the number of ranks (the global batch must stay fixed "
            "for the data order to hold)"
        )
    return config.train.global_batch_size // per_pass


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(config: TrainingConfig, world: World) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run on this world."""
    engine = config.engine
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(config, world.size),
        "train_batch_size": config.train.global_batch_size,
        "gradient_clipping": engine.gradient_clipping,
        "zero_optimization": {
            "stage": engine.zero_stage,
            "overlap_comm": world.device.type == "cuda",
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e8,
        },
        "bf16": {"enabled": precision(config, world.device) == "bf16"},
        # kinoe prints its own progress; DeepSpeed's per-step lines would duplicate it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": config.checkpoint.load_universal},
    }
    if engine.zero_stage == 3:
        generated["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    return _merge(generated, engine.deepspeed)


def parameter_groups(
    model: nn.Module, weight_decay: float, exclude: list[nn.Parameter] = ()
) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; norms, biases and the token embedding do not.

    ``exclude``: parameters another optimizer steps (expert shards)."""
    decay, no_decay = [], []
    seen: set[int] = {id(p) for p in exclude}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        # The embedding is a lookup table: decay would pull rare tokens' rows toward zero.
        if parameter.ndim < 2 or "tok_embeddings" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(model: nn.Module, config: TrainingConfig, ds_config: dict[str, Any]):
    """Wrap ``model`` in a DeepSpeed engine with AdamW over the weight-decay groups.

    With ``engine.expert_parallel`` > 1 the model's experts are sharded first and the engine
    gets an ``expert_optimizer`` for them (training/expert_optimizer.py); else it is None."""
    import deepspeed
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    groups = None
    if config.engine.expert_parallel > 1:
        # Before DeepSpeed wraps the model: its start-up broadcast must see the shards.
        groups = expert_groups(config.engine.expert_parallel)
        shard_experts(model, groups)
    if config.engine.zero_stage == 3 and isinstance(model, ExpertModel):
        # ZeRO-3 gathers a module's parameters when its forward starts; an expert that gets no
        # tokens on one rank would never be gathered there and the other ranks would wait for
        # it forever. As leaf modules, MoE blocks gather all their experts at once, every step.
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, sorted({type(m) for m in model.moe_modules()}, key=str))
    optimizer = torch.optim.AdamW(
        # Expert shards differ per rank: ExpertOptimizer steps them, not DeepSpeed.
        parameter_groups(
            model,
            config.optimizer.weight_decay,
            exclude=expert_parameters(model) if groups is not None else [],
        ),
        lr=config.optimizer.lr,
        betas=config.optimizer.betas,
        eps=config.optimizer.eps,
        # One kernel per step instead of a dozen elementwise passes over every parameter and
        # moment: on an H200 the unfused step of a 3.3B-parameter Mixtral took 60 ms of 240.
        # DeepSpeed hands it its flat fp32 partitions, on the GPU or the CPU (both supported).
        fused=True,
    )
    # Marks the checkpoints as convertible by deepspeed.checkpoint.ds_to_universal, the way to
    # resume on another number of GPUs.
    setattr(
        model,
        UNIVERSAL_CHECKPOINT_INFO,
        {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    # micro_step and the checkpointer step and save it with the engine (None: no expert shards).
    engine.expert_optimizer = (
        None
        if groups is None
        else ExpertOptimizer(engine, groups, config.optimizer, config.engine.gradient_clipping)
    )
    return engine
