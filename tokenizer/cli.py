"""``kinoe tokenizer train|export|report|encode``: four steps, one config, a run directory each.

<run.root>/tokenizer/<run.name>/train/    tokenizer.model, tokenizer.vocab, sample.txt, held_out.jsonl
                               /export/   hf/ (Hugging Face tokenizer directory)
                               /report/   report.json, report.md
                               /encode/   shards/<source>/<task>.bin|.idx, shards.json
                                          conversations/<chat source>/<task>.json, .rejected.jsonl
                                          documents/<task>.json (documents read, records left out)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.command import add_step_arguments, run_stage_command
from common.errors import KinoeError
from common.executor import (
    PipelineStage,
    check_slurm_ready,
    kinoe_command,
    run_locally,
    submit_finishing_job,
    submit_to_slurm,
)
from common.manifest import read_manifest, write_json_atomic
from common.run import (
    CONFIG_NAME,
    Stage,
    StageContext,
    Submitted,
    run_directory,
)
from tokenizer.config import TokenizerConfig

MODEL_FILE = "tokenizer.model"
HELD_OUT_FILE = "held_out.jsonl"
HF_DIR = "hf"
SHARDS_DIR = "shards"
CONVERSATIONS_DIR = "conversations"
DOCUMENTS_DIR = "documents"


def step_dir(config: TokenizerConfig, step: str) -> Path:
    """The run directory of one step of this tokenizer run."""
    return run_directory("tokenizer", config, step)


def model_path(config: TokenizerConfig) -> Path:
    """The trained SentencePiece model."""
    return step_dir(config, "train") / MODEL_FILE


def hf_path(config: TokenizerConfig) -> Path:
    """The exported Hugging Face tokenizer directory."""
    return step_dir(config, "export") / HF_DIR


def shards_path(config: TokenizerConfig) -> Path:
    """The encoded token shards, one shard set per source."""
    return step_dir(config, "encode") / SHARDS_DIR


def train_step(context: StageContext[TokenizerConfig]) -> dict[str, Any]:
    """Sample the documents, then train SentencePiece on the sample."""
    import time

    from tokenizer.sample import write_sample
    from tokenizer.train import train

    config = context.config
    sample_path = context.run_dir / "sample.txt"
    stats = write_sample(
        config.sample,
        config.trainer.max_sentence_length,
        sample_path,
        context.run_dir / HELD_OUT_FILE,
    )
    for pool, missing in stats.shortfalls().items():
        context.logger.warning(
            "tokenizer: source %s had %s characters fewer than its budget", pool, f"{missing:,}"
        )
    for reason, count in stats.rejected.items():
        context.logger.warning(
            "tokenizer: %s records left out of the sample (%s), the first at %s",
            f"{count:,}",
            reason,
            stats.first_rejected[reason],
        )
    context.logger.info(
        "tokenizer: training %s, %s pieces, on %s characters in %s lines",
        config.trainer.model_type,
        f"{config.trainer.vocab_size:,}",
        f"{sum(stats.characters.values()):,}",
        f"{sum(stats.lines.values()):,}",
    )
    started = time.monotonic()
    options = train(config.trainer, sample_path, context.run_dir / "tokenizer")
    seconds = round(time.monotonic() - started, 1)
    write_json_atomic(context.run_dir / "trainer_options.json", options)
    summary = {
        "training_seconds": seconds,
        "sample": {
            "characters": stats.characters,
            "lines": stats.lines,
            "documents": stats.documents,
            "held_out": stats.held_out,
            "budgets": stats.budgets,
            "shortfalls": stats.shortfalls(),
            "rejected": stats.rejected,
            "first_rejected": stats.first_rejected,
        },
    }
    write_json_atomic(context.run_dir / "sample_stats.json", summary)
    return summary


def export_step(context: StageContext[TokenizerConfig]) -> dict[str, Any]:
    """Export to a Hugging Face directory and prove its ids equal SentencePiece's on held-out text."""
    from tokenizer.chat import CHAT_TEMPLATE
    from tokenizer.hf_export import export_hf_tokenizer, id_mismatches
    from tokenizer.report import load_held_out

    config = context.config
    out = export_hf_tokenizer(model_path(config), context.run_dir / HF_DIR, CHAT_TEMPLATE)
    texts = [d["text"] for d in load_held_out(step_dir(config, "train") / HELD_OUT_FILE)]
    mismatches = id_mismatches(model_path(config), out, texts)
    if mismatches:
        text = mismatches[0][0]
        raise RuntimeError(
            f"Hugging Face export disagrees with SentencePiece on {len(mismatches)} of {len(texts)} "
            f"held-out texts, first: {text[:80]!r}"
        )
    return {"hf_dir": str(out), "verified_texts": len(texts), "mismatches": 0}


