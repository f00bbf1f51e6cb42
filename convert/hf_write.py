"""The Hugging Face model directory: config, generation config, tokenizer files and sharded weights.

``config.json`` comes from the family's ``hf_config`` (every architectural field), with the
dtype and the tokenizer's special-token ids; ``generation_config.json`` stops at EOS and at
the chat template's end-of-turn token, so chat generation ends with the assistant's turn.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import KinoeError
from common.logs import get_logger
from common.manifest import sha256_file
from convert.experts import unstack_experts
from convert.safetensors_shards import write_sharded
from convert.sources import Source, unique

# Files a Hugging Face tokenizer directory may hold; these are copied, nothing else.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}
HF_PREFIX = "model"
_SENTINEL = "kinoe-sentinel-ｷﾉｴ"


@dataclass(frozen=True)
class TokenizerFacts:
    """What the model directory needs from its tokenizer."""

    size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    turn_end: str | None
    turn_end_id: int | None
    has_chat_template: bool

    @property
    def stop_ids(self) -> list[int]:
        ids = [self.eos_token_id, self.turn_end_id]
        return list(dict.fromkeys(i for i in ids if i is not None))


def tokenizer_facts(tokenizer_dir: Path) -> TokenizerFacts:
    """Load ``tokenizer_dir`` with ``AutoTokenizer`` and read its special tokens and chat template."""
    from transformers import AutoTokenizer

    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise KinoeError(
            f"tokenizer = {tokenizer_dir} holds no Hugging Face tokenizer files; point it at "
            "`kinoe tokenizer export`'s export/hf directory"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KinoeError(
            f"tokenizer = {tokenizer_dir}: transformers cannot load it ({str(error).splitlines()[0]})"
        ) from None
    turn_end = turn_end_token(tokenizer)
    return TokenizerFacts(
        size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        turn_end=turn_end,
        turn_end_id=tokenizer.convert_tokens_to_ids(turn_end) if turn_end else None,
        has_chat_template=bool(tokenizer.chat_template),
    )


def turn_end_token(tokenizer: Any) -> str | None:
    """The special token the chat template writes right after a message's content, if any."""
    if not tokenizer.chat_template:
        return None
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False
        )
    except Exception as error:  # a template is code from the model's authors; any failure is theirs
        get_logger("convert").warning("cannot render the chat template (%s)", error)
        return None
    after = rendered[rendered.index(_SENTINEL) + len(_SENTINEL) :] if _SENTINEL in rendered else ""
    specials = sorted(set(tokenizer.all_special_tokens), key=len, reverse=True)
    return next((token for token in specials if after.startswith(token)), None)


def check_tokenizer(source: Source, tokenizer_dir: Path, facts: TokenizerFacts) -> None:
    """Refuse a tokenizer with more tokens than the model's vocabulary, or not the one it trained with."""
    vocab_size = source.args.vocab_size
    if facts.size > vocab_size:
        raise KinoeError(
            f"tokenizer = {tokenizer_dir} has {facts.size:,} tokens but the model's vocabulary "
            f"is {vocab_size:,}; this is not the model's tokenizer"
        )
    trained_with = source.provenance.get("tokenizer_sha256")
    model_file = tokenizer_dir / "tokenizer.model"
    if trained_with and model_file.is_file() and sha256_file(model_file) != trained_with:
        raise KinoeError(
            f"tokenizer = {tokenizer_dir}: its tokenizer.model is not the one the model was "
            f"trained with (data.tokenizer of {source.provenance.get('pretrain_run')}); export that one"
        )


def hf_model_config(source: Source, dtype: torch.dtype, facts: TokenizerFacts) -> Any:
    """The transformers config of ``source``'s architecture with dtype and special-token ids."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = source.model_family.hf_config(source.args)
    if not config.architectures:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = dtype
    config.bos_token_id = facts.bos_token_id
    config.eos_token_id = facts.eos_token_id
    config.pad_token_id = facts.pad_token_id
    return config


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files of ``tokenizer_dir`` into ``out_dir``; their names (none: no ``out_dir``)."""
    copied = [name for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()]
    for name in copied:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    return copied


def write_hf_directory(
    source: Source, out_dir: Path, dtype: str, tokenizer_dir: Path, max_shard_bytes: int
) -> dict[str, Any]:
    """Write ``source`` as a Hugging Face model directory in ``out_dir``; return what was written."""
    from transformers import GenerationConfig

    facts = tokenizer_facts(tokenizer_dir)
    check_tokenizer(source, tokenizer_dir, facts)
    if not facts.has_chat_template:
        get_logger("convert").warning(
            "tokenizer %s has no chat template; the model directory will have none", tokenizer_dir
        )
    torch_dtype = TORCH_DTYPE[dtype]
    try:
        hf_tensors = unstack_experts(source.model_family.to_hf(source.tensors))
    except ValueError as error:
        raise KinoeError(f"{source.origin}: {str(error).splitlines()[0]}") from None
    weights = write_sharded(
        unique(hf_tensors), out_dir, HF_PREFIX, torch_dtype, max_shard_bytes, "convert to-hf"
    )
    hf_model_config(source, torch_dtype, facts).save_pretrained(str(out_dir))
    GenerationConfig(
        bos_token_id=facts.bos_token_id,
        eos_token_id=facts.stop_ids or None,
        pad_token_id=facts.pad_token_id,
    ).save_pretrained(str(out_dir))
    copied = copy_tokenizer(tokenizer_dir, out_dir)
    return {
        "weights": weights,
        "tokenizer_files": copied,
        "special_tokens": {
            "bos": facts.bos_token_id,
            "eos": facts.eos_token_id,
            "pad": facts.pad_token_id,
            "turn_end": facts.turn_end,
            "stop_ids": facts.stop_ids,
        },
        "chat_template": facts.has_chat_template,
    }
