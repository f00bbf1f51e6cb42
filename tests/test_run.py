"""The stage runner: run directories, manifests, skip on rerun, --force, failures, locks and secrets."""

from __future__ import annotations

import gzip
import hashlib
import json
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import Config
from common.errors import ConfigError, KinoeError
from common.manifest import FileRecord, hash_tree, read_manifest
from common.progress import track
from common.run import (
    BOOKKEEPING,
    Stage,
    StageConfig,
    StageContext,
    decide,
    load_stage_config,
    run_stage,
)

from conftest import REPO


class CountConfig(StageConfig):
    documents: Path
    min_chars: int = 1
    label: str = ""


calls: list[str] = []


def count_characters(context: StageContext[CountConfig]) -> dict:
    """A small real stage: per-document character counts of a JSONL.gz file of documents."""
    calls.append(context.config.run.name)
    kept = []
    with gzip.open(context.inputs["documents"], "rt", encoding="utf-8") as handle:
        lines = handle.readlines()
    for line in track(lines, "count", unit="docs", log_every_s=0.001):
        document = json.loads(line)
        if len(document["text"]) >= context.config.min_chars:
            kept.append((document["id"], len(document["text"])))
    context.logger.info("counted %d documents for %s", len(kept), context.config.label)
    out = context.run_dir / "lengths"
    out.mkdir(exist_ok=True)
    (out / "lengths.tsv").write_text("".join(f"{i}\t{n}\n" for i, n in kept), encoding="utf-8")
    (context.run_dir / "total.json").write_text(json.dumps({"documents": len(kept)}))
    return {"documents": len(kept), "characters": sum(n for _, n in kept)}


COUNT = Stage("count", CountConfig, count_characters, inputs=lambda c: {"documents": c.documents})


@pytest.fixture
def corpus(shared_data, tmp_path) -> Path:
    """A private copy of the real Wikipedia leads, so tests may change it."""
    path = tmp_path / "wiki.jsonl.gz"
    shutil.copy(shared_data / "corpus" / "wikipedia_ja_leads.jsonl.gz", path)
    return path


@pytest.fixture
def config_file(tmp_path, corpus) -> Path:
    path = tmp_path / "leads.yaml"
    path.write_text(f"documents: {corpus}\nmin_chars: 20\nrun:\n  root: {tmp_path / 'runs'}\n")
    return path


def test_run_writes_manifest_whose_output_hashes_match(config_file, tmp_path):
    config = load_stage_config(CountConfig, config_file)
    result = run_stage(COUNT, config)
    assert result.status == "complete"
    run_dir = tmp_path / "runs" / "count" / "leads"
    assert result.run_dir == run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stage"] == "count" and manifest["status"] == "complete"
    assert manifest["config"]["min_chars"] == 20
    with gzip.open(config.documents, "rt", encoding="utf-8") as handle:
        lengths = [len(json.loads(line)["text"]) for line in handle]
    assert len(lengths) == 2022  # the real article leads, see ../shared/data/SOURCES.md
    assert manifest["summary"]["documents"] == sum(n >= 20 for n in lengths)
    assert manifest["versions"]["torch"].startswith("2.13.0") and manifest["versions"]["python"]
    assert manifest["host"]["hostname"] and manifest["started_at"] and manifest["finished_at"]
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode == 0:
        assert manifest["git"]["commit"] == head.stdout.strip()
        assert isinstance(manifest["git"]["dirty"], bool)
    outputs = {f["path"]: f for f in manifest["outputs"]["files"]}
    assert set(outputs) == {"lengths/lengths.tsv", "total.json"}
    for relative, record in outputs.items():
        data = (run_dir / relative).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["bytes"] == len(data)
    source = manifest["inputs"]["documents"]["files"][0]
    assert source["sha256"] == hashlib.sha256(Path(config.documents).read_bytes()).hexdigest()
    assert (run_dir / "config.yaml").read_text().startswith("run:")
    log = (run_dir / "logs" / "count.log").read_text()
    assert "counted" in log and "docs/s" in log and "ETA" in log


def test_rerun_with_same_inputs_is_skipped_and_force_redoes_it(config_file, tmp_path):
    calls.clear()
    first = run_stage(COUNT, load_stage_config(CountConfig, config_file))
    again = run_stage(COUNT, load_stage_config(CountConfig, config_file))
    assert again.status == "skipped" and calls == ["leads"]
    assert again.manifest.started_at == first.manifest.started_at
    stale = first.run_dir / "stale.txt"
    stale.write_text("left from an earlier run")
    forced = run_stage(COUNT, load_stage_config(CountConfig, config_file), force=True)
    assert forced.status == "complete" and calls == ["leads", "leads"]
    assert not stale.exists()
    assert forced.manifest.outputs.sha256 == first.manifest.outputs.sha256


