"""``kinoe eval run|mt-bench|judge|compare|download``: evaluate a Hugging Face causal LM directory.

<run.root>/eval/<run.name>/run/        report.json, report.md, predictions/<task>-<scoring>.jsonl,
                                       prompts/<task>-<scoring>.txt (the first full prompt)
                          /mt-bench/   answers.jsonl (FastChat's answer format, appended as made)
                          /judge/      judgments.jsonl (appended as judged), report.json, report.md

``compare`` prints reports side by side; ``download`` fetches the JGLUE files at the pinned tag
and checks their SHA-256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.command import add_step_arguments
from common.errors import KinoeError
from common.manifest import git_state, now_iso, package_versions, read_manifest
from common.run import Stage, StageContext, load_stage_config, run_directory, run_stage
from eval.config import EvalConfig
from eval.data import DOWNLOAD_FIRST

MT_BENCH_FIRST = "run `kinoe eval mt-bench` with this config first"
TRACKED = (
    "kinoe",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "accelerate",
    "numpy",
    "scipy",
)


def step_dir(config: EvalConfig, step: str) -> Path:
    """The run directory of one step of this evaluation."""
    return run_directory("eval", config, step)


def _model_inputs(config: EvalConfig) -> dict[str, Path]:
    if config.model is None:
        raise KinoeError("model is not set; pass model=<Hugging Face model directory>")
    inputs = {"model": Path(config.model)}
    if config.tokenizer is not None:
        inputs["tokenizer"] = Path(config.tokenizer)
    return inputs


def _run_inputs(config: EvalConfig) -> dict[str, Path]:
    from eval.tasks import REGISTRY

    inputs = _model_inputs(config)
    for name in config.dataset_tasks:
        task, source = REGISTRY[name], config.source_for(name)
        splits = ["test"] if config.split == "test" or "train" not in source.files else []
        if "train" in source.files and (config.shots_for(name) > 0 or config.split == "dev"):
            splits.append("train")
        for split in splits:
            pattern = source.files[split]
            hint = DOWNLOAD_FIRST if task.folder == "jglue" else f"set task_files.{name}.{split}"
            if split == "train":
                hint += f", or set task_shots.{name}=0"
            if any(char in pattern for char in "*?["):
                for index, path in enumerate(source.paths(task, split)):
                    inputs[f"{split} file {index} of {name}"] = path
            else:
                inputs[f"{split} file of {name}: {hint}"] = source.folder / pattern
    for index, path in enumerate(config.bpc.texts if "bpc" in config.tasks else []):
        inputs[f"bpc.texts.{index}"] = Path(path)
    return inputs


def _report_frame(config: EvalConfig, run_dir: Path, model: dict[str, Any]) -> dict[str, Any]:
    """The parts of every report besides its results: model, settings, versions."""
    from eval.report import REPORT_KIND, REPORT_VERSION

    manifest = read_manifest(run_dir)
    hashed = manifest.inputs.get("model") if manifest else None
    subset = (
        f"first {config.limit}"
        if config.limit
        else f"{config.fraction:.0%} (seed {config.seed})"
        if config.fraction
        else "all"
    )
    return {
        "kind": REPORT_KIND,
        "version": REPORT_VERSION,
        "label": config.run.name,
        "created_at": now_iso(),
        "model": {**model, "sha256": hashed.sha256 if hashed else None},
        "settings": {
            "split": config.split,
            "seed": config.seed,
            "subset": subset,
            "shots": {name: config.shots_for(name) for name in config.dataset_tasks},
            "device": config.device,
            "dtype": config.dtype,
            "device_map": config.device_map,
        },
        "versions": package_versions(TRACKED),
        "git": git_state(),
    }


def _log_wandb(config: EvalConfig, report: dict[str, Any], context: StageContext) -> None:
    if config.wandb.enabled:
        from eval.report import log_to_wandb

        report["wandb_run_id"] = log_to_wandb(
            report, config.wandb, context.run_dir, config.run.name
        )


def run_step(context: StageContext[EvalConfig]) -> dict[str, Any]:
    """JGLUE tasks in each scoring mode, and bits per character: report.json and report.md."""
    from eval.categories import category_scores
    from eval.model import load_model
    from eval.report import write_report
    from eval.suite import run_suite

    config = context.config
    loaded = load_model(config, context.logger)
    results = run_suite(config, loaded, context.run_dir, context.logger)
    report = _report_frame(config, context.run_dir, loaded.info)
    report["settings"].update(max_length=loaded.max_length, placement=loaded.placement.summary())
    report["results"] = results
    report["llm_jp_eval"] = category_scores(results)
    _log_wandb(config, report, context)
    write_report(context.run_dir, report)
    return {
        "scores": {f"{r['task']}/{r['scoring']}": r["metrics"] for r in results},
        "skipped": [r["task"] for r in results if r.get("skipped")],
        "report": "report.json",
    }


def mt_bench_step(context: StageContext[EvalConfig]) -> dict[str, Any]:
    """The model's answers to Japanese MT-Bench, appended to answers.jsonl as they are made."""
    from eval.model import load_model
    from eval.mt_bench import generate_answers, read_questions

    config = context.config
    # Read first: a bad question file is one line before minutes of loading the model.
    questions = read_questions(_set(config.mt_bench.questions, "mt_bench.questions"))
    loaded = load_model(config, context.logger)
    summary = generate_answers(loaded, config, questions, context.run_dir, context.logger)
    summary["placement"] = loaded.placement.summary()
    return summary


