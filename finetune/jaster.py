"""Evaluation datasets' train splits as instruction data in llm-jp-eval's "jaster" style, the common Japanese SFT baseline.

Tasks without a train split (JMMLU, JSeM) are refused: their few-shot pool is cut from the
evaluation file itself. Each example is the prompt llm-jp-eval evaluates with (header, the task's instruction, the
``### 入力:`` block, ``### 応答:``) and the gold answer, taken from the task definitions kinoe's
evaluation uses (``eval.tasks``), so what is trained is exactly what is later evaluated. Only
llm-jp-eval's ``train`` part of each JGLUE train file is written (shuffled with seed 42, first
90%); its ``dev`` part and JGLUE's valid file (the test split) stay unseen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.errors import KinoeError
from common.logs import get_logger
from eval.data import llm_jp_eval_train_dev, task_source
from eval.tasks import REGISTRY
from eval.tasks.base import Task, few_shot_header, prompt
from finetune.config import JasterConfig

OUTPUT_DIR = "jaster"


def jaster_record(task: Task, raw: dict[str, Any], scoring: str, shape: str) -> dict[str, Any]:
    """One JGLUE record as a training example: prompt/completion, or a user/assistant conversation."""
    prompt_format = task.prompt_format(scoring)
    sample = prompt_format.render(raw)
    record_id = f"{task.name}/{sample.id}"
    if shape == "messages":
        return {
            "id": record_id,
            "messages": [
                {"role": "user", "content": f"{prompt_format.instruction}\n\n{sample.input}"},
                {"role": "assistant", "content": sample.output},
            ],
        }
    return {
        "id": record_id,
        "prompt": prompt(few_shot_header(prompt_format.instruction, []), sample),
        "completion": sample.output,
    }


def build_jaster(config: JasterConfig, out_dir: Path) -> dict[str, Any]:
    """Write ``<out_dir>/<task>.jsonl`` for every configured task whose train file is present."""
    logger = get_logger("finetune")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for name in config.tasks:
        task = REGISTRY[name]
        key = "jglue_dir" if task.folder == "jglue" else "data_dir"
        if getattr(config, key) is None and (task.folder != "jglue" or config.data_dir is None):
            raise KinoeError(
                f"jaster.{key} is not set; set it to the folder holding {name}'s files "
                "(e.g. ../shared/data/eval" + ("/jglue" if key == "jglue_dir" else "") + ")"
            )
        folder = task_source(task, config.data_dir, config.jglue_dir).folder
        if not (folder / task.files["train"]).is_file():
            skipped[name] = f"{folder / task.files['train']} not found"
            logger.warning("jaster: %s skipped, %s has no %s", name, folder, task.files["train"])
            continue
        scoring = (
            "loglik" if config.scoring == "loglik" and task.loglik is not None else "generation"
        )
        train, _dev = llm_jp_eval_train_dev(task, folder, config.seed)
        if config.limit_per_task is not None:
            train = train[: config.limit_per_task]
        path = out_dir / f"{name}.jsonl"
        temporary = path.with_name(f".{path.name}.tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            for raw in train:
                record = jaster_record(task, raw, scoring, config.format)
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        temporary.replace(path)
        written[name] = len(train)
        logger.info(
            "jaster: %s, %d examples (%s prompt format) -> %s", name, len(train), scoring, path
        )
    if not written:
        raise KinoeError(
            f"jaster: none of {', '.join(config.tasks)} has its train file ({'; '.join(skipped.values())}); "
            "`kinoe eval download --to <folder>` fetches JGLUE's"
        )
    return {
        "examples": written,
        "skipped": skipped,
        "format": config.format,
        "output": str(out_dir),
    }