def test_changed_config_is_refused_with_the_changed_key(config_file):
    run_stage(COUNT, load_stage_config(CountConfig, config_file))
    with pytest.raises(KinoeError, match=r"changed: min_chars\).*--force"):
        run_stage(COUNT, load_stage_config(CountConfig, config_file, ["min_chars=50"]))
    other = run_stage(
        COUNT, load_stage_config(CountConfig, config_file, ["min_chars=50", "run.name=long"])
    )
    assert other.status == "complete" and other.run_dir.name == "long"


class GlobSource(Config):
    glob: str


class GlobConfig(StageConfig):
    sources: list[GlobSource]


def test_a_changed_key_inside_a_list_is_named_exactly(tmp_path):
    stage = Stage("globs", GlobConfig, lambda context: {})
    run = {"root": str(tmp_path / "runs"), "name": "g"}
    first = {"run": run, "sources": [{"glob": "a/*.jsonl"}, {"glob": "b/*.jsonl"}]}
    run_stage(stage, GlobConfig.model_validate(first))
    changed = {**first, "sources": [{"glob": "a/*.jsonl.gz"}, {"glob": "b/*.jsonl"}]}
    with pytest.raises(KinoeError, match=r"\(changed: sources\.0\.glob\)"):
        run_stage(stage, GlobConfig.model_validate(changed))


class Spread(Config):
    ranks: int = 1  # how the work is spread: excluded from the fingerprint below
    width: int = 1


class SpreadConfig(StageConfig):
    fingerprint_exclude = frozenset({"run", "layout.ranks"})

    layout: Spread = Spread()


def test_a_setting_excluded_by_section_and_key_may_change_and_others_may_not(tmp_path):
    stage = Stage("spread", SpreadConfig, lambda context: {})
    run = {"root": str(tmp_path / "runs"), "name": "s"}
    run_stage(stage, SpreadConfig.model_validate({"run": run, "layout": {"ranks": 2}}))
    again = SpreadConfig.model_validate({"run": run, "layout": {"ranks": 4}})
    assert run_stage(stage, again).status == "skipped"
    assert decide(stage, again, hash_inputs=False).action == "run"
    wider = SpreadConfig.model_validate({"run": run, "layout": {"ranks": 4, "width": 3}})
    with pytest.raises(KinoeError, match=r"\(changed: layout\.width\)"):
        run_stage(stage, wider)
    assert decide(stage, wider, hash_inputs=False).action == "refuse"


def test_changed_input_content_is_refused(config_file, corpus):
    run_stage(COUNT, load_stage_config(CountConfig, config_file))
    with gzip.open(corpus, "at", encoding="utf-8") as handle:
        handle.write(
            json.dumps({"id": "new", "text": "追加された記事の本文です。", "source": "test"}) + "\n"
        )
    with pytest.raises(KinoeError, match="changed: input documents"):
        run_stage(COUNT, load_stage_config(CountConfig, config_file))


def test_missing_input_names_the_config_key(config_file, corpus):
    corpus.unlink()
    with pytest.raises(KinoeError, match=r"input documents = .* does not exist; fix documents"):
        run_stage(COUNT, load_stage_config(CountConfig, config_file))


def test_failed_run_is_recorded_and_rerun(config_file, tmp_path):
    def broken(context):
        raise RuntimeError("disk on fire")

    failing = Stage("count", CountConfig, broken, inputs=COUNT.inputs)
    with pytest.raises(RuntimeError):
        run_stage(failing, load_stage_config(CountConfig, config_file))
    manifest = read_manifest(tmp_path / "runs" / "count" / "leads")
    assert manifest.status == "failed" and manifest.error == "RuntimeError: disk on fire"
    assert manifest.outputs is None
    assert run_stage(COUNT, load_stage_config(CountConfig, config_file)).status == "complete"


def test_a_killed_runs_manifest_reads_failed_on_the_next_start(config_file, tmp_path):
    config = load_stage_config(CountConfig, config_file)
    run_stage(COUNT, config)
    path = tmp_path / "runs" / "count" / "leads" / "manifest.json"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    killed = json.loads(path.read_text())
    killed["status"] = "running"
    killed["host"]["pid"] = int(dead.stdout)  # a process that has ended, as a killed one has
    path.write_text(json.dumps(killed))
    decide(COUNT, config)
    manifest = read_manifest(path.parent)
    assert manifest.status == "failed" and "ended without recording an end" in manifest.error