def _answers(config: EvalConfig) -> Path:
    from eval.mt_bench import ANSWERS

    return (
        Path(config.judge.answers)
        if config.judge.answers
        else step_dir(config, "mt-bench") / ANSWERS
    )


def _check_sampling(config: EvalConfig) -> None:
    from eval.mt_bench import check_sampling

    check_sampling(config)


def judge_step(context: StageContext[EvalConfig]) -> dict[str, Any]:
    """Judge the answers through the endpoint; judgments.jsonl, then report.json and report.md."""
    from eval.mt_bench import judge_pin, run_judge
    from eval.report import write_report

    config = context.config
    summary = run_judge(config, _answers(config), context.run_dir, context.logger)
    model = {"path": str(config.model) if config.model else None, "answers": str(_answers(config))}
    report = _report_frame(config, context.run_dir, model)
    report["settings"].update(
        judge=config.judge.model_dump(mode="json"), samples=config.mt_bench.samples
    )
    pin = judge_pin(config)
    # The endpoint's own name for the model that answered: an alias such as gpt-4 moves over time.
    report["judge"] = {**pin, "served_models": summary.pop("served_models")}
    rows = [("mt_bench", summary["overall"])] + [
        (f"mt_bench/{category}", figures) for category, figures in summary["categories"].items()
    ]
    report["results"] = [
        {
            "task": task,
            "scoring": "judge",
            "split": Path(str(config.mt_bench.questions)).name,
            "examples": figures["judged"],
            "of": summary["judgments"],
            "shots": 0,
            "prompt_version": pin["prompt_version"],
            "metrics": {k: v for k, v in figures.items() if k != "judged"},
        }
        for task, figures in rows
    ]
    report["judging"] = {k: v for k, v in summary.items() if k not in ("overall", "categories")}
    _log_wandb(config, report, context)
    write_report(context.run_dir, report)
    if summary["failed"]:
        error = KinoeError(
            f"{summary['failed']} judgments failed ({summary['failures'][0]}); "
            "run the same command again to judge the rest"
        )
        error.summary = summary
        raise error
    return summary


STEPS: dict[str, Stage] = {
    "run": Stage(
        "eval",
        EvalConfig,
        run_step,
        inputs=_run_inputs,
        step="run",
        fingerprint_sections=frozenset(
            {
                "model",
                "tokenizer",
                "device",
                "dtype",
                "device_map",
                "tasks",
                "scoring",
                "split",
                "limit",
                "fraction",
                "shots",
                "task_shots",
                "seed",
                "jglue_dir",
                "data_dir",
                "task_files",
                "task_max_new_tokens",
                "max_length",
                "bpc",
            }
        ),
    ),
    "mt-bench": Stage(
        "eval",
        EvalConfig,
        mt_bench_step,
        inputs=lambda c: {
            **_model_inputs(c),
            "mt_bench.questions": _set(c.mt_bench.questions, "mt_bench.questions"),
        },
        precheck=_check_sampling,
        step="mt-bench",
        fingerprint_sections=frozenset(
            {
                "model",
                "tokenizer",
                "device",
                "dtype",
                "device_map",
                "seed",
                "max_length",
                "mt_bench",
            }
        ),
    ),
    "judge": Stage(
        "eval",
        EvalConfig,
        judge_step,
        inputs=lambda c: {
            ("judge.answers" if c.judge.answers else MT_BENCH_FIRST): _answers(c),
            "mt_bench.questions": _set(c.mt_bench.questions, "mt_bench.questions"),
            "judge.prompts": _set(c.judge.prompts, "judge.prompts"),
            **({"judge.references": Path(c.judge.references)} if c.judge.references else {}),
        },
        step="judge",
        fingerprint_sections=frozenset({"mt_bench", "judge"}),
    ),
}


