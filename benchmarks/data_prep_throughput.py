"""data_prep throughput on the real corpora in ../shared/data/corpus: MB/s per core per step and overall.

Each step is timed on one core over the whole input (every document, so steps compare on
the same bytes); MB are UTF-8 megabytes (2**20 bytes) of input text. "overall" is the full
`kinoe data` pipeline (reading, every step, both dedups, writing, report) with one task on one
worker. Usage: python benchmarks/data_prep_throughput.py [--config configs/data/local_corpora.yaml]
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path

import xxhash
from datatrove.data import Document

from common.config import load_config
from common.manifest import package_versions
from common.run import run_stage
from data_prep.cli import STAGE
from data_prep.config import DataConfig
from data_prep.dedup import CharacterMinhashSignature
from data_prep.filter_steps import quality_steps
from data_prep.normalise import Normaliser
from data_prep.pii import PiiMasker
from data_prep.sources import reader_for


def load_documents(config: DataConfig) -> list[Document]:
    """Every readable document of every source, in memory."""
    documents = []
    for source in config.sources:
        documents += [
            d for d in reader_for(source).run(None, 0, 1) if not d.metadata.get("read_error")
        ]
    return documents


def megabytes(documents: list[Document]) -> float:
    return sum(len(d.text.encode("utf-8")) for d in documents) / 2**20


def _masks(config: DataConfig, document: Document) -> bool:
    """True when the document's source masks personal data."""
    return any(s.name == document.metadata.get("source") and s.pii.mask for s in config.sources)


def timed(function, documents: list[Document]) -> float:
    started = time.perf_counter()
    for document in documents:
        function(document)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/data/local_corpora.yaml")
    args = parser.parse_args()
    config = load_config(DataConfig, args.config)
    raw = load_documents(config)
    size = megabytes(raw)
    rows: list[tuple[str, float]] = []

    normaliser = Normaliser({s.name: s.normalise for s in config.sources})
    documents = copy.deepcopy(raw)
    started = time.perf_counter()
    documents = list(normaliser.run(iter(documents), 0, 1))
    rows.append(("normalise", time.perf_counter() - started))

    with tempfile.TemporaryDirectory() as scratch:
        masker = PiiMasker({s.name: s.pii for s in config.sources}, Path(scratch))
        started = time.perf_counter()
        documents = list(masker.run(iter(documents), 0, 1))
        pii_seconds = time.perf_counter() - started
        rows.append(("pii masking (web source only)", pii_seconds))
        masked = megabytes([d for d in documents if config.sources and _masks(config, d)])

    for step in quality_steps({s.name: s.filters for s in config.sources}, lambda name: None):
        rows.append((f"filter: {step.name}", timed(step.filter, documents)))

    with tempfile.TemporaryDirectory() as scratch:
        signature = CharacterMinhashSignature(scratch, config.dedup.minhash)
        # The whole step: signatures written and sorted per band, shingle sets stored for
        # verification, documents under minhash.min_chars skipped.
        started = time.perf_counter()
        signature.run(iter(documents), 0, 1)
        rows.append(("minhash signature (step)", time.perf_counter() - started))
    rows.append(
        ("exact hash", timed(lambda d: xxhash.xxh64_intdigest(d.text.encode("utf-8")), documents))
    )
    core = sum(seconds for name, seconds in rows if name != "exact hash")

    with tempfile.TemporaryDirectory() as runs:
        whole = config.model_copy(deep=True)
        whole.run.root, whole.run.name = Path(runs), "benchmark"
        whole.executor.tasks, whole.executor.workers = 1, 1
        started = time.perf_counter()
        run_stage(STAGE, whole)
        overall = time.perf_counter() - started

    versions = package_versions(("datatrove", "numpy"))
    print(f"input: {len(raw):,} documents, {size:,.1f} MB UTF-8 ({args.config})")
    print(
        f"host: {platform.node()}, {platform.processor() or platform.machine()}; versions: {versions}"
    )
    print()
    print("| step | seconds | MB/s per core |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {size / seconds:,.2f} |")
    print(f"| **normalise + PII + filters + MinHash** | {core:.2f} | **{size / core:,.2f}** |")
    print(f"| overall `kinoe data` (1 task, 1 worker) | {overall:.2f} | {size / overall:,.2f} |")
    print()
    print(
        f"PII masking on the sources that mask: {masked:,.2f} MB in {pii_seconds:.3f} s, "
        f"{masked / max(pii_seconds, 1e-9):,.1f} MB/s per core"
    )


if __name__ == "__main__":
    main()
