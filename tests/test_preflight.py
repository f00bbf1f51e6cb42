"""kinoe preflight: GO for a config that fits, NO-GO (with the fix named) for one that cannot.

CPU memory stands in for GPU memory: capacity is ``--memory-gb`` (or the RAM available), the
peak is the process's peak resident set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from common.manifest import read_manifest
from launch.cli import main as kinoe
from launch.memory_estimate import (
    GiB,
    activation_bytes,
    checkpoint_bytes,
    estimate_memory,
    memory_fixes,
    model_state_bytes,
)
from launch.preflight_disk import retained_checkpoints
from launch.preflight_measure import inspect_engine_placement, worst_case_batch
from pretrain.config import CheckpointConfig, PretrainConfig
from tokenizer.indexed import IndexedDatasetWriter, tokenizer_sha256, write_shard_set_metadata

REPO = Path(__file__).resolve().parent.parent
KINOE = Path(sys.executable).parent / "kinoe"
VOCAB = 2048
EOS = 2
# Web documents are long, conversations short: the pretrain phase holds the longest examples.
DOCUMENT_TOKENS = {"web": 300, "chat": 24}


def write_source(directory: Path, name: str, tokenizer: Path, documents: int, length: int) -> None:
    rng = np.random.default_rng(len(name))
    with IndexedDatasetWriter(directory / f"{name}_00", VOCAB) as writer:
        for _ in range(documents):
            ids = rng.integers(3, VOCAB, size=length - 1)
            writer.add_document(np.append(ids, EOS))
    write_shard_set_metadata(
        directory,
        source=name,
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        vocab_size=VOCAB,
        eos_id=EOS,
        shards=[{"prefix": f"{name}_00", "documents": writer.documents, "tokens": writer.tokens}],
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """Two small shard sets; preflight reads only the tokenizer's hash, so any file serves."""
    root = tmp_path_factory.mktemp("preflight_shards")
    tokenizer = root / "tokenizer.model"
    tokenizer.write_bytes(b"a stand-in tokenizer file: preflight hashes it, never loads it")
    sources = {}
    for name, length in DOCUMENT_TOKENS.items():
        sources[name] = root / name
        write_source(sources[name], name, tokenizer, documents=40, length=length)
    return {"tokenizer": tokenizer, "sources": sources}


def config_data(root: Path, shards: dict, **sections) -> dict:
    data = {
        "run": {"root": str(root / "runs"), "name": "plan"},
        "model": {"preset": "tiny"},
        "data": {
            "tokenizer": str(shards["tokenizer"]),
            "sources": {name: str(path) for name, path in shards["sources"].items()},
            "phases": [
                {"name": "pretrain", "start": 0.0, "mixture": {"web": 1.0}},
                {"name": "post_training_mix", "start": 0.8, "mixture": {"web": 1.0, "chat": 1.0}},
            ],
            "seq_len": 64,
        },
        "train": {"steps": 1000, "global_batch_size": 16, "micro_batch_size": 4},
        "engine": {"zero_stage": 2},
        "checkpoint": {"interval": 100, "keep_last": 2},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return data


def write_config(root: Path, shards: dict, **sections) -> Path:
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump(config_data(root, shards, **sections)))
    return path


def preflight(config: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``kinoe preflight -c config`` as users run it; the result and its report.json."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [str(KINOE), "preflight", "-c", str(config), *options],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=300,
    )
    report_path = config.parent / "runs" / "preflight" / "plan" / "report.json"
    assert report_path.is_file(), result.stdout[-2000:] + result.stderr[-3000:]
    return result, json.loads(report_path.read_text())


