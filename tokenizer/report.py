"""The tokenizer report: compression and exactness on held-out text, ours beside the references.

Figures per tokenizer and per source, on the same held-out documents:
characters per token and UTF-8 bytes per token (higher is better: a model sees more text per
token), the share of tokens that are byte-fallback pieces and unknown pieces (lower is
better), and the share of documents for which decode(encode(text)) == text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.manifest import write_json_atomic


def measure(model_path: Path, documents: Iterable[dict]) -> dict[str, Any]:
    """The figures for one SentencePiece model over held-out documents (overall and per source)."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    byte_ids = {i for i in range(processor.get_piece_size()) if processor.is_byte(i)}
    unk_id = processor.unk_id()
    totals: dict[str, dict[str, int]] = {}
    for document in documents:
        text = document["text"]
        ids = processor.encode(text)
        for key in ("all", document["source"]):
            row = totals.setdefault(
                key,
                {
                    "documents": 0,
                    "characters": 0,
                    "bytes": 0,
                    "tokens": 0,
                    "byte_tokens": 0,
                    "unk_tokens": 0,
                    "exact": 0,
                },
            )
            row["documents"] += 1
            row["characters"] += len(text)
            row["bytes"] += len(text.encode("utf-8"))
            row["tokens"] += len(ids)
            row["byte_tokens"] += sum(1 for i in ids if i in byte_ids)
            row["unk_tokens"] += sum(1 for i in ids if i == unk_id)
            row["exact"] += processor.decode(ids) == text
    return {
        "vocab_size": processor.get_piece_size(),
        "by_source": {key: _ratios(row) for key, row in totals.items()},
    }


def _ratios(row: dict[str, int]) -> dict[str, float | int]:
    tokens = max(row["tokens"], 1)
    return {
        "documents": row["documents"],
        "tokens": row["tokens"],
        "characters_per_token": round(row["characters"] / tokens, 4),
        "bytes_per_token": round(row["bytes"] / tokens, 4),
        "byte_fallback_rate": round(row["byte_tokens"] / tokens, 6),
        "unknown_rate": round(row["unk_tokens"] / tokens, 6),
        "round_trip_exact": round(row["exact"] / max(row["documents"], 1), 4),
    }


def write_report(
    ours: Path,
    references: dict[str, Path],
    held_out: list[dict],
    hf_mismatches: int,
    folder: Path,
) -> dict[str, Any]:
    """Measure every tokenizer, write report.json and report.md, return the summary."""
    tokenizers = {"kinoe": ours, **references}
    results = {name: measure(path, held_out) for name, path in tokenizers.items()}
    report = {
        "held_out_documents": len(held_out),
        "held_out_characters": sum(len(d["text"]) for d in held_out),
        "hf_sentencepiece_id_mismatches": hf_mismatches,
        "tokenizers": {
            name: {"model": str(path), **results[name]} for name, path in tokenizers.items()
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "report.json", report)
    (folder / "report.md").write_text(_markdown(report), encoding="utf-8")
    overall = results["kinoe"]["by_source"].get("all", {})
    return {
        "held_out_documents": len(held_out),
        "characters_per_token": overall.get("characters_per_token"),
        "round_trip_exact": overall.get("round_trip_exact"),
        "hf_sentencepiece_id_mismatches": hf_mismatches,
        "references": {
            name: results[name]["by_source"].get("all", {}).get("characters_per_token")
            for name in references
        },
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Tokenizer report",
        "",
        f"Held-out text: {report['held_out_documents']:,} documents, {report['held_out_characters']:,} characters "
        "(never in the training sample). Hugging Face and SentencePiece ids differ on "
        f"**{report['hf_sentencepiece_id_mismatches']}** of them.",
        "",
    ]
    sources = sorted({s for t in report["tokenizers"].values() for s in t["by_source"]} - {"all"})
    for scope in ["all", *sources]:
        title = "All held-out text" if scope == "all" else f"Source: {scope}"
        lines += [
            f"## {title}",
            "",
            "| tokenizer | vocab | chars/token | bytes/token | byte fallback | unknown | round trip exact |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, result in report["tokenizers"].items():
            row = result["by_source"].get(scope)
            if not row:
                continue
            lines.append(
                f"| {name} | {result['vocab_size']:,} | {row['characters_per_token']:.3f} | {row['bytes_per_token']:.3f} | "
                f"{100 * row['byte_fallback_rate']:.3f}% | {100 * row['unknown_rate']:.3f}% | {100 * row['round_trip_exact']:.1f}% |"
            )
        lines.append("")
    lines += [
        "Characters and bytes per token: more text per token means a longer effective context and",
        "fewer tokens to train on for the same text. Round trip: decode(encode(text)) == text on the",
        "held-out documents, which data_prep has already normalised. kinoe's tokenizer has no",
        "normaliser of its own, so it is exact on any normalised text by construction; the",
        "references normalise (and add a prefix space that decoding removes), which shows only on",
        "text that is not already in their normal form.",
        "",
    ]
    return "\n".join(lines)


def load_held_out(path: Path) -> list[dict]:
    """The held-out documents written by the train step."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
