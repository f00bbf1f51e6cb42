"""Eval reports: ``report.json`` (every score and everything that decided it), ``report.md``, W&B, comparisons.

A report is one JSON object: ``kind`` and ``version``; ``model`` (path, architecture, parameter
count, dtype, the SHA-256 of its directory and of its kinoe manifest); ``settings`` (split,
shots, seed, subset, max length, device, placement); ``results``, one per task and scoring
mode (``loglik``, ``generation``, ``bpc``, ``mt-bench``) with its metrics, counts, prompt
version and hash, decoding and wall time; and ``versions`` and ``git`` of the code that ran.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import KinoeError
from common.manifest import write_json_atomic

REPORT_KIND = "kinoe-eval-report"
REPORT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` and ``report.md`` into ``run_dir``."""
    write_json_atomic(run_dir / REPORT_JSON, report)
    (run_dir / REPORT_MD).write_text(markdown(report), encoding="utf-8")


def read_report(path: Path) -> dict[str, Any]:
    """A report written by ``write_report`` (the file, or the run directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KinoeError(f"{path} not found; pass report.json files of `kinoe eval` runs") from None
    except json.JSONDecodeError as error:
        raise KinoeError(f"{path}: not JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(report, dict) or report.get("kind") != REPORT_KIND:
        raise KinoeError(f"{path} is not a kinoe eval report (no kind: {REPORT_KIND})")
    return report


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else str(value)


def metric_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, scoring, metric): the flat view tables, W&B and comparisons use."""
    return [
        {
            "task": result["task"],
            "scoring": result["scoring"],
            "metric": metric,
            "value": value,
            "examples": result.get("examples"),
            "of": result.get("of"),
            "shots": result.get("shots"),
            "split": result.get("split"),
            "prompt_version": result.get("prompt_version"),
            "wall_s": result.get("wall_s"),
        }
        for result in report["results"]
        for metric, value in result["metrics"].items()
    ]


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: model and settings, then one table row per metric."""
    model, settings = report["model"], report["settings"]
    described = [f"{model['architecture']}"] if model.get("architecture") else []
    if model.get("parameters"):
        described.append(f"{model['parameters']:,} parameters")
    described.append(f"{settings.get('dtype')} on {settings.get('device')}")
    for key, name in (("sha256", "model directory SHA-256"), ("manifest_sha256", "kinoe manifest")):
        if model.get(key):
            described.append(f"{name} `{model[key][:12]}`")
    chosen = [f"Split {settings.get('split')}", f"seed {settings.get('seed')}"]
    chosen.append(f"subset: {settings.get('subset')}")
    if settings.get("max_length"):
        chosen.append(f"max length {settings['max_length']} tokens")
    lines = [
        f"# Evaluation of `{model.get('path') or model.get('answers')}`",
        "",
        ", ".join(described) + ".",
        "",
        ", ".join(chosen) + ".",
        "",
        "| task | scoring | metric | value | examples | shots | prompt | wall s | truncated |",
        "|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for result in report["results"]:
        wall = result.get("wall_s")
        for metric, value in result["metrics"].items():
            lines.append(
                f"| {result['task']} | {result['scoring']} | {metric} | {_value(value)} "
                f"| {result.get('examples')}/{result.get('of')} | {result.get('shots')} "
                f"| {result.get('prompt_version')} | {'—' if wall is None else f'{wall:.1f}'} "
                f"| {result.get('truncated_prompts', 0)} |"
            )
    for result in report["results"]:
        if result.get("skipped"):
            lines.append(
                f"| {result['task']} | {result['scoring']} | skipped: {result['skipped']} | | | | | | |"
            )
    dropped = [r for r in report["results"] if r.get("malformed")]
    if dropped:
        lines += [
            "",
            "Malformed records skipped: "
            + ", ".join(f"{r['task']} {r['scoring']} {r['malformed']}" for r in dropped)
            + " (each with file:line and reason in report.json).",
        ]
    limits = [r for r in report["results"] if r.get("answer_length")]
    if limits:
        lines += [
            "",
            "Generation limits (new tokens, in this model's tokens): "
            + ", ".join(
                f"{r['task']} {r['answer_length']['max_new_tokens']}"
                f" (longest gold {r['answer_length']['longest_gold_tokens']}"
                + (
                    f", **{r['answer_length']['golds_longer_than_limit']} golds longer**"
                    if r["answer_length"]["golds_longer_than_limit"]
                    else ""
                )
                + ")"
                for r in limits
            )
            + ".",
        ]
    if report.get("llm_jp_eval"):
        from eval.categories import markdown_lines

        lines += markdown_lines(report["llm_jp_eval"])
    judge = report.get("judge")
    if judge:
        served = ", ".join(judge.get("served_models") or []) or "no name given"
        samples = settings.get("samples", 1)
        lines += [
            "",
            f"Judge `{judge['model']}` (the endpoint answered as: {served}), prompts "
            f"`{judge['prompts']}` SHA-256 `{judge['prompts_sha256'][:12]}`; {samples} "
            f"answer{'s' if samples != 1 else ''} per question: `score` is the mean over samples "
            "of each sample's mean, `score_std` the standard deviation of those means.",
        ]
    placement = settings.get("placement") or {}
    if placement.get("misplaced"):
        lines += [
            "",
            f"**Offloaded model**: {placement['misplaced']} tensors or modules were not on "
            f"{placement.get('device')} (run with --allow-offload); timings are not comparable.",
        ]
    lines += [
        "",
        "Scoring: `loglik` compares the log-likelihood of each choice after the prompt (`acc`; "
        "`acc_norm` divides it by the choice's length in characters); `generation` is llm-jp-eval "
        "compatible greedy generation; `bpc` is bits per character of held-out text; `judge` is "
        "the MT-Bench judge's mean score (1-10).",
        "",
    ]
    return "\n".join(lines)


def _label(report: dict[str, Any], path: Path, taken: set[str]) -> str:
    label = report.get("label") or Path(str(report["model"].get("path", path))).name or str(path)
    if label in taken:
        label = str(path)
    taken.add(label)
    return label


def compare(paths: Sequence[Path]) -> str:
    """Two or more reports side by side: one row per (task, scoring, metric), one column per report.

    Rows whose reports differ in split, shots, prompt version or examples are marked, with the
    differences listed below the table, because their numbers do not measure the same thing.
    """
    if len(paths) < 2:
        raise KinoeError("compare needs two or more report.json files")
    reports = [read_report(path) for path in paths]
    taken: set[str] = set()
    labels = [
        _label(report, Path(path), taken) for report, path in zip(reports, paths, strict=True)
    ]
    tables = [
        {(r["task"], r["scoring"], r["metric"]): r for r in metric_rows(rep)} for rep in reports
    ]
    keys = list(dict.fromkeys(key for table in tables for key in table))
    lines = [
        "| task | scoring | metric | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---:|" * len(labels),
    ]
    notes = []
    for key in keys:
        rows = [table.get(key) for table in tables]
        settings = {(r["split"], r["shots"], r["prompt_version"], r["examples"]) for r in rows if r}
        mark = " ≠" if len(settings) > 1 else ""
        values = [_value(r["value"]) if r else "—" for r in rows]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]}{mark} | " + " | ".join(values) + " |")
        if mark:
            described = "; ".join(
                f"{label}: {r['split']}, {r['shots']} shots, {r['prompt_version']}, {r['examples']} examples"
                for label, r in zip(labels, rows, strict=True)
                if r
            )
            notes.append(f"- {key[0]} {key[1]} {key[2]} (≠: different settings): {described}")
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def log_to_wandb(report: dict[str, Any], settings, run_dir: Path, run_name: str) -> str | None:
    """Log the metric rows as a W&B table and as summary values; return the run's id."""
    import wandb

    from common.secrets import redact

    columns = [
        "task",
        "scoring",
        "metric",
        "value",
        "examples",
        "of",
        "shots",
        "split",
        "prompt_version",
        "wall_s",
    ]
    rows = metric_rows(report)
    try:
        run = wandb.init(
            entity=settings.entity,
            project=settings.project,
            group=settings.group,
            name=settings.name or run_name,
            tags=settings.tags,
            mode=settings.mode,
            dir=run_dir,
            job_type="eval",
            config=redact({"model": report["model"], "settings": report["settings"]}),
            settings=wandb.Settings(console="off"),
        )
    except wandb.errors.Error as error:
        raise KinoeError(
            f"W&B could not start ({error}); set WANDB_API_KEY or run `wandb login`, "
            "or set wandb.mode=offline"
        ) from None
    with run:
        run.log(
            {
                "eval/results": wandb.Table(
                    columns=columns, data=[[row[c] for c in columns] for row in rows]
                )
            }
        )
        for row in rows:
            if isinstance(row["value"], int | float):
                run.summary[f"eval/{row['task']}/{row['scoring']}/{row['metric']}"] = row["value"]
        categories = report.get("llm_jp_eval") or {}
        for name, category in categories.get("categories", {}).items():
            if category["score"] is not None:
                run.summary[f"eval/llm_jp_eval/{name}"] = category["score"]
        if categories.get("AVG", {}).get("score") is not None:
            # Named so that nobody reads it as llm-jp-eval's AVG when datasets are missing.
            complete = categories["AVG"]["comparable_with_llm_jp_eval"]
            key = "AVG" if complete else "AVG_incomplete"
            run.summary[f"eval/llm_jp_eval/{key}"] = categories["AVG"]["score"]
        return run.id
