"""``kinoe finetune jaster|sft|dpo``: build instruction data, then SFT or DPO of a Hugging Face model.

<run.root>/finetune/<run.name>/jaster/   <task>.jsonl: JGLUE train splits as llm-jp-eval-style examples
                              /sft/      checkpoints/, metrics.jsonl, eval.jsonl, rejected.jsonl and
                                         model/: the fine-tuned Hugging Face directory (verified)
                              /dpo/      the same, plus reference_logps.pt

SFT and DPO run under torchrun like ``kinoe pretrain`` (one process without it), resume from
their latest checkpoint when rerun, and checkpoint and stop on SIGTERM/SIGUSR1.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.command import add_step_arguments, run_stage_command
from common.run import Stage, StageContext
from finetune.config import FinetuneConfig

TRAINING_SECTIONS = frozenset(
    {"model", "data", "train", "optimizer", "schedule", "engine", "output"}
)


def jaster_step(context: StageContext[FinetuneConfig]) -> dict[str, Any]:
    """Write the configured JGLUE train splits as instruction data."""
    from finetune.jaster import build_jaster

    return build_jaster(context.config.jaster, context.run_dir)


def sft_step(context: StageContext[FinetuneConfig]) -> dict[str, Any]:
    """Supervised fine-tuning on chat or prompt/completion examples."""
    from finetune.trainer import finetune

    return finetune(context, "sft")


def dpo_step(context: StageContext[FinetuneConfig]) -> dict[str, Any]:
    """Direct preference optimisation on prompt/chosen/rejected examples."""
    from finetune.trainer import finetune

    return finetune(context, "dpo")


def _training_inputs(config: FinetuneConfig) -> dict[str, Path]:
    model, data, _ = config.training()
    inputs: dict[str, Path] = {"model.path": Path(model.path)}
    for key, paths in (("data.train", data.train), ("data.eval", data.eval)):
        for index, path in enumerate(paths):
            inputs[f"{key}.{index}"] = Path(path)
    if config.dpo.reference is not None:
        inputs["dpo.reference"] = Path(config.dpo.reference)
    return inputs


STEPS: dict[str, Stage] = {
    "jaster": Stage(
        "finetune",
        FinetuneConfig,
        jaster_step,
        inputs=lambda c: {
            key: path
            for key, path in (
                ("jaster.jglue_dir", c.jaster.jglue_dir),
                ("jaster.data_dir", c.jaster.data_dir),
            )
            if path
        },
        step="jaster",
        fingerprint_sections=frozenset({"jaster"}),
    ),
    "sft": Stage(
        "finetune",
        FinetuneConfig,
        sft_step,
        inputs=_training_inputs,
        step="sft",
        fingerprint_sections=TRAINING_SECTIONS,
    ),
    "dpo": Stage(
        "finetune",
        FinetuneConfig,
        dpo_step,
        inputs=_training_inputs,
        step="dpo",
        fingerprint_sections=TRAINING_SECTIONS | {"dpo"},
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_step_arguments(
        parser,
        {
            "jaster": "write JGLUE train splits as llm-jp-eval-style instruction data (jaster)",
            "sft": "supervised fine-tuning of a Hugging Face model (full or LoRA, DeepSpeed ZeRO)",
            "dpo": "direct preference optimisation against the starting model (DeepSpeed ZeRO)",
        },
    )


def main(args: argparse.Namespace) -> int:
    return run_stage_command(STEPS[args.step], args)
