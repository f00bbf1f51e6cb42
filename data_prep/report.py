"""The data_prep report: the funnel (in = kept + removed + duplicates), per source, lengths, samples.

Written to ``<run>/report/``: ``report.json`` (every figure), ``report.md`` (for people),
``funnel.png`` and ``lengths.png``, and ``samples.md`` with removed documents per step.
"""

from __future__ import annotations

import gzip
import json
import logging
from itertools import islice
from pathlib import Path
from typing import Any

from common.errors import KinoeError
from common.manifest import write_json_atomic
from data_prep.config import DataConfig
from data_prep.dedup import verification_counts
from data_prep.outputs import LENGTH_BINS, Tally
from data_prep.pii import pii_counts
from data_prep.pipeline import (
    INPUT_TALLY,
    KEPT_TALLY,
    NORMALISED_TALLY,
    PII_TALLY,
    QUALITY_TALLY,
    Layout,
    removal_order,
    removed_before_normalising,
    scored_sources,
)
from data_prep.quality_model import score_tallies


def build_funnel(config: DataConfig, layout: Layout) -> dict[str, Any]:
    """Counts from the tallies: what came in, what each step removed, what was kept."""
    incoming = Tally.load_all(layout.tally(INPUT_TALLY))
    kept = Tally.load_all(layout.tally(KEPT_TALLY))
    removed = {
        step: Tally.load_all(layout.tally(f"removed/{step}")) for step in removal_order(config)
    }
    accounted = kept.documents + sum(t.documents for t in removed.values())
    rows, remaining_docs, remaining_chars = [], incoming.documents, incoming.characters
    for step, tally in removed.items():
        remaining_docs -= tally.documents
        rows.append(
            {
                "step": step,
                "removed_documents": tally.documents,
                "removed_characters": tally.characters,
                "remaining_documents": remaining_docs,
                "share_of_input": tally.documents / incoming.documents
                if incoming.documents
                else 0.0,
                "reasons": dict(sorted(tally.by_reason.items(), key=lambda item: -item[1])),
            }
        )
        remaining_chars -= tally.characters
    sources = {}
    for source in config.sources:
        name = source.name
        sources[name] = {
            "in": incoming.by_source.get(name, {"documents": 0, "characters": 0}),
            "kept": kept.by_source.get(name, {"documents": 0, "characters": 0}),
            "removed": {
                step: t.by_source.get(name, {}).get("documents", 0) for step, t in removed.items()
            },
        }
    return {
        "documents_in": incoming.documents,
        "characters_in": incoming.characters,
        "documents_kept": kept.documents,
        "characters_kept": kept.characters,
        "documents_removed": sum(t.documents for t in removed.values()),
        "balanced": accounted == incoming.documents,
        "steps": rows,
        "sources": sources,
        "length_bins": list(LENGTH_BINS),
        "length_histogram": {
            # After normalisation, so that in = kept + removed holds bin by bin: documents
            # counted where every later step sees them, plus those removed before that point.
            "in": [
                sum(column)
                for column in zip(
                    Tally.load_all(layout.tally(NORMALISED_TALLY)).length_histogram,
                    *(
                        removed[step].length_histogram
                        for step in removed_before_normalising(config)
                    ),
                    strict=True,
                )
            ],
            "kept": kept.length_histogram,
            "removed": [
                sum(column)
                for column in zip(*(t.length_histogram for t in removed.values()), strict=True)
            ],
        },
    }


def nothing_readable(config: DataConfig, layout: Layout) -> str | None:
    """One line naming every source and why its records were rejected, when not one input
    record of any source could be read (a run with nothing to filter is the user's input)."""
    incoming = Tally.load_all(layout.tally(INPUT_TALLY))
    unreadable = Tally.load_all(layout.tally("removed/read_errors"))
    if incoming.documents != unreadable.documents:
        return None
    parts = []
    for index, source in enumerate(config.sources):
        records = incoming.by_source.get(source.name, {}).get("documents", 0)
        reasons = unreadable.reasons_by_source.get(source.name, {})
        why = ", ".join(f"{reason} {count:,}" for reason, count in sorted(reasons.items()))
        where = f"{source.path or source.folder()} ({source.file_glob() or 'all files'})"
        parts.append(
            f"source {source.name!r} (sources.{index}, {where}): {records:,} records read"
            + (f", rejected as {why}" if why else ", its files are empty")
        )
    return (
        "data: no input record was readable; "
        + "; ".join(parts)
        + f"; see {layout.removed('read_errors')} and fix the files or each source's "
        "kind, glob and text_field"
    )


