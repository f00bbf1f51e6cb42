"""Near-dedup accuracy on real Japanese text with planted near-duplicates: recall and false merges.

Distinct documents are the real corpora in ../shared/data/corpus: every Wikipedia lead (most are
short), the FineWeb-2 web pages, and Aozora works cut into 300-3,000-character pieces. A sample
of them gets a planted copy edited at a random rate (substituted, inserted and deleted
characters), so that true Jaccard similarities spread over 0.5-1.0. Every document goes through
the real `kinoe data` pipeline (normalisation, no quality filter, no exact dedup, then MinHash)
once per setting. On the pipeline's output texts:

- recall: share of planted pairs at true character-5-gram Jaccard >= 0.8 of which one document
  was removed as a near duplicate;
- false merges: documents removed as near duplicates that have no other document at Jaccard
  >= 0.8 (brute force over every document), split into short (< 100 characters) and long.

Usage: python benchmarks/near_dedup_accuracy.py [--copies 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import random
import tempfile
import time
from pathlib import Path

from common.manifest import package_versions
from common.run import run_stage
from data_prep.cli import STAGE
from data_prep.config import DataConfig
from data_prep.sources import reader_for

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
RULES = ("length", "characters", "repetition", "sentences", "ellipsis", "ng_words")
SETTINGS = {
    "before (14 bands x 8 rows, LSH only)": {
        "bands": 14,
        "rows": 8,
        "min_chars": 0,
        "min_jaccard": 1e-9,
    },
    "now (20 x 6, exact below 100 chars, verified at 0.8)": {},
}


def shingles(text: str, n: int = 5) -> set[str]:
    return {text[i : i + n] for i in range(len(text) - n + 1)} or {text}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


def distinct_documents() -> list[str]:
    """Real texts, each once: leads, web pages, Aozora pieces."""
    texts = []
    for name in ("wikipedia_ja_leads.jsonl.gz", "fineweb2_ja_web.jsonl.gz"):
        with gzip.open(SHARED / name, "rt", encoding="utf-8") as handle:
            texts += [json.loads(line)["text"] for line in handle]
    aozora = DataConfig.model_validate(
        {"sources": [{"name": "a", "kind": "aozora", "path": str(SHARED / "aozora")}]}
    ).sources[0]
    rng = random.Random(1)
    for document in reader_for(aozora).run(None, 0, 1):
        text = document.text
        for start in range(0, min(len(text), 12_000), 3_000):
            piece = text[start : start + rng.randint(300, 3_000)]
            if len(piece) >= 300:
                texts.append(piece)
    return list(dict.fromkeys(texts))


def edited(text: str, rate: float, rng: random.Random) -> str:
    """A copy with about ``rate`` of its characters substituted, inserted or deleted."""
    characters = list(text)
    for _ in range(max(1, int(len(characters) * rate))):
        position = rng.randrange(len(characters))
        kind = rng.random()
        if kind < 0.5:
            characters[position] = rng.choice("あいうえおかきくけこの、。")
        elif kind < 0.75:
            characters.insert(position, rng.choice("がでにをは"))
        elif len(characters) > 20:
            del characters[position]
    return "".join(characters)


def run_pipeline(records: list[dict], settings: dict, scratch: Path) -> tuple[dict, dict, float]:
    """Kept and near-dedup-removed texts by id after one `kinoe data` run, and its seconds."""
    data = scratch / "input"
    data.mkdir(exist_ok=True)
    with gzip.open(data / "docs.jsonl.gz", "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    filters = {rule: {"enabled": False} for rule in RULES}
    config = DataConfig.model_validate(
        {
            "run": {"root": str(scratch / "runs"), "name": f"r{len(list(scratch.glob('runs/*')))}"},
            "sources": [{"name": "docs", "kind": "jsonl", "path": str(data), "filters": filters}],
            "dedup": {"exact": False, "minhash": settings},
            "executor": {"tasks": 1, "workers": 1},
        }
    )
    started = time.perf_counter()
    result = run_stage(STAGE, config)
    seconds = time.perf_counter() - started

    def texts(folder: Path) -> dict[str, str]:
        out = {}
        for path in sorted(folder.glob("*.jsonl.gz")):
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                for line in handle:
                    record = json.loads(line)
                    out[record["id"]] = record["text"]
        return out

    return (
        texts(result.run_dir / "documents"),
        texts(result.run_dir / "removed" / "near_dedup"),
        seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    originals = distinct_documents()
    records = [{"id": f"d{i}", "text": text} for i, text in enumerate(originals)]
    long_ids = [r["id"] for r in records if len(r["text"]) >= 100]
    pairs = []
    for index, original in enumerate(rng.sample(long_ids, args.copies)):
        text = records[int(original[1:])]["text"]
        records.append({"id": f"c{index}", "text": edited(text, rng.uniform(0.002, 0.04), rng)})
        pairs.append((original, f"c{index}"))

    print(
        f"input: {len(originals):,} distinct real documents "
        f"({sum(len(t) < 100 for t in originals):,} under 100 characters) "
        f"+ {len(pairs):,} planted copies"
    )
    print(
        f"host: {platform.node()}, {platform.processor() or platform.machine()}; "
        f"versions: {package_versions(('datatrove', 'numpy'))}"
    )
    print()
    print(
        "| setting | pairs at J>=0.8 | caught | recall | recall at 0.80-0.85 | "
        "pairs at J<0.8 with one removed | false merges (short / long) | seconds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for name, settings in SETTINGS.items():
            kept, removed, seconds = run_pipeline(records, settings, Path(scratch))
            every = kept | removed
            sets = {doc_id: shingles(text) for doc_id, text in every.items()}
            similar = [(a, b, jaccard(sets[a], sets[b])) for a, b in pairs]
            high = [(a, b) for a, b, j in similar if j >= 0.8]
            caught = sum((a in removed) or (b in removed) for a, b in high)
            edge = [(a, b) for a, b, j in similar if 0.8 <= j < 0.85]
            edge_caught = sum((a in removed) or (b in removed) for a, b in edge)
            low_merged = sum((a in removed or b in removed) for a, b, j in similar if j < 0.8)
            partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
            false_short = false_long = 0
            for doc_id in removed:
                mate = partner.get(doc_id)
                if mate is not None and jaccard(sets[doc_id], sets[mate]) >= 0.8:
                    continue
                if any(
                    other != doc_id and jaccard(sets[doc_id], sets[other]) >= 0.8 for other in sets
                ):
                    continue
                if len(every[doc_id]) < 100:
                    false_short += 1
                else:
                    false_long += 1
            print(
                f"| {name} | {len(high):,} | {caught:,} | {caught / max(1, len(high)):.3f} | "
                f"{edge_caught / max(1, len(edge)):.3f} ({len(edge)}) | {low_merged:,} | {false_short:,} / {false_long:,} | {seconds:.1f} |"
            )


if __name__ == "__main__":
    main()