def report_step(context: StageContext[TokenizerConfig]) -> dict[str, Any]:
    """Compare ours with the reference tokenizers on the held-out documents."""
    from tokenizer.hf_export import id_mismatches
    from tokenizer.report import load_held_out, write_report

    config = context.config
    held_out = load_held_out(step_dir(config, "train") / HELD_OUT_FILE)
    mismatches = id_mismatches(model_path(config), hf_path(config), [d["text"] for d in held_out])
    return write_report(
        model_path(config),
        dict(config.report.references),
        held_out,
        len(mismatches),
        context.run_dir,
    )


def encode_step(context: StageContext[TokenizerConfig]) -> dict[str, Any] | Submitted:
    """Encode every document and conversation into Megatron shards, one shard set per source."""
    import sentencepiece as spm

    from tokenizer.conversations import ConversationReader, conversation_summary
    from tokenizer.encode import DocumentReader, EncodeShards, assemble_shard_sets, read_summary
    from tokenizer.indexed import tokenizer_sha256

    config = context.config
    documents = config.documents_to_encode()
    setting = "encode.documents" if config.encode.documents else "sample.documents"
    reader = DocumentReader(documents, context.run_dir / DOCUMENTS_DIR, setting)
    output = context.run_dir / SHARDS_DIR
    accounts = context.run_dir / CONVERSATIONS_DIR
    # Conversation readers follow the document reader in the same tasks: each passes the
    # documents before it through, so one pipeline (and one SLURM array) encodes everything.
    conversations = [
        ConversationReader(path, name, accounts) for name, path in config.encode.chat.items()
    ]
    encoder = EncodeShards(
        str(model_path(config)),
        str(output),
        batch_size=config.encode.batch_size,
        bos_sources=tuple(config.encode.chat),
        rehydrate=config.encode.rehydrate,
    )
    stages = [PipelineStage("encode", [reader, *conversations, encoder], config.executor.tasks)]

    def logs(name: str) -> Path:
        return context.run_dir / "work" / "logs" / name

    if config.executor.kind == "slurm":
        slurm_logs = context.run_dir / "work" / "slurm_logs"
        jobs = submit_to_slurm(stages, config.executor, logs, slurm_logs, job_prefix(config))
        finish = submit_finishing_job(
            config.executor,
            f"{job_prefix(config)}index",
            slurm_logs,
            kinoe_command(
                "tokenizer",
                "encode",
                "-c",
                str(context.run_dir / CONFIG_NAME),
                "executor.kind=local",
            ),
            jobs[-1] if jobs else None,
        )
        return Submitted(
            jobs=[*jobs, finish], note=f"job {finish} writes shards.json and completes the manifest"
        )
    timings = run_locally(stages, config.executor, logs, context.logger, "tokenizer encode")
    read = read_summary(context.run_dir / DOCUMENTS_DIR)
    for reason, count in read["rejected"].items():
        context.logger.warning(
            "tokenizer encode: %s records left out of the documents (%s), the first at %s",
            f"{count:,}",
            reason,
            read["first_rejected"][reason],
        )
    if read["documents"] == 0:
        left_out = ", ".join(f"{reason} {n:,}" for reason, n in read["rejected"].items())
        first = next(iter(read["first_rejected"].values()), None)
        found = f"records left out: {left_out}, the first at {first}" if first else "no records"
        raise KinoeError(
            f"tokenizer encode: no document to encode in the {read['files']} file(s) under "
            f"{documents} ({found}); point {setting} at a data_prep run's documents/ folder "
            "(UTF-8 JSON lines or Parquet, a string text per record)"
        )
    processor = spm.SentencePieceProcessor(model_file=str(model_path(config)))
    sets = assemble_shard_sets(
        output, tokenizer_sha256(model_path(config)), processor.get_piece_size(), processor.eos_id()
    )
    chat = conversation_summary(accounts, dict(config.encode.chat), sets)
    for source, counts in chat.items():
        if counts["rejected"]:
            context.logger.warning(
                "tokenizer encode: %s of %s conversations of %s rejected (%s); see %s",
                f"{counts['read'] - counts['encoded']:,}",
                f"{counts['read']:,}",
                source,
                ", ".join(f"{reason} {n:,}" for reason, n in counts["rejected"].items()),
                accounts / source,
            )
    _check_every_document_written(read["documents"], sets, set(config.encode.chat))
    tokens = {source: meta["tokens"] for source, meta in sets.items()}
    rehydrated = {
        source: meta["rehydration"] for source, meta in sets.items() if "rehydration" in meta
    }
    for source in config.encode.rehydrate.sources:
        if source not in rehydrated:
            raise KinoeError(
                f"encode.rehydrate.sources: no document of source {source!r} was encoded "
                f"(encoded: {', '.join(sets)}); fix the name or remove it"
            )
        figures = rehydrated[source]
        context.logger.info(
            "tokenizer encode: %s rehydrated: %s documents written as %s (%s tokens as %s); "
            "documents by times written %s; %s without a cluster size",
            source,
            f"{figures['distinct_documents']:,}",
            f"{sets[source]['documents']:,}",
            f"{figures['distinct_tokens']:,}",
            f"{sets[source]['tokens']:,}",
            figures["documents_by_copies"],
            f"{figures['without_cluster_size']:,}",
        )
    seconds = timings["encode"]
    context.logger.info(
        "tokenizer encode: %s tokens in %.1f s (%s tokens/s) into %s",
        f"{sum(tokens.values()):,}",
        seconds,
        f"{sum(tokens.values()) / max(seconds, 1e-9):,.0f}",
        output,
    )
    summary = {
        "tokens": tokens,
        "documents": {source: meta["documents"] for source, meta in sets.items()},
        "conversations": chat,
        "read": read,
        "tokenizer_sha256": tokenizer_sha256(model_path(config)),
        "seconds": seconds,
    }
    if rehydrated:
        summary["rehydration"] = rehydrated
    return summary