def test_secrets_never_reach_manifest_config_or_log(config_file, tmp_path, monkeypatch):
    key = secrets.token_hex(20)
    monkeypatch.setenv("WANDB_API_KEY", key)
    # Webhook URLs are credentials whatever the name; other URLs when they carry one.
    webhook = f"https://hooks.slack.com/services/T0/B0/{secrets.token_hex(12)}"
    monkeypatch.setenv("SLACK_WEBHOOK_URL", webhook)
    tracker = f"https://ci:{secrets.token_hex(8)}@tracker.example.org/api"
    monkeypatch.setenv("TRACKER_URL", tracker)
    monkeypatch.setenv("DOCS_URL", "https://docs.example.org/kinoe")  # no credential: kept
    # A user pasting the key into a config value is the worst case the runner must survive.
    label = f"label={key} {webhook} {tracker} https://docs.example.org/kinoe"
    result = run_stage(COUNT, load_stage_config(CountConfig, config_file, [label]))
    written = [p for p in result.run_dir.rglob("*") if p.is_file()]
    assert {"manifest.json", "config.yaml", "count.log"} <= {p.name for p in written}
    for path in written:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert key not in text and webhook not in text and tracker not in text, path
    manifest = (result.run_dir / "manifest.json").read_text()
    assert "<redacted:WANDB_API_KEY>" in manifest and "<redacted:SLACK_WEBHOOK_URL>" in manifest
    assert "<redacted:TRACKER_URL>" in manifest and "https://docs.example.org/kinoe" in manifest


@pytest.mark.parametrize("declared", [True, False])
def test_secret_variables_are_redacted_whatever_their_name(declared, tmp_path, monkeypatch, capsys):
    """A variable no name pattern catches is a secret once run.secret_variables lists it."""
    from launch.cli import main

    value = secrets.token_hex(12)
    monkeypatch.setenv("TEAM_BUCKET_SUFFIX", value)
    # The value inside a path: the error line, the manifest, config.yaml and the log name it.
    bucket = tmp_path / f"bucket-{value}"
    documents = bucket / "documents"
    documents.mkdir(parents=True)
    config = tmp_path / "tok.yaml"
    listed = ["TEAM_BUCKET_SUFFIX"] if declared else []
    config.write_text(
        f"run: {{root: {bucket / 'runs'}, secret_variables: {listed}}}\n"
        f"sample: {{documents: {documents}}}\n"
    )
    assert main(["tokenizer", "train", "-c", str(config)]) == 1
    stderr = capsys.readouterr().err
    [line] = [line for line in stderr.splitlines() if "error:" in line]
    run_dir = bucket / "runs" / "tokenizer" / "tok" / "train"
    written = {
        "console": line,
        "manifest": (run_dir / "manifest.json").read_text(),
        "config.yaml": (run_dir / "config.yaml").read_text(),
        "log": (run_dir / "logs" / "tokenizer.log").read_text(),
    }
    assert "no documents" in line and "no documents" in written["manifest"]
    for where, text in written.items():
        if declared:
            assert value not in text and "<redacted:TEAM_BUCKET_SUFFIX>" in text, where
        else:
            assert value in text, where  # no pattern catches the name: only the list does


def test_secret_variables_take_names_not_values(config_file):
    pasted = "sk-" + secrets.token_hex(16)  # a key pasted where its variable's name belongs
    with pytest.raises(ConfigError) as refused:
        load_stage_config(CountConfig, config_file, [f"run.secret_variables=[{pasted}]"])
    assert "never their values" in str(refused.value) and pasted not in str(refused.value)


def test_concurrent_run_of_same_directory_is_refused(config_file, tmp_path):
    run_dir = tmp_path / "runs" / "count" / "leads"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KinoeError, match="another kinoe process is writing"):
            run_stage(COUNT, load_stage_config(CountConfig, config_file))
    finally:
        holder.kill()
        holder.wait()


HOLD_LOCK = """
import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.lockf(handle, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""

# A stage whose process forks a long-lived child (as DataLoader workers are) and then dies.
CRASH_WITH_CHILD = """
import os, sys, time
sys.path.insert(0, sys.argv[2])
from common.run import Stage, StageConfig, run_stage

def body(context):
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    os._exit(1)

class Config(StageConfig):
    pass

