"""Real token shards for pretraining tests: a small kinoe tokenizer trained and run on ../shared/data.

Sources: ``wikipedia`` (Japanese Wikipedia leads), ``web`` (FineWeb-2 Japanese pages) and
``instructions`` (JCommonsenseQA train questions as user/assistant conversations, rendered
with the project's chat template by ``kinoe tokenizer encode``). Built once per test session.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from common.run import run_stage
from data_prep.normalise import normalise_text
from data_prep.source_presets import source_preset
from tokenizer.cli import STEPS, model_path, shards_path
from tokenizer.config import TokenizerConfig

VOCAB_SIZE = 2048  # the tiny model's vocabulary
CONVERSATIONS = 800


def _write_documents(shared: Path, folder: Path) -> None:
    corpus = shared / "corpus"
    for name, file in (("wikipedia", "wikipedia_ja_leads"), ("web", "fineweb2_ja_web")):
        with (
            gzip.open(corpus / f"{file}.jsonl.gz", "rt", encoding="utf-8") as source,
            gzip.open(folder / f"{name}.jsonl.gz", "wt", encoding="utf-8") as target,
        ):
            for record in map(json.loads, source):
                text = normalise_text(record["text"], source_preset(name).normalise)
                if text:
                    document = {"id": record["id"], "text": text, "source": name, "metadata": {}}
                    target.write(json.dumps(document, ensure_ascii=False) + "\n")


def _write_conversations(shared: Path, path: Path) -> None:
    lines = (shared / "eval" / "jglue" / "jcommonsenseqa-train.json").read_text("utf-8")
    with path.open("w", encoding="utf-8") as target:
        for line in lines.splitlines()[:CONVERSATIONS]:
            question = json.loads(line)
            choices = [question[f"choice{index}"] for index in range(5)]
            listed = "、".join(f"{index}. {choice}" for index, choice in enumerate(choices))
            messages = [
                {"role": "user", "content": f"{question['question']}\n選択肢: {listed}"},
                {"role": "assistant", "content": f"答えは「{choices[question['label']]}」です。"},
            ]
            target.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def build_pretrain_shards(shared: Path, root: Path) -> dict:
    """Train the tokenizer and encode the three sources under ``root``; return the paths."""
    documents = root / "documents"
    documents.mkdir(parents=True)
    _write_documents(shared, documents)
    conversations = root / "conversations.jsonl"
    _write_conversations(shared, conversations)
    config = TokenizerConfig.model_validate(
        {
            "run": {"root": str(root / "runs"), "name": "pretrain-tests"},
            "sample": {
                "documents": str(documents),
                "weights": {"wikipedia": 1.0, "web": 1.0},
                "character_budget": 400_000,
                "held_out_fraction": 0.05,
                "held_out_max_documents": 50,
            },
            "trainer": {"vocab_size": VOCAB_SIZE, "character_coverage": 0.995, "num_threads": 2},
            "encode": {"chat": {"instructions": str(conversations)}},
            "executor": {"tasks": 1, "workers": 1},
        }
    )
    for step in ("train", "encode"):
        run_stage(STEPS[step], config)
    shards = shards_path(config)
    return {
        "tokenizer": model_path(config),
        "sources": {name: shards / name for name in ("wikipedia", "web", "instructions")},
    }
