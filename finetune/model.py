"""The model being fine-tuned: read from a Hugging Face directory, LoRA by config, written back as one.

kinoe's own Mistral/Mixtral is trained (its document masking is what keeps attention inside each
packed example, and it is the model pretraining already runs under DeepSpeed); the Hugging
Face directory is only the way in and out, through the same adapters ``kinoe convert`` uses.
LoRA adapters (peft) are injected into the linear layers in place, so the model keeps its
class and forward; at the end they are merged into the starting weights, in float32, and the
output is an ordinary Hugging Face directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import KinoeError
from convert.hf_read import hf_source
from convert.sources import Source, TensorRef, load_weights, tie
from finetune.config import LoraConfig, ModelConfig

_WRAPPER = "_checkpoint_wrapped_module."
_LORA_A, _LORA_B, _BASE = ".lora_A.default.weight", ".lora_B.default.weight", ".base_layer.weight"


def open_model_source(config: ModelConfig) -> Source:
    """The starting weights (unread) of ``model.path``, with its family and args."""
    return hf_source(Path(config.path))


def training_args(source: Source, config: ModelConfig) -> Any:
    """``source``'s architecture with the training-only overrides (attention backend, ...)."""
    allowed = {"attention", "capacity_factor", "router_aux_loss_coef", "router_z_loss_coef"}
    changed = sorted(set(config.overrides) - allowed)
    if changed:
        raise KinoeError(
            f"model.overrides.{changed[0]}: fine-tuning keeps the starting model's architecture; "
            f"only {', '.join(sorted(allowed))} may be overridden"
        )
    fields = type(source.args).model_fields
    data = {
        **source.args.model_dump(),
        **{k: v for k, v in config.overrides.items() if k in fields},
    }
    return type(source.args).model_validate(data)


def build_model(
    source: Source, config: ModelConfig, seed: int, logger: logging.Logger
) -> nn.Module:
    """Our model of ``source`` with its weights, LoRA-adapted when configured (base frozen)."""
    args = training_args(source, config)
    model = source.model_family.model_type(args)
    load_weights(model, source)
    if config.lora.enabled:
        torch.manual_seed(seed)
        add_lora(model, config.lora, logger)
    return model


def add_lora(model: nn.Module, lora: LoraConfig, logger: logging.Logger) -> None:
    """Inject LoRA adapters into the configured linear layers and freeze everything else."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    linear_names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    targets = [name for name in lora.target_modules if name in linear_names]
    skipped = sorted(set(lora.target_modules) - set(targets))
    if not targets:
        raise KinoeError(
            f"model.lora.target_modules: none of {', '.join(lora.target_modules)} is a linear layer "
            f"of this model ({', '.join(sorted(linear_names))})"
        )
    if skipped:
        # Mixtral's experts are stacked tensors run as grouped GEMMs, not linear layers.
        logger.warning(
            "LoRA: %s are not linear layers of this model; not adapted", ", ".join(skipped)
        )
    inject_adapter_in_model(
        PeftLoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets
        ),
        model,
    )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_A." in name or ".lora_B." in name)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (a tied tensor once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    return {
        "trainable": sum(p.numel() for p in seen.values() if p.requires_grad),
        "total": sum(p.numel() for p in seen.values()),
    }


def gather_weights(
    engine: Any, source: Source, lora: LoraConfig, is_main: bool
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The trained weights under kinoe's names, float32 on CPU, on the main rank (empty elsewhere),
    and with LoRA the adapters by module name: (A (r, in), B (out, r)).

    Every rank must call this: trained parameters come from DeepSpeed's float32 master copies,
    gathered across ranks for any ZeRO stage. LoRA: the frozen weights are the starting model's
    own (the engine holds them in its compute dtype), plus ``alpha / r * B @ A``.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    trained: dict[str, torch.Tensor] = {}
    for raw_name, parameter in engine.module.named_parameters():
        if not parameter.requires_grad:
            continue
        full = safe_get_full_fp32_param(parameter)
        if full is None:
            raise RuntimeError(f"DeepSpeed has no float32 copy of {raw_name}")
        if is_main:
            trained[raw_name.replace(_WRAPPER, "")] = full.detach().float().cpu()
    if not is_main:
        return {}, {}
    if not lora.enabled:
        return trained, {}
    scale = lora.alpha / lora.rank
    adapters = {
        name.removesuffix(_LORA_A): (trained[name], trained[name.removesuffix(_LORA_A) + _LORA_B])
        for name in trained
        if name.endswith(_LORA_A)
    }
    weights: dict[str, torch.Tensor] = {}
    for name, ref in source.tensors.items():
        module = name.removesuffix(".weight")
        weight = ref.read().float()
        if module in adapters:
            down, up = adapters[module]
            weight = weight + scale * (up @ down)
        weights[name] = weight
    return weights, adapters


def write_adapter(
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
    source: Source,
    lora: LoraConfig,
    base: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """The LoRA adapters as a peft adapter directory for the Hugging Face model at ``base``.

    ``PeftModel.from_pretrained(<base model>, out_dir)`` loads it (e.g. to serve several
    adapters over one base); the merged model directory needs no peft.
    """
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    # The family's adapter renames every tensor; a module's Hugging Face name is its weight's.
    renamed = source.model_family.to_hf(source.tensors)
    hf_name = {id(ref): name for name, ref in renamed.items()}
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for module, (down, up) in sorted(adapters.items()):
        hf_module = hf_name[id(source.tensors[module + ".weight"])].removesuffix(".weight")
        targets.add(hf_module.rsplit(".", 1)[-1])
        tensors[f"base_model.model.{hf_module}.lora_A.weight"] = down.contiguous()
        tensors[f"base_model.model.{hf_module}.lora_B.weight"] = up.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=sorted(targets),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    ).save_pretrained(str(out_dir))
    return {"adapter": str(out_dir), "adapter_modules": len(adapters)}


def trained_source(
    source: Source, weights: dict[str, torch.Tensor], provenance: dict[str, Any]
) -> Source:
    """``weights`` as a source of ``source``'s family and architecture, for the Hugging Face writer."""
    missing = sorted(set(source.tensors) - set(weights))
    if source.args.tie_embeddings:
        missing = [name for name in missing if name != "output.weight"]
    if missing:
        raise RuntimeError(f"trained weights lack {missing[:3]}")
    tensors = {
        name: TensorRef(tuple(tensor.shape), tensor.dtype, lambda tensor=tensor: tensor)
        for name, tensor in weights.items()
        if name in source.tensors
    }
    if source.args.tie_embeddings:
        tensors = tie(tensors, "tok_embeddings.weight", "output.weight")
    return Source(source.family, source.args, tensors, provenance, source.tokenizer)
