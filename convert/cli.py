"""``kinoe convert to-hf|verify|from-hf``: three steps, one config, a run directory each.

<run.root>/convert/<run.name>/to-hf/     the Hugging Face model directory itself: config.json,
                                         model.safetensors (or shards + index), generation_config.json,
                                         tokenizer files, and the manifest tracing it back
                             /verify/    verification.json (and the figures in the manifest)
                             /from-hf/   weights/, model.json, tokenizer/: a kinoe weights directory
                                         for model.init_from, or for to-hf with checkpoint=<it>
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.command import add_step_arguments, run_stage_command
from common.errors import KinoeError
from common.manifest import write_json_atomic
from common.run import Stage, StageContext, run_directory
from convert.config import ConvertConfig

if TYPE_CHECKING:
    from convert.sources import Source

MB = 1_000_000
TO_HF_FIRST = "run `kinoe convert to-hf` with this config first"


def step_dir(config: ConvertConfig, step: str) -> Path:
    """The run directory of one step of this conversion."""
    return run_directory("convert", config, step)


def _checkpoint(config: ConvertConfig) -> Path:
    if config.checkpoint is None:
        raise KinoeError(
            "checkpoint is not set; set checkpoint=<pretrain run directory> (or a from-hf directory)"
        )
    return Path(config.checkpoint)


def _source_input(config: ConvertConfig) -> Path:
    """What the source's manifest record hashes: the checkpoint's tag directory, or the weights directory."""
    from convert.consolidate import is_pretrain_run, resolve_tag

    path = _checkpoint(config)
    return resolve_tag(path, config.step) if is_pretrain_run(path) else path


def _tokenizer_for_source(config: ConvertConfig) -> Path:
    from convert.initial import TOKENIZER_DIR, is_weights_directory

    if config.tokenizer is not None:
        return Path(config.tokenizer)
    path = _checkpoint(config)
    if is_weights_directory(path) and (path / TOKENIZER_DIR).is_dir():
        return path / TOKENIZER_DIR
    raise KinoeError(
        "tokenizer is not set; set tokenizer=<tokenizer run>/export/hf (from `kinoe tokenizer export`)"
    )


def _hf_model(config: ConvertConfig) -> Path:
    if config.hf_model is None:
        raise KinoeError("hf_model is not set; set hf_model=<Hugging Face model directory>")
    return Path(config.hf_model)


def _verification_tokenizer(hf_dir: Path, config: ConvertConfig) -> Path:
    """The Hugging Face directory itself when it has a tokenizer, else ``tokenizer``."""
    from convert.hf_write import TOKENIZER_FILES

    if any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        return hf_dir
    if config.tokenizer is not None:
        return Path(config.tokenizer)
    raise KinoeError(
        f"{hf_dir} has no tokenizer files, and verification needs one: set tokenizer=<its tokenizer directory>"
    )


def _verified(summary: dict[str, Any], check) -> dict[str, Any]:
    """``summary`` with ``verification``: the figures ``check()`` returns; on failure they go with the error."""
    from convert.verify import VerificationFailed

    try:
        summary["verification"] = check()
    except VerificationFailed as failure:
        failure.summary = {**summary, "verification": failure.summary}
        raise
    return summary


def to_hf_step(context: StageContext[ConvertConfig]) -> dict[str, Any]:
    """Write the source's weights as a Hugging Face model directory, then verify it."""
    from convert.hf_write import write_hf_directory
    from convert.sources import open_source
    from convert.verify import verify

    config = context.config
    source = open_source(_checkpoint(config), config.step)
    tokenizer = _tokenizer_for_source(config)
    context.logger.info(
        "convert to-hf: %s %s, %s parameters, from %s",
        source.family,
        config.dtype,
        f"{source.num_parameters():,}",
        source.origin,
    )
    written = write_hf_directory(
        source, context.run_dir, config.dtype, tokenizer, config.max_shard_size_mb * MB
    )
    summary = {
        "source": source.provenance,
        "tokenizer": str(tokenizer),
        "family": source.family,
        "args": source.args.model_dump(mode="json"),
        "dtype": config.dtype,
        "parameters": source.num_parameters(),
        **written,
    }
    if not config.verify.enabled:
        context.logger.warning("convert to-hf: verification is off (verify.enabled=false)")
        return summary
    return _verified(
        summary, lambda: verify(source, context.run_dir, context.run_dir, config.verify)
    )


