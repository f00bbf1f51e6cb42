"""The ``kinoe convert`` config: what to convert, into which dtype, and how to verify it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from common.config import Config
from common.run import StageConfig


class Thresholds(Config):
    """Limits on how far the converted model's logits may stray from ours."""

    max_abs: float = Field(gt=0, description="Largest |logit difference| over every position")
    mean_abs: float = Field(gt=0, description="Mean |logit difference| over every logit")
    argmax_agreement: float = Field(
        ge=0, le=1, description="Least fraction of positions whose next-token argmax agrees"
    )


class VerifySettings(Config):
    """The comparison run after every conversion, and by ``kinoe convert verify``."""

    enabled: bool = Field(
        True,
        description="Verify at the end of to-hf and from-hf (`kinoe convert verify` always does)",
    )
    text: Path | None = Field(
        None,
        description="Japanese text to compare on: .jsonl/.jsonl.gz with a 'text' field, or .txt "
        "with one document per line; None: kinoe's bundled Japanese passages",
    )
    documents: int = Field(8, gt=0, description="The first this many non-empty documents")
    max_tokens: int = Field(
        128, gt=1, description="Tokens of each document compared (BOS included)"
    )
    prompt_tokens: int = Field(
        24, gt=0, description="Tokens of each document the generation starts from"
    )
    greedy_tokens: int = Field(16, ge=0, description="Tokens generated greedily by both models")
    # The exact check: the converted weights, read in float32, against ours with the same
    # weights (rounded to the output dtype) in float32. Any conversion error shows far above
    # float32 rounding, which is about 1e-6 for these logits.
    exact: Thresholds = Field(
        default_factory=lambda: Thresholds(max_abs=1e-4, mean_abs=1e-5, argmax_agreement=0.999)
    )
    # bf16 output only: the converted model run in bf16, as users will run it, against ours in
    # float32. bf16 keeps 8 significant bits, so weights and activations each carry ~0.4%
    # relative error that accumulates over the layers and grows with the logits' scale (the
    # quickstart model: max 0.07, mean 0.005, argmax 99.1%). These limits leave room for the
    # larger logits of bigger trained models and catch a model that breaks in bf16 (overflow,
    # a layer in the wrong dtype); the exact check is what proves the conversion.
    bf16: Thresholds = Field(
        default_factory=lambda: Thresholds(max_abs=2.0, mean_abs=0.2, argmax_agreement=0.95)
    )


class ConvertConfig(StageConfig):
    """``kinoe convert to-hf|verify|from-hf``: one config, a run directory per step."""

    checkpoint: Path | None = Field(
        None,
        description="What to convert to Hugging Face: a pretrain run directory (its config.yaml "
        "and checkpoints/) or a `kinoe convert from-hf` directory",
    )
    step: Literal["latest"] | int = Field(
        "latest", description="Which checkpoint of a pretrain run: latest or a step number"
    )
    tokenizer: Path | None = Field(
        None,
        description="Hugging Face tokenizer directory (`kinoe tokenizer export`'s export/hf); "
        "default: the one a from-hf directory carries",
    )
    hf_model: Path | None = Field(
        None,
        description="from-hf: the Hugging Face model to read; verify: the model to check "
        "(default: this config's to-hf output)",
    )
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="Weights of the to-hf output")
    max_shard_size_mb: int = Field(
        2000,
        gt=0,
        description="Largest safetensors file in MB (10^6 bytes); one tensor may exceed it",
    )
    verify: VerifySettings = Field(default_factory=VerifySettings)
