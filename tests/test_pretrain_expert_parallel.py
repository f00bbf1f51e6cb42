"""kinoe pretrain with expert parallelism on CPU ranks (gloo): a tiny Mixtral's experts split
over 2 ranks train as without the split, resume exactly, resume at another split, and
convert to the same Hugging Face model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from test_pretrain_train import launch, metrics, run_dir, wait_for_steps, write_config

from common.manifest import read_manifest
from common.run import run_stage
from convert.cli import STEPS
from convert.config import ConvertConfig
from convert.consolidate import deepspeed_tensors
from tokenizer.chat import CHAT_TEMPLATE
from tokenizer.hf_export import export_hf_tokenizer
from training.checkpoint import TrainerState
from training.expert_optimizer import ExpertCheckpoint

from conftest import SHARED_DATA

TEXT = SHARED_DATA / "corpus" / "wikipedia_ja_leads.jsonl.gz"

MIXTRAL = {"family": "mixtral", "preset": "mixtral_tiny"}
SECTIONS = {
    "model": MIXTRAL,
    "train": {"steps": 8, "global_batch_size": 8, "micro_batch_size": 2},
    "checkpoint": {"interval": 4, "keep_last": 3},
    "monitor": {"log_interval": 1},
}


@pytest.fixture(scope="module")
def shards(pretrain_shards):
    return pretrain_shards


def _figures(config, key):
    return [record[key] for record in metrics(config)]


def _config(tmp_path, shards, name, expert_parallel, zero_stage=2, **overrides):
    sections = {**SECTIONS, **overrides}
    sections["engine"] = {"zero_stage": zero_stage, "expert_parallel": expert_parallel}
    return write_config(tmp_path, shards, name, **sections)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The same run without expert parallelism, every rank holding every expert."""
    config = _config(tmp_path_factory.mktemp("ep1"), shards, "ep1", 1)
    result = launch(config, 2)
    assert result.returncode == 0, result.stdout[-3000:]
    return config


@pytest.fixture(scope="module")
def expert_parallel(shards, tmp_path_factory):
    """The run with each rank holding 2 of the 4 experts of each layer."""
    config = _config(tmp_path_factory.mktemp("ep2"), shards, "ep2", 2)
    result = launch(config, 2)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "experts over 2 ranks" in result.stdout
    return config


def test_expert_parallel_trains_as_without_it_and_converts_to_the_same_model(
    shards, reference, expert_parallel, tmp_path
):
    config = expert_parallel
    # fp32 on CPU: only the order of the gradient sums differs. The losses agree closely; the
    # gradient norms drift apart faster (a router's near-ties amplify the differences).
    assert _figures(config, "loss") == pytest.approx(_figures(reference, "loss"), rel=1e-6)
    norms, reference_norms = _figures(config, "grad_norm"), _figures(reference, "grad_norm")
    assert norms[:3] == pytest.approx(reference_norms[:3], rel=1e-5)
    assert norms == pytest.approx(reference_norms, rel=1e-2)
    # Balance figures come from the routers, which see every expert on every rank.
    for record, expected in zip(metrics(config), metrics(reference), strict=True):
        loads = {key: value for key, value in record.items() if key.startswith("moe/load/")}
        assert len(loads) == 2 * 4 and record["moe/dropped_tokens"] == 0
        assert loads == pytest.approx({key: expected[key] for key in loads}, rel=1e-4)

    # Conversion reads the experts from the parts: the same tensors as the run without them.
    tensors = {}
    for name, source in (("ep1", reference), ("ep2", config)):
        tag = run_dir(source) / "checkpoints" / "step_00000008"
        refs = deepspeed_tensors(tag, TrainerState.from_json(tag / "trainer_state.json"))
        tensors[name] = {key: ref.read() for key, ref in refs.items()}
    assert tensors["ep1"].keys() == tensors["ep2"].keys()
    for key, tensor in tensors["ep2"].items():
        # Adam divides by the root of tiny second moments (rare tokens' rows), which magnifies
        # summation-order differences in a few elements; the weights as a whole agree closely.
        torch.testing.assert_close(tensor, tensors["ep1"][key], rtol=1e-3, atol=2e-4)
        assert (tensor - tensors["ep1"][key]).abs().mean() < 1e-6, key
    checkpoint = run_dir(config) / "checkpoints" / "step_00000008"
    parts = ExpertCheckpoint(checkpoint, "rerun")
    assert (parts.layout.size, parts.layout.replicas) == (2, 1)
    for name, _ in parts.layout.params:
        assert tensors["ep2"][name].shape[0] == 4
        for expert in range(4):
            assert torch.equal(tensors["ep2"][name][expert], parts.expert(name, expert))

    # kinoe convert to-hf of the expert-parallel checkpoint, checked by its own verification.
    hf_tokenizer = export_hf_tokenizer(shards["tokenizer"], tmp_path / "tokenizer", CHAT_TEMPLATE)
    convert = ConvertConfig.model_validate(
        {
            "run": {"root": str(tmp_path / "converted"), "name": "ep2"},
            "checkpoint": str(run_dir(config)),
            "tokenizer": str(hf_tokenizer),
            "dtype": "fp32",
            "verify": {"text": str(TEXT)},
        }
    )
    summary = run_stage(STEPS["to-hf"], convert).manifest.summary
    assert summary["verification"]["passed"], summary["verification"]