@pytest.fixture(scope="module")
def go_run(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("go")
    config = write_config(root, shards)
    result, report = preflight(config, "--steps", "2")
    return SimpleNamespace(config=config, result=result, report=report, root=root)


def test_go_for_a_config_that_fits_with_every_figure(go_run):
    result, report = go_run.result, go_run.report
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert report["verdict"] == "GO" and report["reasons"] == []
    assert result.stdout.rstrip().splitlines()[-2] == "GO"

    # The worst case: 4 samples of 64 tokens, each one document, from the phase of long documents.
    worst = report["batch"]["worst_case"]
    assert worst["phase"] == "pretrain"
    assert worst["longest_document_by_phase"] == {"pretrain": 300, "post_training_mix": 300}
    assert report["batch"]["accumulation_planned"] == 4  # 16 = 4 per micro-batch x 1 rank x 4

    memory = report["memory"]
    assert memory["built"] and memory["out_of_memory"] is None
    # The estimate is a floor: the measured peak resident set is at least that.
    assert memory["estimate"]["total_bytes"] <= memory["peak_bytes"] < memory["capacity_bytes"]
    assert 0.1 * GiB < memory["peak_bytes"] < 4 * GiB

    speed = report["speed"]
    plain, final = speed["micro_batch_seconds"], speed["final_micro_batch_seconds"]
    assert 0 < plain < 10 and 0 < final < 10
    assert speed["step_seconds"] == pytest.approx(3 * plain + final)
    assert speed["tokens_per_step"] == 16 * 64
    assert speed["tokens_per_second"] == pytest.approx(16 * 64 / speed["step_seconds"])
    assert speed["mfu"] is None  # no peak FLOP/s for a CPU
    assert 5 < speed["loss"] < 10  # about ln(2048) = 7.6 at initialisation

    projection = report["projection"]
    assert projection["steps_remaining"] == 1000
    assert projection["seconds"] == pytest.approx(1000 * speed["step_seconds"])
    assert projection["gpu_hours"] == pytest.approx(projection["seconds"] / 3600)

    checkpoint = report["checkpoint"]
    parameters = report["model"]["parameters"]
    assert parameters == 336_192
    # fp32 on CPU: 4 bytes of weights + 12 of fp32 master weights and AdamW moments each.
    assert checkpoint["bytes"] == 16 * parameters
    assert checkpoint["retained"] == 3  # keep_last 2 + the one being written
    assert checkpoint["needed_bytes"] == 3 * 16 * parameters
    assert checkpoint["free_bytes"] > checkpoint["needed_bytes"]

    placement = report["placement"]
    assert placement["misplaced"] == 0 and placement["device"] == "cpu"
    # Parameters, and the optimizer's master weights and two moments per group (2 groups).
    assert placement["tensors_per_device"]["optimizer cpu"] == 6

    manifest = read_manifest(go_run.root / "runs" / "preflight" / "plan")
    assert manifest.status == "complete" and manifest.summary["verdict"] == "GO"
    for line in ("peak", "step time", "tokens/s", "projection", "checkpoints", "placement"):
        assert line in result.stdout, line


def test_no_go_without_building_a_model_that_cannot_fit(shards, tmp_path):
    """mistral_7b needs over 100 GiB in fp32 with AdamW; it must be refused, not built."""
    config = write_config(tmp_path, shards, model={"preset": "mistral_7b"})
    result, report = preflight(config, "--memory-gb", "16")
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    assert report["verdict"] == "NO-GO"
    memory = report["memory"]
    assert not memory["built"] and memory["peak_bytes"] is None
    parameters = report["model"]["parameters"]
    parts = memory["estimate"]["parts_bytes"]
    assert parts["weights"] == 4 * parameters and parts["optimizer"] == 12 * parameters
    assert memory["estimate"]["total_bytes"] > 16 * parameters > memory["capacity_bytes"]
    reason = next(r for r in report["reasons"] if r.startswith("memory:"))
    assert "not built" in reason and "engine.zero_stage=3" in reason
    assert report["speed"]["step_seconds"] is None and report["projection"]["seconds"] is None
    assert "NO-GO" in result.stdout and "  - memory:" in result.stdout


def test_no_go_when_the_measured_peak_exceeds_memory(go_run, shards, tmp_path):
    """A capacity between the estimate and the measured peak: built, measured, refused."""
    memory = go_run.report["memory"]
    floor, peak = memory["estimate"]["total_bytes"], memory["peak_bytes"]
    assert floor < peak
    capacity_gb = (floor + peak) / 2 / GiB
    config = write_config(tmp_path, shards)
    result, report = preflight(config, "--memory-gb", f"{capacity_gb:.4f}", "--steps", "1")
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    assert report["memory"]["built"]
    assert report["memory"]["peak_bytes"] > 0.95 * report["memory"]["capacity_bytes"]
    [reason] = report["reasons"]
    assert reason.startswith("memory: peak") and "train.micro_batch_size" in reason
    assert "engine.activation_checkpointing=true" in reason


def estimate_only(recipe: str, root: Path, *options: str) -> tuple[int, dict, str]:
    """``kinoe preflight --estimate-only`` on a shipped recipe: exit code, report.json, table."""
    config = REPO / "configs" / "pretrain" / f"{recipe}.yaml"
    code = kinoe(["preflight", "-c", str(config), f"run.root={root}", "--estimate-only", *options])
    run_dir = root / "preflight" / recipe
    report = json.loads((run_dir / "report.json").read_text())
    return code, report, (run_dir / "report.txt").read_text()


# The recipes' clusters: H100 80 GB (79 GiB usable), nodes of 2 TB, a shared filesystem of 20 TB.
CLUSTER = ("--gpus-per-node", "8", "--memory-gb", "79", "--host-memory-gb", "1800")
DISK = ("--disk-free-gb", "20000")


@pytest.mark.parametrize(
    ("recipe", "nodes", "rate"), [("mistral_7b_ja", 4, 9000), ("mixtral_8x7b_ja", 8, 4500)]
)
def test_estimate_only_judges_a_recipe_for_its_declared_cluster(recipe, nodes, rate, tmp_path):
    """GO on the recipe's cluster, with tokens/day from the declared rate; NO-GO naming the
    reason on GPUs too small and nodes too small, all without a GPU or the recipe's shards.
    """
    shape = ("--nodes", str(nodes), *CLUSTER)
    code, report, table = estimate_only(
        recipe, tmp_path, *shape, *DISK, "--tokens-per-gpu-s", str(rate)
    )
    assert code == 0, report["reasons"]
    assert report["mode"] == "estimate-only" and report["verdict"] == "GO"
    assert report["world"]["ranks"] == nodes * 8 and report["world"]["precision"] == "bf16"
    memory, parts = report["memory"], report["memory"]["estimate"]["parts_bytes"]
    assert not memory["built"] and memory["capacity_bytes"] == 79 * GiB
    assert memory["estimate"]["total_bytes"] <= 0.70 * memory["capacity_bytes"]
    n = report["model"]["parameters"]
    if recipe.startswith("mixtral"):
        # Expert weights are split over the 8 ranks of a node; gradients and optimizer state of
        # each expert over the 8 ranks that hold it, so over all 64 ranks like the dense part.
        assert report["world"]["expert_parallel"] == 8
        experts = 32 * 8 * 3 * 4096 * 14336
        assert parts["weights"] == 2 * (n - experts + experts // 8)
        assert parts["optimizer"] == 12 * ((n - experts) // 64 + experts // 8 // 8)
    else:
        assert parts["weights"] == 2 * n and parts["optimizer"] == 12 * (n // 32)
    assert memory["host_build_bytes"] < 1800 * GiB
    speed, projection = report["speed"], report["projection"]
    assert speed["tokens_per_day"] == pytest.approx(rate * nodes * 8 * 86_400)
    assert speed["step_seconds"] == pytest.approx(1024 * 4096 / (rate * nodes * 8))
    assert projection["seconds"] == pytest.approx(36_000 * speed["step_seconds"])
    assert 0.3 < speed["mfu"] < 0.6
    assert (
        report["checkpoint"]["bytes"] == 14 * n
        and report["checkpoint"]["measured_at"] == "--disk-free-gb"
    )
    assert "tokens/day" in table and table.rstrip().endswith("GO")

    # GPUs of 24 GiB: the floor does not fit; the reason says how much and what would.
    code, report, table = estimate_only(
        recipe, tmp_path, "--nodes", str(nodes), "--gpus-per-node", "8", "--memory-gb", "24", *DISK
    )
    assert code == 3 and report["verdict"] == "NO-GO"
    [reason] = report["reasons"]
    assert reason.startswith("memory: at least") and "of 24.00 GiB (--memory-gb" in reason
    assert (
        "engine.expert_parallel=1 and engine.zero_stage=3"
        if recipe.startswith("mixtral")
        else "engine.zero_stage=3"
    ) in reason
    assert "  - memory:" in table

    # Nodes of 128 GiB cannot build the model on the host; too little disk for the checkpoints.
    code, report, _ = estimate_only(
        recipe, tmp_path, *shape[:-2], "--host-memory-gb", "128", "--disk-free-gb", "100"
    )
    assert code == 3
    assert [reason.split(":")[0] for reason in report["reasons"]] == ["host memory", "disk"]


def tiny_config(tmp_path: Path, **sections) -> PretrainConfig:
    shards = {"tokenizer": tmp_path / "t.model", "sources": {"web": tmp_path, "chat": tmp_path}}
    return PretrainConfig.model_validate(config_data(tmp_path, shards, **sections))


def test_memory_estimate_follows_zero_stage_ranks_and_checkpointing(tmp_path):
    args = tiny_config(tmp_path, model={"preset": "mistral_1b"}).model.build_args()
    n = args.num_parameters()
    ds = {"zero_optimization": {"reduce_bucket_size": 5e8, "overlap_comm": True}}
    zero1 = model_state_bytes(args, "bf16", 1, 8, ds, on_gpu=True)
    zero2 = model_state_bytes(args, "bf16", 2, 8, ds, on_gpu=True)
    zero3 = model_state_bytes(args, "bf16", 3, 8, ds, on_gpu=True)
    assert zero1["weights"] == zero2["weights"] == 2 * n and zero3["weights"] == 2 * n // 8
    assert zero1["gradients"] == zero2["gradients"] == zero3["gradients"] == 2 * n // 8
    # With accumulation, ZeRO-1 keeps every gradient whole until the step's last micro-batch.
    accumulating = model_state_bytes(args, "bf16", 1, 8, ds, on_gpu=True, accumulation=4)
    assert accumulating["gradients"] == 2 * n // 8 + 2 * n
    assert model_state_bytes(args, "bf16", 2, 8, ds, True, accumulation=4) == zero2
    assert model_state_bytes(args, "bf16", 3, 8, ds, True, accumulation=4) == zero3
    assert zero1["optimizer"] == zero3["optimizer"] == 12 * n // 8
    assert zero1["optimizer_step"] == 4 * n // 8  # the fp32 gradient partition, bf16 only
    assert "optimizer_step" not in model_state_bytes(args, "fp32", 1, 8, ds, on_gpu=True)
    assert zero3["optimizer_step"] == 4 * n // 8  # one sub-group of 1e9 holds all 147M
    assert zero1["buffers"] == 2 * 2 * 500_000_000  # two bf16 buckets with overlap_comm
    largest = 65_024 * 2048  # ZeRO-3: one bucket, plus the embedding gathered whole
    assert zero3["buffers"] == 2 * 500_000_000 + 2 * largest
    assert checkpoint_bytes(args, "bf16") == 14 * n
    # On the host only the pages the gradients were copied into count.
    tiny = tiny_config(tmp_path).model.build_args()
    on_host = model_state_bytes(tiny, "fp32", 2, 1, ds, on_gpu=False)
    assert on_host["buffers"] == 4 * tiny.num_parameters()

    # The config's accumulation decides it: 16 sequences of 4 on 4 ranks is one micro-batch.
    stage1 = tiny_config(tmp_path, model={"preset": "mistral_1b"}, engine={"zero_stage": 1})
    for ranks, whole in ((4, 0), (2, 2 * n), (1, 2 * n)):
        gradients = estimate_memory(stage1, "bf16", ranks, ds, on_gpu=True).parts["gradients"]
        assert gradients == 2 * n // ranks + whole, ranks

    # The fp32 gradient copy lives only while the activations are gone: the peak has one.
    config = tiny_config(tmp_path, model={"preset": "mistral_1b"})
    estimate = estimate_memory(config, "bf16", 1, ds, on_gpu=True)
    parts = estimate.parts
    assert estimate.total == sum(parts.values()) - min(
        parts["activations"], parts["optimizer_step"]
    )

    full = activation_bytes(args, "bf16", 4, 4096, False, dense_mask=False)
    checkpointed = activation_bytes(args, "bf16", 4, 4096, True, dense_mask=False)
    compiled = activation_bytes(args, "bf16", 4, 4096, False, dense_mask=False, compiled=True)
    assert checkpointed < full / 3 and compiled < 0.6 * full
    assert activation_bytes(args, "bf16", 8, 4096, False, False) == 2 * full
    masked = activation_bytes(args, "bf16", 4, 4096, False, dense_mask=True)
    assert masked - full == 4 * 4096 * 4096


def test_memory_fixes_name_the_change_that_fits(tmp_path):
    config = tiny_config(
        tmp_path,
        model={"preset": "mistral_1b"},
        data={"seq_len": 4096},
        train={"steps": 10, "global_batch_size": 64, "micro_batch_size": 8},
    )
    ds = {"zero_optimization": {"reduce_bucket_size": 5e8, "overlap_comm": True}}
    estimate = estimate_memory(config, "bf16", 8, ds, on_gpu=True)
    assert estimate.activations > estimate.total / 2
    capacity = estimate.total - estimate.activations // 2
    fixes = memory_fixes(config, "bf16", 8, ds, True, 0, capacity)
    assert "engine.activation_checkpointing=true" in fixes
    assert "engine.zero_stage=3" not in fixes.split(";")[0]
    far_too_small = memory_fixes(config, "bf16", 8, ds, True, 0, 5 * GiB)
    assert "at least" in far_too_small and "GPUs" in far_too_small


def test_retained_checkpoints_count_keep_last_the_one_in_flight_and_kept_multiples():
    assert retained_checkpoints(CheckpointConfig(interval=100, keep_last=2), 1000) == 3
    assert retained_checkpoints(CheckpointConfig(interval=100, keep_last=2), 200) == 2
    every = CheckpointConfig(interval=100, keep_last=2, keep_every=500)
    assert retained_checkpoints(every, 1000) == 5  # 500 and 1000 kept for good


def test_worst_case_batch_is_one_document_per_sample(tmp_path):
    config = tiny_config(tmp_path)
    batch = worst_case_batch(config, eos_id=EOS, vocab_size=VOCAB)
    assert batch.input_ids_BT.shape == (4, 64)
    assert not (batch.input_ids_BT == EOS).any()
    assert (batch.document_ids_BT == 0).all()
    assert (batch.labels_BT != -100).all()


def test_placement_names_tensors_off_the_device():
    module = torch.nn.Linear(4, 4)
    module.register_parameter("spilled", torch.nn.Parameter(torch.empty(3, device="meta")))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(8))])
    engine = SimpleNamespace(module=module, optimizer=SimpleNamespace(optimizer=optimizer))
    placement = inspect_engine_placement(engine, torch.device("cpu"), offload_allowed=False)
    assert placement["misplaced"] == 1
    assert "spilled" in placement["misplaced_examples"][0]
    on_gpu = inspect_engine_placement(engine, torch.device("cuda", 0), offload_allowed=False)
    assert on_gpu["misplaced"] == 4  # weight, bias, spilled, the optimizer's master weights
