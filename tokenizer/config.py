"""The ``kinoe tokenizer`` config: what to sample, how to train, what to compare, how to encode."""

from __future__ import annotations

import bisect
import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from common.config import Config
from common.executor import ExecutorConfig
from common.run import StageConfig

# GPU matrix multiplies run fastest when the embedding's rows come in multiples of 128.
VOCAB_MULTIPLE = 128
# Below this, token ids fit uint16 in the shards (Megatron's rule); above it they take int32.
UINT16_VOCAB_LIMIT = 65_500


class SampleConfig(Config):
    """Which text the tokenizer learns from: a weighted, budgeted sample of data_prep documents."""

    documents: Path = Field(
        description="Folder of data_prep documents (JSONL.gz or Parquet, documents contract), "
        "e.g. runs/data/<name>/documents"
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Sampling weight per source; sources not listed are left out. Empty: every "
        "source, equally",
    )
    character_budget: int = Field(
        20_000_000, ge=10_000, description="Characters of training text in total, split by weight"
    )
    held_out_fraction: float = Field(
        0.01, gt=0, lt=0.5, description="Share of documents kept out of training for the report"
    )
    held_out_max_documents: int = Field(2000, ge=10, description="Cap on held-out documents")
    seed: int = 1234

    @field_validator("weights")
    @classmethod
    def _positive(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = [name for name, weight in weights.items() if weight <= 0]
        if bad:
            raise ValueError(f"weights must be positive; fix {', '.join(bad)}")
        return weights


class TrainerConfig(Config):
    """The SentencePiece options kinoe chooses; docs/tokenizer.md gives the reason for each."""

    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = Field(65_024, ge=512, description="Pieces, a multiple of 128")
    # SentencePiece itself refuses coverage below 0.98, with an error that names no config key.
    character_coverage: float = Field(0.9995, ge=0.98, le=1.0)
    byte_fallback: bool = True
    split_digits: bool = True
    max_piece_length: int = Field(16, ge=1, le=64, description="Characters per piece at most")
    max_sentence_length: int = Field(
        4192,
        ge=256,
        le=1 << 16,
        description="Bytes per training line at most (longer lines are split)",
    )
    input_sentence_size: int = Field(
        10_000_000, ge=0, description="Lines the trainer loads (0: all); bounds its memory"
    )
    shuffle_input_sentence: bool = True
    seed_sentencepiece_size: int = Field(1_000_000, ge=1000, description="Unigram seed pieces")
    num_threads: int = Field(16, ge=1, description="Trainer threads")

    @field_validator("vocab_size")
    @classmethod
    def _multiple_of_128(cls, size: int) -> int:
        if size % VOCAB_MULTIPLE:
            lower = size - size % VOCAB_MULTIPLE
            raise ValueError(
                f"vocab_size {size} is not a multiple of {VOCAB_MULTIPLE}; use {lower} or "
                f"{lower + VOCAB_MULTIPLE}"
            )
        return size


class ReportSettings(Config):
    """Which reference tokenizers the report compares against (SentencePiece .model files)."""

    references: dict[str, Path] = Field(
        default_factory=dict, description="name -> SentencePiece model, e.g. mistral-7b-v0.1"
    )

    @field_validator("references")
    @classmethod
    def _exist(cls, references: dict[str, Path]) -> dict[str, Path]:
        missing = [
            f"{name} ({path})" for name, path in references.items() if not Path(path).is_file()
        ]
        if missing:
            raise ValueError(f"reference tokenizer files not found: {', '.join(missing)}")
        return references


# Chat sources name shard directories, so they follow data_prep's rule for source names.
CHAT_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# FineWeb-2's rehydration weights (its README): from a cluster of 2 or 3 a document is written
# 2 or 3 times, from 4 three times, from 5-99 five, from 100-999 eight, and from 1,000 on once,
# as such huge clusters are mostly boilerplate.
FINEWEB2_COPIES = {1: 1, 2: 2, 3: 3, 5: 5, 100: 8, 1000: 1}
# The cap on copies of one document: Muennighoff et al. (2023) fit the value of repeated tokens
# to decay with a constant of about 15 repetitions, so more copies mostly add memorisation.
MAX_COPIES = 16


class RehydrateConfig(Config):
    """FineWeb-2's rehydration: each kept document of the listed sources is written as many
    times as its duplicate-cluster size (``metadata.minhash_cluster_size``) earns."""

    sources: list[str] = Field(
        default_factory=list,
        description="data_prep sources whose documents are repeated by cluster size; empty: "
        "none (rehydration off, every document written once)",
    )
    copies: dict[int, int] = Field(
        default_factory=lambda: dict(FINEWEB2_COPIES),
        description="Smallest cluster size -> times a document is written when its cluster "
        f"size is at least that and below the next key (1 to {MAX_COPIES}); FineWeb-2's by default",
    )

    @field_validator("copies")
    @classmethod
    def _table(cls, copies: dict[int, int]) -> dict[int, int]:
        if 1 not in copies or min(copies) < 1:
            raise ValueError(
                "copies needs the key 1 (unique documents) and no key below it; e.g. {1: 1, 2: 2}"
            )
        bad = [f"{size}: {n}" for size, n in copies.items() if not 1 <= n <= MAX_COPIES]
        if bad:
            raise ValueError(f"copies must be 1 to {MAX_COPIES} per document; fix {', '.join(bad)}")
        return dict(sorted(copies.items()))

    def copies_for(self, cluster_size: int) -> int:
        """Times a document from a cluster of ``cluster_size`` input documents is written."""
        sizes = list(self.copies)
        return self.copies[sizes[max(bisect.bisect_right(sizes, cluster_size) - 1, 0)]]


class EncodeSettings(Config):
    """How documents, and conversations for the post-training phase, become token shards."""

    documents: Path | None = Field(
        None, description="Folder of documents to encode; default: sample.documents"
    )
    chat: dict[str, Path] = Field(
        default_factory=dict,
        description="Shard set name -> a JSONL(.gz) file, or a folder of them, of conversations "
        '({"messages": [{"role", "content"}, ...]}), rendered with the chat template',
    )
    batch_size: int = Field(256, ge=1, description="Documents per SentencePiece batch call")
    rehydrate: RehydrateConfig = Field(
        default_factory=RehydrateConfig,
        description="Repeat documents by duplicate-cluster size (FineWeb-2); off by default",
    )

    @model_validator(mode="after")
    def _documents_only(self) -> EncodeSettings:
        chat = [name for name in self.rehydrate.sources if name in self.chat]
        if chat:
            raise ValueError(
                f"rehydrate.sources names chat source(s) {', '.join(chat)}; conversations have "
                "no duplicate clusters, list data_prep sources only"
            )
        return self

    @field_validator("chat")
    @classmethod
    def _shard_set_names(cls, chat: dict[str, Path]) -> dict[str, Path]:
        bad = [name for name in chat if not CHAT_SOURCE_NAME.match(name)]
        if bad:
            raise ValueError(
                f"chat source names name shard directories: use lowercase letters, digits, '_' "
                f"and '-' (starting with a letter or digit); fix {', '.join(map(repr, bad))}"
            )
        return chat


class TokenizerConfig(StageConfig):
    """``kinoe tokenizer train|export|report|encode``: one config, one run directory per step."""

    fingerprint_exclude: ClassVar[frozenset[str]] = frozenset({"run", "executor"})

    sample: SampleConfig
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    report: ReportSettings = Field(default_factory=ReportSettings)
    encode: EncodeSettings = Field(default_factory=EncodeSettings)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    def documents_to_encode(self) -> Path:
        """The documents ``encode`` reads."""
        return self.encode.documents or self.sample.documents