def read_samples(folder: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` removed documents written in ``folder`` (any task's file)."""
    samples: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in islice(handle, count - len(samples)):
                samples.append(json.loads(line))
        if len(samples) >= count:
            break
    return samples


def write_report(
    config: DataConfig, layout: Layout, timings: dict[str, float], logger: logging.Logger
) -> dict[str, Any]:
    """Write the report files and return the summary for the manifest; unbalanced is our bug."""
    funnel = build_funnel(config, layout)
    minhash = config.dedup.minhash
    funnel["dedup"] = {
        "exact": config.dedup.exact,
        "minhash": minhash.enabled,
        "minhash_ngram_chars": minhash.ngram,
        "minhash_bands": minhash.bands,
        "minhash_rows": minhash.rows,
        "minhash_threshold": round(minhash.threshold, 4),
        "minhash_min_chars": minhash.min_chars,
        "minhash_min_jaccard": minhash.min_jaccard,
        "minhash_pairs": verification_counts(layout.minhash_verified) if minhash.enabled else {},
        # Kept documents by the input documents each stands for (itself, exact and near copies):
        # what rehydration at encoding repeats them by.
        "kept_by_cluster_size": dict(
            sorted(Tally.load_all(layout.tally(KEPT_TALLY)).cluster_sizes.items(), key=_size)
        ),
        "detection_probability": {
            f"{s:.2f}": round(minhash.detection_probability(s), 4)
            for s in (0.5, 0.7, 0.8, 0.9, 0.95)
        },
    }
    by_size = funnel["dedup"]["kept_by_cluster_size"]
    funnel["dedup"]["documents_represented"] = sum(int(n) * k for n, k in by_size.items())
    funnel["pii_masked"] = pii_counts(layout.tally(PII_TALLY))
    if scored_sources(config):
        scores = score_tallies(layout.tally(QUALITY_TALLY), config.quality.samples_per_band)
        total = sum(scores["histogram"]) or 1
        # Share of scored documents at or above each band's lower edge: what a threshold keeps.
        scores["kept_share_by_threshold"] = {
            f"{0.1 * band:.1f}": round(sum(scores["histogram"][band:]) / total, 4)
            for band in range(1, 10)
        }
        funnel["quality_scores"] = {
            key: value for key, value in scores.items() if key != "samples"
        } | {"model": str(config.quality.model)}
    funnel["seconds_per_step"] = timings
    layout.report.mkdir(parents=True, exist_ok=True)
    samples = {
        step: read_samples(layout.removed(step), config.report.samples_per_step)
        for step in removal_order(config)
    }
    write_json_atomic(layout.report / "report.json", funnel)
    (layout.report / "report.md").write_text(_markdown(funnel, layout), encoding="utf-8")
    (layout.report / "samples.md").write_text(
        _samples_markdown(samples, config.report.sample_chars), encoding="utf-8"
    )
    _charts(funnel, layout.report)
    if "quality_scores" in funnel:
        _quality_report(funnel["quality_scores"], scores["samples"], layout.report)
    logger.info(
        "data: %s documents in, %s kept, %s removed; report in %s",
        f"{funnel['documents_in']:,}",
        f"{funnel['documents_kept']:,}",
        f"{funnel['documents_in'] - funnel['documents_kept']:,}",
        layout.report,
    )
    unreadable = nothing_readable(config, layout)
    if unreadable:
        raise KinoeError(unreadable)
    if not funnel["balanced"]:
        # Every document read is either kept or written as removed by exactly one step.
        raise RuntimeError(
            f"funnel does not balance: {funnel['documents_in']} in, {funnel['documents_kept']} kept, "
            f"{funnel['documents_removed']} removed; see {layout.report / 'report.json'}"
        )
    summary_keys = (
        "documents_in",
        "documents_kept",
        "documents_removed",
        "characters_in",
        "characters_kept",
        "balanced",
        "pii_masked",
    )
    return {key: funnel[key] for key in summary_keys} | {
        "removed_by_step": {row["step"]: row["removed_documents"] for row in funnel["steps"]},
        "kept_by_cluster_size": funnel["dedup"]["kept_by_cluster_size"],
    }


def _size(item: tuple[str, int]) -> int:
    return int(item[0])


def _markdown(funnel: dict[str, Any], layout: Layout) -> str:
    docs_in, chars_in = funnel["documents_in"], funnel["characters_in"]
    lines = [
        "# data_prep report",
        "",
        f"Documents in: **{docs_in:,}** ({chars_in:,} characters). Kept: **{funnel['documents_kept']:,}** "
        f"({funnel['characters_kept']:,} characters). Removed: {funnel['documents_removed']:,}. "
        f"Balanced (in = kept + removed + duplicates): **{'yes' if funnel['balanced'] else 'NO'}**.",
        "",
        "## Funnel",
        "",
        "| step | removed documents | share of input | removed characters | remaining documents | top reasons |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in funnel["steps"]:
        reasons = ", ".join(
            f"{reason} ({count:,})" for reason, count in list(row["reasons"].items())[:4]
        )
        lines.append(
            f"| {row['step']} | {row['removed_documents']:,} | {100 * row['share_of_input']:.1f}% | "
            f"{row['removed_characters']:,} | {row['remaining_documents']:,} | {reasons} |"
        )
    lines += [
        "",
        "## Per source",
        "",
        "| source | in | kept | kept share | "
        + " | ".join(r["step"] for r in funnel["steps"])
        + " |",
    ]
    lines.append("|---|---:|---:|---:|" + "---:|" * len(funnel["steps"]))
    for name, counts in funnel["sources"].items():
        got, kept = counts["in"]["documents"], counts["kept"]["documents"]
        share = f"{100 * kept / got:.1f}%" if got else "-"
        removed = " | ".join(f"{counts['removed'][r['step']]:,}" for r in funnel["steps"])
        lines.append(f"| {name} | {got:,} | {kept:,} | {share} | {removed} |")
    if "quality_scores" in funnel:
        quality = funnel["quality_scores"]
        lines += [
            "",
            "## Quality classifier",
            "",
            f"Model `{quality['model']}`. Scored documents: {sum(quality['histogram']):,}. "
            "Share at or above each threshold: "
            + ", ".join(
                f"{t}: {share:.2f}" for t, share in quality["kept_share_by_threshold"].items()
            )
            + ". Histogram `quality_scores.png`, samples per band `quality_samples.md`.",
        ]
    pii = funnel["pii_masked"]
    lines += [
        "",
        "## Personal data masked",
        "",
        f"{pii['documents']:,} documents had personal data replaced by placeholders (before the "
        "filters, so removed documents are masked too): "
        + ", ".join(f"{kind} {count:,}" for kind, count in pii.items() if kind != "documents")
        + ".",
    ]
    dedup = funnel["dedup"]
    lines += [
        "",
        "## Deduplication",
        "",
        f"Exact: {'on' if dedup['exact'] else 'off'}. MinHash: {'on' if dedup['minhash'] else 'off'}, "
        f"{dedup['minhash_ngram_chars']}-character shingles, {dedup['minhash_bands']} bands x {dedup['minhash_rows']} rows, "
        f"band threshold about {dedup['minhash_threshold']:.2f} Jaccard similarity. Probability that a pair "
        "becomes a candidate: "
        + ", ".join(f"{p:.2f} at {s}" for s, p in dedup["detection_probability"].items())
        + f". Candidates are duplicates only at a true Jaccard similarity of at least "
        f"{dedup['minhash_min_jaccard']}; documents under {dedup['minhash_min_chars']} characters are "
        "deduplicated exactly only. Candidate pairs: "
        + ", ".join(f"{key} {value:,}" for key, value in dedup["minhash_pairs"].items())
        + ".",
        "",
        "Kept documents by duplicate-cluster size (`metadata.minhash_cluster_size`: the input "
        "documents each stands for, exact copies included; rehydration at encoding repeats by it): "
        + (
            ", ".join(f"{size}: {count:,}" for size, count in dedup["kept_by_cluster_size"].items())
            or "none recorded (near dedup off)"
        )
        + f". Together they stand for {dedup['documents_represented']:,} documents.",
        "",
        "## Document lengths (characters)",
        "",
        "| up to | in (after normalisation) | kept | removed |",
        "|---:|---:|---:|---:|",
    ]
    histogram = funnel["length_histogram"]
    bounds = [f"{b:,}" for b in funnel["length_bins"]] + ["more"]
    for index, bound in enumerate(bounds):
        lines.append(
            f"| {bound} | {histogram['in'][index]:,} | {histogram['kept'][index]:,} | {histogram['removed'][index]:,} |"
        )
    lines += ["", "## Time per step (seconds)", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {step} | {seconds:.1f} |" for step, seconds in funnel["seconds_per_step"].items()]
    lines += [
        "",
        "Charts: `funnel.png`, `lengths.png`. Removed documents for review: `samples.md`, and all of them in "
        f"`{layout.root.name}/removed/<step>/`.",
        "",
    ]
    return "\n".join(lines)


def _samples_markdown(samples: dict[str, list[dict[str, Any]]], chars: int) -> str:
    lines = ["# Removed documents, for review", ""]
    for step, documents in samples.items():
        lines += [f"## {step}", ""]
        if not documents:
            lines += ["(none removed)", ""]
        for document in documents:
            metadata = document.get("metadata", {})
            reason = metadata.get("filter_reason") or metadata.get("read_error") or step
            text = document.get("text", "")
            excerpt = text[:chars].replace("\n", " ⏎ ") + (" …" if len(text) > chars else "")
            lines += [
                f"- `{document.get('id')}` ({document.get('source')}, {len(text):,} chars): {reason}",
                f"  > {excerpt}",
                "",
            ]
    return "\n".join(lines)


def _charts(funnel: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    steps = ["input"] + [row["step"] for row in funnel["steps"]]
    remaining = [funnel["documents_in"]] + [row["remaining_documents"] for row in funnel["steps"]]
    figure, axis = plt.subplots(figsize=(8, 0.5 * len(steps) + 1.5))
    axis.barh(steps[::-1], remaining[::-1], color="#4c72b0")
    for y, value in enumerate(remaining[::-1]):
        axis.text(value, y, f" {value:,}", va="center", fontsize=8)
    axis.set_xlabel("documents remaining after the step")
    axis.set_title("data_prep funnel")
    figure.tight_layout()
    figure.savefig(folder / "funnel.png", dpi=120)
    plt.close(figure)

    histogram = funnel["length_histogram"]
    labels = [f"≤{b:,}" for b in funnel["length_bins"]] + ["more"]
    positions = range(len(labels))
    figure, axis = plt.subplots(figsize=(10, 4))
    width = 0.4
    axis.bar(
        [p - width / 2 for p in positions], histogram["kept"], width, label="kept", color="#55a868"
    )
    axis.bar(
        [p + width / 2 for p in positions],
        histogram["removed"],
        width,
        label="removed",
        color="#c44e52",
    )
    axis.set_xticks(list(positions), labels, rotation=60, fontsize=7)
    axis.set_xlabel("document length (characters)")
    axis.set_ylabel("documents")
    axis.legend()
    axis.set_title("document lengths")
    figure.tight_layout()
    figure.savefig(folder / "lengths.png", dpi=120)
    plt.close(figure)


def _quality_report(scores: dict[str, Any], samples: list[list[dict]], folder: Path) -> None:
    """``quality_scores.png`` (documents per 0.1 score band) and ``quality_samples.md``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{edge - 0.1:.1f}-{edge:.1f}" for edge in scores["bands"]]
    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.bar(labels, scores["histogram"], color="#4c72b0")
    axis.set_xlabel("quality score (P(reference-like))")
    axis.set_ylabel("documents scored")
    axis.set_title("quality classifier scores")
    axis.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    figure.savefig(folder / "quality_scores.png", dpi=120)
    plt.close(figure)
    lines = ["# Documents per quality-score band, for review", ""]
    for label, count, documents in zip(labels, scores["histogram"], samples, strict=True):
        lines += [f"## {label} ({count:,} documents)", ""]
        for document in documents:
            excerpt = document["text"].replace("\n", " ⏎ ")
            lines += [
                f"- `{document['id']}` ({document['source']}, score {document['score']:.3f})",
                f"  > {excerpt}",
                "",
            ]
        if not documents:
            lines += ["(none)", ""]
    (folder / "quality_samples.md").write_text("\n".join(lines), encoding="utf-8")