def test_expert_parallel_resumes_exactly(shards, expert_parallel, tmp_path):
    straight = expert_parallel
    interrupted = _config(tmp_path, shards, "interrupted", 2)

    process = launch(interrupted, 2, wait=False)
    wait_for_steps(interrupted, 5, process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert read_manifest(run_dir(interrupted)).status == "stopped", output[-3000:]
    assert 5 <= len(metrics(interrupted)) < 8
    resumed = launch(interrupted, 2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert _figures(interrupted, "loss") == _figures(straight, "loss")
    assert _figures(interrupted, "grad_norm") == _figures(straight, "grad_norm")


def test_expert_parallel_resumes_on_fewer_ranks_and_refuses_the_other_kind(
    shards, reference, tmp_path
):
    """4 ranks with experts over 2 (each pair's experts held twice, their optimizer state split
    over the two holders), crashed; resumed on 2 ranks (experts held once) through a universal
    checkpoint of DeepSpeed's part, as after losing a node. The losses are those of 2 ranks
    without expert parallelism (the same global batches). This run is at ZeRO-1, the reference
    and the other tests at ZeRO-2: both stages expert parallelism composes with are trained."""
    split = _config(
        tmp_path, shards, "split", 2, zero_stage=1, drills={"crash_in_checkpoint_at_step": 8}
    )
    assert launch(split, 4).returncode != 0  # step 4 is the last complete checkpoint
    checkpoint = run_dir(split) / "checkpoints" / "step_00000004"
    parts = ExpertCheckpoint(checkpoint, "rerun")
    assert (parts.layout.size, parts.layout.replicas) == (2, 2)
    convert = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    convert += ["--input_folder", str(checkpoint), "--output_folder", f"{checkpoint}_universal"]
    converted = subprocess.run(
        convert, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True
    )
    assert converted.returncode == 0, converted.stderr[-3000:]

    resume = ("drills.crash_in_checkpoint_at_step=null", "checkpoint.load_universal=true")
    refused = launch(split, 2, *resume, "engine.expert_parallel=1")
    # One line from each rank that got to say it before torchrun stopped the others.
    errors = {line for line in refused.stdout.splitlines() if "error:" in line}
    assert refused.returncode != 0 and len(errors) == 1, refused.stdout[-3000:]
    (error,) = errors
    assert "engine.expert_parallel 2" in error and "expert_parallel > 1" in error

    resumed = launch(split, 2, *resume)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert [record["step"] for record in metrics(split)] == list(range(1, 9))
    assert _figures(split, "loss") == pytest.approx(_figures(reference, "loss"), rel=1e-5)