def _check_every_document_written(read: int, sets: dict[str, dict], chat: set[str]) -> None:
    """Every document the readers passed on is in the shards once (rehydration's repeats aside)."""
    written = sum(
        meta["rehydration"]["distinct_documents"] if "rehydration" in meta else meta["documents"]
        for source, meta in sets.items()
        if source not in chat
    )
    if written != read:
        raise RuntimeError(f"{read} documents read but {written} in the shards")


def job_prefix(config: TokenizerConfig) -> str:
    """SLURM job names of this run's encoding start with this."""
    return f"kinoe-tokenizer-{config.run.name}-"


def _encode_precheck(config: TokenizerConfig) -> None:
    _check_sources(config)
    if config.executor.kind == "slurm":
        check_slurm_ready(job_prefix(config))


def _check_sources(config: TokenizerConfig) -> None:
    """Each chat source has conversation files and a name no data_prep source of the documents
    has; each source to rehydrate is one of theirs."""
    from tokenizer.conversations import CONVERSATION_SUFFIXES, conversation_files

    # A kinoe data run lists its sources in its manifest; other document folders are checked
    # after encoding, when a shard set holds more documents than its conversations.
    data_run = read_manifest(config.documents_to_encode().parent)
    data_sources = (
        {source.get("name") for source in data_run.config.get("sources", [])}
        if data_run is not None and data_run.stage == "data"
        else set()
    )
    missing = [name for name in config.encode.rehydrate.sources if name not in data_sources]
    if data_sources and missing:
        raise KinoeError(
            f"encode.rehydrate.sources: {', '.join(missing)} not among the sources of "
            f"{config.documents_to_encode()} ({', '.join(sorted(data_sources))}); fix the names"
        )
    for name, path in config.encode.chat.items():
        if name in data_sources:
            raise KinoeError(
                f"encode.chat.{name}: the documents have a data_prep source named {name!r} too; "
                "give the conversations another name"
            )
        if path.is_file() and not path.name.endswith(CONVERSATION_SUFFIXES):
            raise KinoeError(
                f"encode.chat.{name}: {path} is not a .jsonl or .jsonl.gz file of conversations"
            )
        if not conversation_files(path)[1]:
            raise KinoeError(
                f"encode.chat.{name}: {path} holds no .jsonl or .jsonl.gz files of conversations"
            )


TRAIN_FIRST = "run `kinoe tokenizer train` with this config first"
EXPORT_FIRST = "run `kinoe tokenizer export` with this config first"

STEPS: dict[str, Stage] = {
    "train": Stage(
        "tokenizer",
        TokenizerConfig,
        train_step,
        inputs=lambda c: {"sample.documents": c.sample.documents},
        step="train",
        fingerprint_sections=frozenset({"sample", "trainer"}),
    ),
    "export": Stage(
        "tokenizer",
        TokenizerConfig,
        export_step,
        inputs=lambda c: {TRAIN_FIRST: model_path(c)},
        step="export",
        fingerprint_sections=frozenset(),
    ),
    "report": Stage(
        "tokenizer",
        TokenizerConfig,
        report_step,
        inputs=lambda c: {
            TRAIN_FIRST: step_dir(c, "train") / HELD_OUT_FILE,
            EXPORT_FIRST: hf_path(c),
            **{f"report.references.{name}": path for name, path in c.report.references.items()},
        },
        step="report",
        fingerprint_sections=frozenset({"report"}),
    ),
    "encode": Stage(
        "tokenizer",
        TokenizerConfig,
        encode_step,
        inputs=lambda c: {
            (
                "encode.documents" if c.encode.documents else "sample.documents"
            ): c.documents_to_encode(),
            TRAIN_FIRST: model_path(c),
            **{f"encode.chat.{name}": path for name, path in c.encode.chat.items()},
        },
        precheck=_encode_precheck,
        step="encode",
        fingerprint_sections=frozenset({"encode"}),
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_step_arguments(
        parser,
        {
            "train": "sample data_prep documents and train SentencePiece",
            "export": "write a Hugging Face tokenizer directory and verify its ids",
            "report": "compare compression and exactness with reference tokenizers on held-out text",
            "encode": "encode documents and conversations into Megatron .bin/.idx shards, one set per source",
        },
    )


def main(args: argparse.Namespace) -> int:
    return run_stage_command(STEPS[args.step], args)