config = Config.model_validate({"run": {"root": sys.argv[1], "name": "orphan"}})
run_stage(Stage("orphans", Config, body), config)
"""


def test_orphaned_children_of_a_crashed_run_do_not_keep_it_locked(tmp_path):
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_WITH_CHILD, str(tmp_path), str(REPO)], timeout=60
    )
    assert crashed.returncode == 1
    children = subprocess.run(
        ["pgrep", "-f", "CRASH_WITH_CHILD|time.sleep"], capture_output=True, text=True
    ).stdout.split()
    try:
        # The forked child is still alive, yet the restart takes the run directory.
        class Config(StageConfig):
            pass

        config = Config.model_validate({"run": {"root": str(tmp_path), "name": "orphan"}})
        result = run_stage(Stage("orphans", Config, lambda context: {"restarted": True}), config)
        assert result.status == "complete"
    finally:
        for pid in children:
            subprocess.run(["kill", pid], check=False)


def test_bookkeeping_is_not_counted_as_output(config_file):
    result = run_stage(COUNT, load_stage_config(CountConfig, config_file))
    names = {Path(f.path).parts[0] for f in result.manifest.outputs.files}
    assert not names & set(BOOKKEEPING)


def test_hash_tree_reuses_hashes_only_for_unchanged_files(tmp_path):
    data = tmp_path / "tree"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("いろはにほへと")
    (data / "sub" / "b.txt").write_text("ちりぬるを")
    fresh = hash_tree(data)
    assert [f.path for f in fresh.files] == ["a.txt", "sub/b.txt"]
    # A recorded hash is trusted while size and mtime are unchanged (no reread) ...
    planted = [
        f.model_copy(update={"sha256": "0" * 64}) if f.path == "a.txt" else f for f in fresh.files
    ]
    assert hash_tree(data, known=planted).files[0].sha256 == "0" * 64
    # ... and recomputed as soon as either changes.
    (data / "a.txt").write_text("いろはにほへと。")
    recomputed = hash_tree(data, known=planted).files[0]
    assert recomputed.sha256 == hashlib.sha256("いろはにほへと。".encode()).hexdigest()
    assert isinstance(recomputed, FileRecord)
    assert hash_tree(data).sha256 != fresh.sha256


def test_precheck_refusal_leaves_the_run_directory_as_it_was(config_file):
    first = run_stage(COUNT, load_stage_config(CountConfig, config_file))

    def refuse(config):
        raise KinoeError("count: the scheduler is down")

    guarded = Stage("count", CountConfig, count_characters, inputs=COUNT.inputs, precheck=refuse)
    before = (first.run_dir / "manifest.json").read_bytes()
    with pytest.raises(KinoeError, match="scheduler is down"):
        run_stage(guarded, load_stage_config(CountConfig, config_file), force=True)
    assert (first.run_dir / "manifest.json").read_bytes() == before
    assert (first.run_dir / "total.json").exists()


def test_inputs_inside_an_earlier_run_reuse_its_recorded_hashes(config_file, tmp_path):
    """A stage reading another run's outputs trusts that run's manifest for unchanged files."""
    upstream = run_stage(COUNT, load_stage_config(CountConfig, config_file))
    manifest_path = upstream.run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # Plant a recognisable hash for one unchanged output file: if it comes back, nothing reread it.
    for record in manifest["outputs"]["files"]:
        if record["path"] == "lengths/lengths.tsv":
            record["sha256"] = "f" * 64
    manifest_path.write_text(json.dumps(manifest))

    downstream_config = tmp_path / "downstream.yaml"
    downstream_config.write_text(
        f"documents: {upstream.run_dir / 'lengths'}\nrun:\n  root: {tmp_path / 'runs2'}\n"
    )

    def inputs_of(context):
        return {"files": len(context.inputs)}

    reader = Stage("reader", CountConfig, inputs_of, inputs=lambda c: {"documents": c.documents})
    result = run_stage(reader, load_stage_config(CountConfig, downstream_config))
    (record,) = result.manifest.inputs["documents"].files
    assert record.path == "lengths.tsv" and record.sha256 == "f" * 64
    # Once the file changes, its real hash is computed.
    (upstream.run_dir / "lengths" / "lengths.tsv").write_text("変更\t1\n")
    changed = run_stage(reader, load_stage_config(CountConfig, downstream_config), force=True)
    assert (
        changed.manifest.inputs["documents"].files[0].sha256
        == hashlib.sha256("変更\t1\n".encode()).hexdigest()
    )
