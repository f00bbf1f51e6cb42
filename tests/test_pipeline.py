"""kinoe pipeline: config errors in one line, the plan (--dry-run), local runs that skip complete
steps without starting a process and stop at the first failure, and dependent jobs on a real
local SLURM cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.manifest import Manifest, read_manifest, write_manifest
from launch.cli import main as kinoe
from launch.jobs import wait_for_run

REPO = Path(__file__).resolve().parent.parent
DATA_CONFIG = str(REPO / "configs" / "data" / "quickstart.yaml")
TOKENIZER_CONFIG = str(REPO / "configs" / "tokenizer" / "quickstart.yaml")


def write_pipeline(folder: Path, steps: list[dict], **fields) -> Path:
    """A pipeline config whose runs (its own and its steps') all go under ``folder/runs``."""
    root = folder / "runs"
    data = {"run": {"root": str(root)}, "variables": {"root": str(root)}, "steps": steps, **fields}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def data_step(name: str = "data", **fields) -> dict:
    """kinoe data on the bundled quickstart corpus."""
    return {
        "name": name,
        "command": "data",
        "config": DATA_CONFIG,
        "overrides": ["run.root=${root}"],
        **fields,
    }


def tokenizer_step(name: str, command: str = "tokenizer train", *overrides: str, **fields) -> dict:
    """A tokenizer step on the documents data_step writes."""
    return {
        "name": name,
        "command": command,
        "config": TOKENIZER_CONFIG,
        "overrides": [
            "run.root=${root}",
            "sample.documents=${root}/data/quickstart/documents",
            *overrides,
        ],
        **fields,
    }


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------- refused before anything runs


@pytest.mark.parametrize(
    ("steps", "arguments", "code", "message"),
    [
        (
            [data_step(), tokenizer_step("tok", "tokenizr train")],
            [],
            2,
            "steps.1 (tok): 'tokenizr train' is not a kinoe command",
        ),
        (
            [data_step(), tokenizer_step("doc", "doctor")],
            [],
            2,
            "steps.1 (doc): 'kinoe doctor' is not a stage with a run directory",
        ),
        (
            [data_step(config="configs/data/nope.yaml")],
            [],
            2,
            "steps.0 (data): config file configs/data/nope.yaml not found",
        ),
        (
            [data_step(), data_step()],
            [],
            2,
            "steps.1 (data): the name 'data' is already used by steps.0",
        ),
        (
            [data_step(overrides=["run.root=${rooot}"])],
            [],
            2,
            "steps.0 (data).overrides: ${rooot} is not defined; add it to variables "
            "(or pass variables.rooot=<value>); defined: root",
        ),
        (
            [data_step(), tokenizer_step("tok", "tokenizer train", "trainer.vocab=8")],
            [],
            2,
            "step tok: config error in " + TOKENIZER_CONFIG + ": unknown key 'trainer.vocab'",
        ),
        (
            [data_step(slurm={"time": "one day"})],
            [],
            2,
            "in 'steps.0.slurm.time': time 'one day' is not a SLURM time limit",
        ),
        (
            [data_step(slurm={"signal_seconds": 1800})],
            ["slurm.time='30'"],
            2,
            "steps.0 (data): its job (slurm over the step's slurm): signal_seconds (1800) must be "
            "less than the time limit 30 (1800 s)",
        ),
        (
            [data_step(), tokenizer_step("tok"), tokenizer_step("again")],
            [],
            2,
            "steps tok and again both write ",
        ),
        (
            [data_step(), tokenizer_step("tok")],
            ["--from", "tokenizer"],
            1,
            "--from 'tokenizer' is not a step of this pipeline; its steps: data, tok",
        ),
        (
            [data_step(), tokenizer_step("tok")],
            ["--from", "tok", "--to", "data"],
            1,
            "--from tok comes after --to data in this pipeline; swap them",
        ),
        (
            [
                data_step(
                    overrides=[
                        "run.root=${root}",
                        "executor.kind=slurm",
                        "executor.slurm.partition=x",
                    ]
                )
            ],
            [],
            1,
            "step data: its config submits SLURM array jobs (executor.kind: slurm), which a local "
            "pipeline cannot wait for",
        ),
        (
            [data_step(), tokenizer_step("tok", "tokenizer export")],
            ["--from", "tok"],
            1,
            "step tok: tokenizer export: ",  # its input is made by a step left out
        ),
    ],
)
def test_bad_pipelines_are_refused_in_one_line_before_anything_runs(
    tmp_path, monkeypatch, capsys, steps, arguments, code, message
):
    monkeypatch.chdir(REPO)  # config paths are relative to where kinoe runs
    path = write_pipeline(tmp_path, steps)

    assert kinoe(["pipeline", "-c", str(path), *arguments]) == code

    line = one_error_line(capsys)
    assert line.startswith("kinoe pipeline: error: ")
    assert message in line, line
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written


# ---------------------------------------------------------------- the plan


def plan_lines(output: str) -> dict[str, str]:
    """Step name -> what the plan says about it, from --dry-run's output."""
    return dict(re.findall(r"^  (\S+)\s{2,}((?:run|skip|submit|REFUSE).*)$", output, re.M))


def test_quickstart_dry_run_plans_every_step_after_the_one_it_reads_from(
    tmp_path, monkeypatch, capsys
):
    # A checkout without runs/: the bundled configs and data, seen from an empty folder.
    for name in ("configs", "data_prep"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)

    assert kinoe(["pipeline", "-c", "configs/pipeline/quickstart.yaml", "--dry-run"]) == 0

    plan = plan_lines(capsys.readouterr().out)
    assert plan == {
        "data": "run (no run yet)",
        "tokenizer-train": "run (needs data)",
        "tokenizer-export": "run (needs tokenizer-train)",
        "tokenizer-report": "run (needs tokenizer-train, tokenizer-export)",
        "tokenizer-encode": "run (needs data, tokenizer-train)",
        "pretrain": "run (needs tokenizer-train, tokenizer-encode)",
        "convert": "run (needs tokenizer-export, pretrain)",
        "eval-base": "run (needs convert)",
        "finetune-jaster": "run (no run yet)",  # reads only the bundled JGLUE sample
        "finetune-sft": "run (needs convert, finetune-jaster)",
        "finetune-dpo": "run (needs finetune-sft)",
        "eval-sft": "run (needs finetune-sft)",
    }
    assert not (tmp_path / "runs").exists()


def test_cluster_dry_run_submits_each_step_through_its_script(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    # The reference tokenizers the tokenizer config compares against live on the cluster.
    here = [
        f'steps.{i}.overrides=["run.root=${{runs}}", "report.references={{}}"]'
        for i in (1, 2, 3, 4)
    ]
    assert kinoe(["pipeline", "-c", "configs/pipeline/cluster.yaml", *here, "--dry-run"]) == 0
    output = capsys.readouterr().out
    plan = plan_lines(output)
    assert plan["data"].startswith("submit stage.sbatch (1 node(s), GPUs per node 0")
    assert plan["tokenizer-train"].startswith("submit stage.sbatch")
    assert plan["tokenizer-train"].endswith("after data; needs data)")
    assert plan["pretrain"].startswith("submit train.sbatch (4 node(s), GPUs per node 8")
    assert plan["convert"].startswith("submit stage.sbatch")
    assert plan["eval"].startswith("submit eval.sbatch (1 node(s), GPUs per node 1")
    assert "$ kinoe eval run -c configs/eval/jglue.yaml" in output
    # --to: a part; --from a step whose input no step of the part makes: refused up front.
    assert (
        kinoe(
            [
                "pipeline",
                "-c",
                "configs/pipeline/cluster.yaml",
                *here,
                "--to",
                "tokenizer-train",
                "--dry-run",
            ]
        )
        == 0
    )
    assert list(plan_lines(capsys.readouterr().out)) == ["data", "tokenizer-train"]
    assert (
        kinoe(
            [
                "pipeline",
                "-c",
                "configs/pipeline/cluster.yaml",
                *here,
                "--from",
                "convert",
                "--dry-run",
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert plan_lines(captured.out)["convert"].startswith("REFUSE: convert to-hf: ")
    assert captured.err.startswith("kinoe pipeline: error: step convert: convert to-hf: ")
    assert "(no earlier step here makes it)" in captured.err


@pytest.mark.parametrize(
    ("pipeline", "recipe", "nodes"),
    [("cluster_mistral_7b", "mistral_7b_ja", 4), ("cluster_mixtral_8x7b", "mixtral_8x7b_ja", 8)],
)
def test_recipe_pipelines_dry_run_show_their_slurm_jobs(
    pipeline, recipe, nodes, monkeypatch, capsys
):
    """The 7B and 8x7B recipes' pipelines plan every job, pretraining on the recipe's nodes."""
    monkeypatch.chdir(REPO)
    here = [
        f'steps.{i}.overrides=["run.root=${{runs}}", "report.references={{}}"]'
        for i in (1, 2, 3, 4)
    ]
    config = f"configs/pipeline/{pipeline}.yaml"
    assert kinoe(["pipeline", "-c", config, *here, "--dry-run"]) == 0
    output = capsys.readouterr().out
    plan = plan_lines(output)
    assert list(plan) == [
        "data",
        "tokenizer-train",
        "tokenizer-export",
        "tokenizer-report",
        "tokenizer-encode",
        "pretrain",
        "convert",
        "eval",
    ]
    assert plan["pretrain"].startswith(f"submit train.sbatch ({nodes} node(s), GPUs per node 8")
    assert plan["pretrain"].endswith("needs tokenizer-train, tokenizer-encode)")
    assert plan["convert"].endswith("after pretrain; needs tokenizer-export, pretrain)")
    assert plan["eval"].startswith("submit eval.sbatch (1 node(s), GPUs per node 1")
    assert f"$ kinoe pretrain -c configs/pretrain/{recipe}.yaml" in output
    assert f"model=/shared/kinoe/runs/convert/{recipe}/to-hf" in output


# ---------------------------------------------------------------- local mode


def summary_steps(run_root: Path) -> dict[str, dict]:
    return read_manifest(run_root / "pipeline" / "pipeline").summary["steps"]


@pytest.mark.slow
def test_local_pipeline_runs_in_order_skips_what_is_complete_and_stops_at_a_failure(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO)  # the data config's sources are relative to the checkout
    runs = tmp_path / "runs"
    path = write_pipeline(
        tmp_path,
        [
            data_step(),
            tokenizer_step("tokenizer"),
            # SentencePiece needs more pieces than 1,024 for this sample's characters: fails fast.
            tokenizer_step("bad", "tokenizer train", "run.name=bad", "trainer.vocab_size=1024"),
            tokenizer_step("after", "tokenizer export", "run.name=bad"),
        ],
    )

    # --to: the first two steps, one after the other.
    assert kinoe(["pipeline", "-c", str(path), "--to", "tokenizer"]) == 0
    output = capsys.readouterr()
    data = read_manifest(runs / "data" / "quickstart")
    tokenizer = read_manifest(runs / "tokenizer" / "quickstart" / "train")
    assert data.status == tokenizer.status == "complete"
    assert data.finished_at <= tokenizer.started_at
    assert not (runs / "tokenizer" / "bad").exists()
    assert {name: row["status"] for name, row in summary_steps(runs).items()} == {
        "data": "ran",
        "tokenizer": "ran",
    }
    # Their output streamed here and into the pipeline's logs; then where everything is.
    assert "data: 143 documents in" in output.out
    logs = runs / "pipeline" / "pipeline" / "logs"
    assert "data: 143 documents in" in (logs / "data.log").read_text()
    assert "tokenizer train: complete" in (logs / "tokenizer.log").read_text()
    where = output.out.split("Where everything is:")[1]
    assert f"data       {runs / 'data' / 'quickstart'}  documents/ removed/ report/" in where
    assert f"report: {runs / 'data' / 'quickstart' / 'report' / 'report.md'}" in where
    assert (
        f"{runs / 'tokenizer' / 'quickstart' / 'train'}  " in where and "tokenizer.model" in where
    )

    # Again: both complete, skipped without starting any kinoe process (git, for the manifest, may run).
    popen = subprocess.Popen

    def no_kinoe(argv, *args, **kwargs):
        assert "launch.cli" not in argv, f"a step was started: {argv}"
        return popen(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", no_kinoe)
    assert kinoe(["pipeline", "-c", str(path), "--to", "tokenizer"]) == 0
    assert capsys.readouterr().err.count("skipped (complete)") == 2
    assert {row["status"] for row in summary_steps(runs).values()} == {"skipped"}
    assert len(list((runs / "pipeline" / "pipeline" / "history").glob("*-complete.json"))) == 1
    monkeypatch.undo()
    monkeypatch.chdir(REPO)

    # --from: the failing step stops the pipeline with one line; the step after it never runs.
    assert kinoe(["pipeline", "-c", str(path), "--from", "bad"]) == 1
    captured = capsys.readouterr()
    error = [line for line in captured.err.splitlines() if "error:" in line]
    assert error[-1] == (
        f"kinoe pipeline: error: step bad (tokenizer train) failed with exit code 1; its output "
        f"is in {logs / 'bad.log'}; after fixing it run the step alone with `kinoe tokenizer "
        f"train -c {TOKENIZER_CONFIG} run.root={runs} sample.documents={runs}/data/quickstart/"
        "documents run.name=bad trainer.vocab_size=1024`, or the pipeline from there with --from bad"
    )
    assert "Vocabulary size is smaller than required_chars" in (logs / "bad.log").read_text()
    assert not (runs / "tokenizer" / "bad" / "export").exists()
    record = read_manifest(runs / "pipeline" / "pipeline")
    assert record.status == "failed" and "step bad" in record.error
    assert {name: row["status"] for name, row in record.summary["steps"].items()} == {
        "bad": "failed",
        "after": "pending",
    }


def fake_manifest(run_dir: Path, status: str, **summary) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(
        run_dir,
        Manifest(
            stage="data",
            status=status,
            run_dir=str(run_dir),
            fingerprint="0",
            config={},
            command=[],
            git={},
            versions={},
            host={},
            started_at="2026-01-01T00:00:00",
            summary=summary,
        ),
    )


def test_stage_job_waits_until_the_arrays_complete_the_run(tmp_path, capsys):
    run_dir = tmp_path / "data" / "quickstart"
    overrides = [f"run.root={tmp_path}"]
    fake_manifest(run_dir, "submitted", jobs=["11", "12"], note="")
    # What the arrays' jobs do meanwhile, one poll after another.
    events = iter(
        [
            lambda: None,
            lambda: fake_manifest(run_dir, "running"),  # the finishing job started
            lambda: fake_manifest(run_dir, "complete"),
        ]
    )
    polls = []

    def queued(jobs):
        polls.append(sorted(jobs))
        return {"12"}

    code = wait_for_run(
        "data", DATA_CONFIG, overrides, queued=queued, sleep=lambda s: next(events)()
    )
    assert code == 0
    assert polls == [["11", "12"]] * 3
    assert f"{run_dir} is complete" in capsys.readouterr().out

    # The jobs left the queue without completing the run (an array task failed and SLURM
    # cancelled the finishing job): fail after looking twice.
    fake_manifest(run_dir, "submitted", jobs=["11", "12"], note="")
    sleeps = []
    code = wait_for_run(
        "data", DATA_CONFIG, overrides, queued=lambda jobs: set(), sleep=sleeps.append
    )
    assert code == 1 and len(sleeps) == 1
    assert "left the queue without completing it (status submitted)" in capsys.readouterr().out

    fake_manifest(run_dir, "failed")
    assert (
        wait_for_run("data", DATA_CONFIG, overrides, queued=lambda jobs: set(), sleep=sleeps.append)
        == 1
    )


# ---------------------------------------------------------------- SLURM mode


@pytest.mark.slow
def test_slurm_pipeline_submits_dependent_jobs_that_complete_in_order(
    slurm_cluster, tmp_path, monkeypatch, capsys
):
    slurm_cluster.export_env(monkeypatch)
    # kinoe from this interpreter's environment, found by env.sh on PATH; appended, not
    # prepended (see tests/test_launch_slurm.py: .venv/bin's ninja makes DeepSpeed rebuild).
    monkeypatch.setenv("PATH", f"{os.environ['PATH']}:{Path(sys.executable).parent}")
    # Jobs start where they were submitted, where the configs' relative paths resolve.
    monkeypatch.chdir(REPO)
    runs = tmp_path / "runs"
    path = write_pipeline(
        tmp_path,
        [
            # Held until released below, so the second job's dependency is seen while it waits.
            data_step(slurm={"sbatch_args": {"hold": ""}}),
            tokenizer_step("tokenizer"),
        ],
        mode="slurm",
        slurm={"partition": "debug", "cpus_per_task": 1, "time": "10:00", "signal_seconds": 60},
    )

    assert kinoe(["pipeline", "-c", str(path)]) == 0
    output = capsys.readouterr().out
    record = read_manifest(runs / "pipeline" / "pipeline")
    assert record.status == "submitted"
    first, second = record.summary["jobs"]
    rows = record.summary["steps"]
    assert (rows["data"]["job"], rows["tokenizer"]["job"]) == (first, second)
    assert rows["tokenizer"]["after"] == first and rows["data"]["script"] == "stage.sbatch"
    log_dir = runs / "pipeline" / "pipeline" / "slurm"
    log = log_dir / f"kinoe-pipeline-tokenizer-{second}.out"
    assert re.search(rf"^  tokenizer\s+{second}\s+{re.escape(str(log))}$", output, re.M), output
    waiting = slurm_cluster.jobs(second)[0]
    assert waiting["Dependency"] == f"afterok:{first}(unfulfilled)", waiting
    assert waiting["JobState"] == "PENDING"

    # While its jobs are queued, running the pipeline again would run the steps twice.
    assert kinoe(["pipeline", "-c", str(path)]) == 1
    assert f"jobs {first}, {second} that the previous `kinoe pipeline`" in one_error_line(capsys)

    slurm_cluster.run("scontrol", "release", first)
    logs = {
        job: log_dir / f"kinoe-pipeline-{name}-{job}.out"
        for job, name in ((first, "data"), (second, "tokenizer"))
    }
    for job in (first, second):
        state = slurm_cluster.wait(job, timeout=180)
        assert state == "COMPLETED", logs[job].read_text() if logs[job].exists() else state
    ended = slurm_cluster.jobs(first)[0]["EndTime"]
    assert slurm_cluster.jobs(second)[0]["StartTime"] >= ended
    assert read_manifest(runs / "data" / "quickstart").status == "complete"
    assert read_manifest(runs / "tokenizer" / "quickstart" / "train").status == "complete"
    data_log = logs[first].read_text()
    assert "=== kinoe stage: job" in data_log and "data: complete in" in data_log
    assert f"kinoe stage: {runs / 'data' / 'quickstart'} is complete" in data_log

    # Everything complete: nothing is submitted again.
    assert kinoe(["pipeline", "-c", str(path)]) == 0
    rows = read_manifest(runs / "pipeline" / "pipeline").summary["steps"]
    assert {row["status"] for row in rows.values()} == {"skipped"}