def verify_step(context: StageContext[ConvertConfig]) -> dict[str, Any]:
    """Verify a Hugging Face directory (``hf_model``, default: the to-hf output) against the source."""
    from convert.sources import open_source
    from convert.verify import VerificationFailed, verify

    config = context.config
    hf_dir = Path(config.hf_model) if config.hf_model else step_dir(config, "to-hf")
    source = open_source(_checkpoint(config), config.step)
    summary: dict[str, Any] = {"source": source.provenance, "hf_model": str(hf_dir)}
    try:
        summary = _verified(
            summary,
            lambda: verify(source, hf_dir, _verification_tokenizer(hf_dir, config), config.verify),
        )
    except VerificationFailed as failure:
        write_json_atomic(context.run_dir / "verification.json", failure.summary)
        raise
    write_json_atomic(context.run_dir / "verification.json", summary)
    return summary


def from_hf_step(context: StageContext[ConvertConfig]) -> dict[str, Any]:
    """Write a Hugging Face Mistral/Mixtral as a kinoe weights directory, then verify it."""
    import json

    from convert.hf_read import hf_source
    from convert.hf_write import copy_tokenizer
    from convert.initial import TOKENIZER_DIR, weights_source, write_weights_directory
    from convert.verify import verify

    config = context.config
    hf_dir = _hf_model(config)
    source = hf_source(hf_dir)
    _check_fits(source)
    context.logger.info(
        "convert from-hf: %s, %s parameters, from %s",
        source.family,
        f"{source.num_parameters():,}",
        hf_dir,
    )
    written = write_weights_directory(source, context.run_dir, config.max_shard_size_mb * MB)
    tokenizer_files = copy_tokenizer(config.tokenizer or hf_dir, context.run_dir / TOKENIZER_DIR)
    context.logger.info(
        "convert from-hf: continue pretraining from it with this model section: %s",
        json.dumps(written["pretrain_model"], ensure_ascii=False),
    )
    summary = {
        "source": source.provenance,
        "family": source.family,
        "args": source.args.model_dump(mode="json"),
        "parameters": source.num_parameters(),
        **written,
        "tokenizer_files": tokenizer_files,
    }
    if not config.verify.enabled:
        context.logger.warning("convert from-hf: verification is off (verify.enabled=false)")
        return summary
    reread = weights_source(context.run_dir)
    tokenizer = _verification_tokenizer(hf_dir, config)
    return _verified(summary, lambda: verify(reread, hf_dir, tokenizer, config.verify))


def _check_fits(source: Source) -> None:
    """Refuse, before writing anything, tensors that do not fit our model of these args."""
    import torch

    from convert.sources import unique

    with torch.device("meta"):
        model = source.model_family.model_type(source.args)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tensors = unique(source.tensors)
    problems = [
        f"{name} is {ref.shape}, kinoe's {source.family} has {expected[name]}"
        for name, ref in tensors.items()
        if name in expected and ref.shape != expected[name]
    ]
    missing = sorted(set(expected) - set(source.tensors))
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}")
    if problems:
        raise KinoeError(f"{source.origin}: {'; '.join(problems[:3])}")


STEPS: dict[str, Stage] = {
    "to-hf": Stage(
        "convert",
        ConvertConfig,
        to_hf_step,
        inputs=lambda c: {"checkpoint": _source_input(c), "tokenizer": _tokenizer_for_source(c)},
        step="to-hf",
        fingerprint_sections=frozenset(
            {"checkpoint", "step", "tokenizer", "dtype", "max_shard_size_mb", "verify"}
        ),
    ),
    "verify": Stage(
        "convert",
        ConvertConfig,
        verify_step,
        inputs=lambda c: {
            "checkpoint": _source_input(c),
            ("hf_model" if c.hf_model else TO_HF_FIRST): (
                Path(c.hf_model) if c.hf_model else step_dir(c, "to-hf")
            ),
        },
        step="verify",
        fingerprint_sections=frozenset({"checkpoint", "step", "tokenizer", "hf_model", "verify"}),
    ),
    "from-hf": Stage(
        "convert",
        ConvertConfig,
        from_hf_step,
        inputs=lambda c: {"hf_model": _hf_model(c)},
        step="from-hf",
        fingerprint_sections=frozenset({"hf_model", "tokenizer", "max_shard_size_mb", "verify"}),
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_step_arguments(
        parser,
        {
            "to-hf": "write a pretrain checkpoint (any ZeRO stage and rank count) as a verified Hugging Face model",
            "verify": "compare a Hugging Face model's logits and generations with the checkpoint's",
            "from-hf": "write a Hugging Face Mistral/Mixtral as kinoe weights to continue pretraining from",
        },
    )


def main(args: argparse.Namespace) -> int:
    return run_stage_command(STEPS[args.step], args)
