"""llm-jp-eval's categories and average, from a report's generation results.

llm-jp-eval v1.3 reports each category as the mean of its datasets' scores (a dataset's score
is its metric, the mean of Pearson and Spearman for JSTS-style correlations), and ``AVG`` as
the mean of the categories. kinoe has only some of its datasets, so every category and the
average name the datasets they lack: a number over fewer datasets is not llm-jp-eval's number,
and the report says so rather than averaging silently over what is there. Generation results
are used, as llm-jp-eval generates; log-likelihood scores are reported per task only.
"""

from __future__ import annotations

from statistics import fmean
from typing import Any

# category -> [(dataset, metric)], llm-jp-eval v1.3's grouping; datasets kinoe lacks are kept
# so they are named as missing.
CATEGORIES: dict[str, list[tuple[str, str]]] = {
    "NLI": [
        ("jamp", "exact_match"),
        ("janli", "exact_match"),
        ("jnli", "exact_match"),
        ("jsem", "exact_match"),
        ("jsick", "exact_match"),
    ],
    "QA": [("jemhopqa", "char_f1"), ("niilc", "char_f1"), ("aio", "char_f1")],
    "RC": [("jsquad", "char_f1")],
    "MC": [("jcommonsenseqa", "exact_match"), ("kuci", "exact_match")],
    "HE": [("mmlu_en", "exact_match"), ("jmmlu", "exact_match")],
    "EL": [("chabsa", "set_f1")],
    "FA": [
        ("wiki_reading", "char_f1"),
        ("wiki_ner", "set_f1"),
        ("wiki_dependency", "set_f1"),
        ("wiki_pas", "set_f1"),
        ("wiki_coreference", "set_f1"),
    ],
    "MR": [("mawps", "exact_match")],
    "MT": [
        ("alt-e-to-j", "comet_wmt22"),
        ("alt-j-to-e", "comet_wmt22"),
        ("wikicorpus-e-to-j", "comet_wmt22"),
        ("wikicorpus-j-to-e", "comet_wmt22"),
    ],
    "CG": [("mbpp", "code_exec")],
    "SUM": [("xlsum_ja", "rouge2_scaling")],
    "STS": [("jsts", "pearson"), ("jsts", "spearman")],
}
SCORING = "generation"


def category_scores(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per category its score over the datasets present and those missing; then ``AVG`` over the categories scored."""
    found = {
        (r["task"], metric): value
        for r in results
        if r.get("scoring") == SCORING and not r.get("skipped")
        for metric, value in r["metrics"].items()
    }
    categories: dict[str, Any] = {}
    for name, members in CATEGORIES.items():
        scored = {f"{d}/{m}": found[d, m] for d, m in members if (d, m) in found}
        missing = sorted({d for d, m in members if (d, m) not in found})
        categories[name] = {
            "score": fmean(scored.values()) if scored else None,
            "datasets": scored,
            "missing": missing,
        }
    scored_categories = {n: c["score"] for n, c in categories.items() if c["score"] is not None}
    return {
        "scoring": SCORING,
        "categories": categories,
        "AVG": {
            "score": fmean(scored_categories.values()) if scored_categories else None,
            "over": sorted(scored_categories),
            "missing_categories": sorted(set(CATEGORIES) - set(scored_categories)),
            "incomplete_categories": sorted(
                n for n in scored_categories if categories[n]["missing"]
            ),
            "comparable_with_llm_jp_eval": not any(c["missing"] for c in categories.values()),
        },
    }


def markdown_lines(summary: dict[str, Any]) -> list[str]:
    """The categories as a Markdown table, with what each lacks."""
    lines = [
        "",
        f"## llm-jp-eval categories ({summary['scoring']})",
        "",
        "| category | score | datasets scored | missing |",
        "|---|---:|---|---|",
    ]
    for name, category in summary["categories"].items():
        score = "—" if category["score"] is None else f"{category['score']:.4f}"
        lines.append(
            f"| {name} | {score} | {', '.join(category['datasets']) or '—'} "
            f"| {', '.join(category['missing']) or '—'} |"
        )
    average = summary["AVG"]
    score = "—" if average["score"] is None else f"{average['score']:.4f}"
    lines += [
        "",
        f"AVG {score} over {len(average['over'])} of {len(summary['categories'])} categories "
        f"({', '.join(average['over']) or 'none'}); no score for "
        f"{', '.join(average['missing_categories']) or 'none'}; incomplete: "
        f"{', '.join(average['incomplete_categories']) or 'none'}. "
        + (
            "Comparable with llm-jp-eval's AVG."
            if average["comparable_with_llm_jp_eval"]
            else "**Not** llm-jp-eval's AVG: datasets are missing (named above)."
        ),
    ]
    return lines
