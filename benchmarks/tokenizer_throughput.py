"""Tokenizer cost: training time and memory for the sample, and encoding throughput per core.

Runs `kinoe data` (if its output is missing) and `kinoe tokenizer train` with the given
configs, then encodes every document with one process on one core. Prints a table.
Usage: python benchmarks/tokenizer_throughput.py [--data configs/data/local_corpora.yaml]
       [--tokenizer configs/tokenizer/local_corpora.yaml]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from common.manifest import package_versions
from common.run import load_stage_config, run_stage
from data_prep.cli import STAGE as DATA
from data_prep.config import DataConfig
from tokenizer.cli import STEPS, model_path, step_dir
from tokenizer.config import TokenizerConfig
from tokenizer.encode import EncodeShards
from tokenizer.sample import SampleStats, document_files, read_documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="configs/data/local_corpora.yaml")
    parser.add_argument("--tokenizer", default="configs/tokenizer/local_corpora.yaml")
    args = parser.parse_args()
    run_stage(DATA, load_stage_config(DataConfig, args.data))
    config = load_stage_config(TokenizerConfig, args.tokenizer)
    trained = run_stage(STEPS["train"], config, force=True)
    train_seconds = trained.manifest.summary["training_seconds"]
    sample_chars = sum(trained.manifest.summary["sample"]["characters"].values())
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    documents = []
    for path in document_files(config.sample.documents):
        for record in read_documents(path, SampleStats()):
            documents.append(record)
    from datatrove.data import Document

    docs = [
        Document(text=d["text"], id=str(d["id"]), metadata={"source": d["source"]})
        for d in documents
    ]
    characters = sum(len(d.text) for d in docs)
    with tempfile.TemporaryDirectory() as out:
        step = EncodeShards(str(model_path(config)), out)
        started = time.perf_counter()
        for _ in step.run(iter(docs), rank=0, world_size=1):
            pass
        seconds = time.perf_counter() - started
        tokens = sum(json.loads(p.read_text())["tokens"] for p in Path(out).glob("*/00000.json"))

    vocab = spm.SentencePieceProcessor(model_file=str(model_path(config))).get_piece_size()
    print(
        f"host: {platform.node()}, {platform.machine()}; versions: {package_versions(('sentencepiece', 'datatrove'))}"
    )
    print(
        f"tokenizer: {config.trainer.model_type}, {vocab:,} pieces; run in {step_dir(config, 'train')}"
    )
    print()
    print("| measure | value |")
    print("|---|---:|")
    print(f"| training sample | {sample_chars:,} characters |")
    print(f"| training time ({config.trainer.num_threads} threads) | {train_seconds:.1f} s |")
    print(f"| peak memory of the process (sampling + training) | {peak_gib:.2f} GiB |")
    print(f"| documents encoded | {len(docs):,} ({characters:,} characters) |")
    print(f"| tokens | {tokens:,} |")
    print(f"| encoding time, 1 process | {seconds:.2f} s |")
    print(
        f"| **encoding throughput per core** | **{tokens / seconds:,.0f} tokens/s** ({characters / seconds / 1e6:.2f} M characters/s) |"
    )


if __name__ == "__main__":
    main()