def _set(path: Path | None, key: str) -> Path:
    if path is None:
        raise KinoeError(f"{key} is not set; point it at the Japanese MT-Bench file")
    return Path(path)


def _shortcuts(args: argparse.Namespace) -> list[str]:
    """Overrides from the convenience flags, applied after the key=value ones."""
    overrides = []
    if getattr(args, "tasks", None):
        overrides.append(f"tasks=[{args.tasks}]")
    if getattr(args, "limit", None) is not None:
        overrides += [f"limit={args.limit}", "fraction=null"]
    if getattr(args, "fraction", None) is not None:
        overrides += [f"fraction={args.fraction}", "limit=null"]
    if getattr(args, "batch_size", None) is not None:
        overrides.append(f"batch_size={args.batch_size}")
    if getattr(args, "allow_offload", False):
        overrides.append("allow_offload=true")
    return overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "e.g. kinoe eval run -c CONFIG model=<HF model dir> --tasks jcommonsenseqa --limit 100; "
        "kinoe eval mt-bench -c CONFIG model=<dir>; kinoe eval compare a/report.json b/report.json. "
        "Docs: docs/eval.md"
    )
    steps, parsers = add_step_arguments(
        parser,
        {
            "run": "JGLUE tasks (log-likelihood and llm-jp-eval generation) and bits per character",
            "mt-bench": "answer Japanese MT-Bench with the model's chat template, then judge if an endpoint is set",
            "judge": "judge MT-Bench answers through an OpenAI-compatible endpoint (resumes)",
        },
    )
    for name, sub in parsers.items():
        if name == "judge":
            continue
        if name == "run":
            sub.add_argument("--tasks", help="comma-separated tasks, e.g. jcommonsenseqa,jnli,bpc")
            sub.add_argument("--limit", type=int, help="the first N examples of each task")
            sub.add_argument("--fraction", type=float, help="a seeded share of each task, e.g. 0.1")
        sub.add_argument("--batch-size", help="prompts per forward pass, or auto (fit to memory)")
        sub.add_argument(
            "--allow-offload",
            action="store_true",
            help="run (with a loud warning) even when parts of the model sit on CPU or disk",
        )
    compare = steps.add_parser(
        "compare",
        help="two or more eval reports side by side",
        description="Print a Markdown table of two or more report.json files, one column each.",
    )
    compare.add_argument(
        "reports", nargs="+", type=Path, help="report.json files (or run directories)"
    )
    compare.add_argument("--out", type=Path, help="also write the table to this file")
    download = steps.add_parser(
        "download",
        help="fetch the JGLUE files at the pinned tag, checking their SHA-256",
        description="Fetch JGLUE v1.3.0 files into a folder for jglue_dir, verifying each SHA-256.",
    )
    download.add_argument("--to", type=Path, required=True, help="folder to write them to")
    download.add_argument(
        "files", nargs="*", help="file names (default: all), e.g. jnli-train.json"
    )


def main(args: argparse.Namespace) -> int:
    if args.step == "compare":
        from eval.report import compare

        table = compare(args.reports)
        if args.out:
            args.out.write_text(table, encoding="utf-8")
        sys.stdout.write(table)
        return 0
    if args.step == "download":
        from eval.data import download_jglue

        for name, record in download_jglue(args.to, args.files or None).items():
            pinned = "pinned" if record["pinned"] else "NOT PINNED"
            print(f"{name}  sha256 {record['sha256']}  {pinned}")
        return 0
    config = load_stage_config(EvalConfig, args.config, [*args.overrides, *_shortcuts(args)])
    command = ["kinoe", *sys.argv[1:]]
    run_stage(STEPS[args.step], config, force=args.force, command=command)
    if args.step == "mt-bench" and (config.judge_endpoint.base_url or _environment_base_url()):
        run_stage(STEPS["judge"], config, force=args.force, command=command)
    return 0


def _environment_base_url() -> str | None:
    import os

    return os.environ.get("OPENAI_BASE_URL")
