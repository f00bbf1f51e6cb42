"""Checkpoint and tensor files are unpickled as data only, DeepSpeed's own loads included;
digests recorded as files are written catch damage (training/safe_load.py, training/digests.py)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from common.errors import KinoeError
from common.manifest import sha256_file
from finetune.reference import REFERENCE_FILE, reference_logps
from training import safe_load
from training.digests import DigestingCheckpointEngine, damage, file_digest, record_digest
from training.world import World


class CodePayload:
    """Unpickling this creates the directory ``marker``: a stand-in for any code a file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_the_payload_runs_under_a_plain_load(tmp_path):
    # The control: without weights_only, the planted file really runs its code.
    path = tmp_path / "planted.pt"
    torch.save({"module": CodePayload(tmp_path / "ran")}, path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").is_dir()


def test_deepspeeds_own_load_of_a_planted_file_is_refused(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": CodePayload(tmp_path / "ran")}, path)
    deepspeed_engine = TorchCheckpointEngine()  # asks torch.load for weights_only=False
    with (
        safe_load.weights_only_loads(),
        pytest.raises(pickle.UnpicklingError, match=r"posix\.mkdir"),
    ):
        deepspeed_engine.load(str(path))
    ours = DigestingCheckpointEngine(deepspeed_engine)
    with pytest.raises(
        KinoeError, match=r"mp_rank_00_model_states.pt pickles posix.mkdir"
    ) as error:
        ours.load(str(path))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "ran").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_saved_files_are_digested_and_damage_named(tmp_path):
    engine = DigestingCheckpointEngine(TorchCheckpointEngine())
    (tmp_path / "rng").mkdir()
    engine.save({"weight": torch.arange(1000.0)}, str(tmp_path / "model.pt"))
    engine.save({"cpu": torch.get_rng_state()}, str(tmp_path / "rng" / "rank00000.pt"))
    with safe_load.weights_only_loads():  # nested, as on resume: the outer rule must hold
        engine.load(str(tmp_path / "model.pt"))
        from deepspeed.runtime.fp16.loss_scaler import LossScaler

        torch.save({"scaler": LossScaler(1.0)}, tmp_path / "scaler.pt")
        torch.load(tmp_path / "scaler.pt", weights_only=True)
    (tmp_path / "scaler.pt").unlink()
    recorded = engine.written(tmp_path)
    assert sorted(recorded) == ["model.pt", "rng/rank00000.pt"]
    assert damage(tmp_path, recorded) is None
    assert torch.equal(engine.load(str(tmp_path / "model.pt"))["weight"], torch.arange(1000.0))

    data = bytearray((tmp_path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "model.pt").write_bytes(data)
    assert damage(tmp_path, recorded) == (
        f"{tmp_path / 'model.pt'}: its XXH3-128 digest differs from the one recorded when the "
        "checkpoint was written"
    )
    torch.save({}, tmp_path / "extra.pt")
    assert "extra.pt: not among the files recorded" in damage(tmp_path, recorded)


@pytest.mark.parametrize("zip_format", [False, True])
def test_the_digest_taken_while_writing_is_the_file_on_disk(tmp_path, zip_format):
    """Both of torch's formats (DeepSpeed picks one by config), tensors of several sizes."""
    engine = DigestingCheckpointEngine(TorchCheckpointEngine())
    engine.inner.zipfile_serialization = zip_format
    state = {
        "big": torch.randn(600_000),
        "small": torch.arange(7),
        "bf16": [torch.ones(5).bfloat16()],
    }
    engine.save(state, str(tmp_path / "optim.pt"))
    recorded = engine.written(tmp_path)["optim.pt"]
    assert recorded == file_digest(tmp_path / "optim.pt")
    assert torch.equal(engine.load(str(tmp_path / "optim.pt"))["big"], state["big"])


def test_checkpoints_recorded_with_sha256_are_still_verified(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.arange(100.0)}, path)
    recorded = {"model.pt": {"bytes": path.stat().st_size, "sha256": sha256_file(path)}}
    assert damage(tmp_path, recorded) is None
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(data)
    assert "model.pt: its SHA-256 digest differs" in damage(tmp_path, recorded)
    # A record holding neither digest (a hand-edited trainer_state.json) is named, not a traceback.
    unverifiable = {"model.pt": {"bytes": path.stat().st_size}}
    assert (
        damage(tmp_path, unverifiable)
        == f"{path}: no digest recorded for it, so it cannot be verified"
    )


def test_dpo_reference_file_is_verified_before_use(tmp_path):
    world = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))
    logger = logging.getLogger("test")
    units = [None] * 3
    path = tmp_path / REFERENCE_FILE
    torch.save(torch.zeros(3, 2, dtype=torch.float64), path)
    record_digest(path)
    stored = reference_logps(None, units, None, world, tmp_path, 10, logger)
    assert stored.shape == (3, 2)

    torch.save(torch.ones(3, 2, dtype=torch.float64), path)  # replaced after it was recorded
    with pytest.raises(
        KinoeError, match=r"reference_logps.pt: its XXH3-128 digest differs.*restore the"
    ):
        reference_logps(None, units, None, world, tmp_path, 10, logger)

    torch.save(CodePayload(tmp_path / "ran"), path)  # planted, its digest rewritten to match
    record_digest(path)
    with pytest.raises(KinoeError, match=r"pickles posix\.mkdir"):
        reference_logps(None, units, None, world, tmp_path, 10, logger)
    assert not (tmp_path / "ran").exists()


def test_a_wrongly_typed_model_config_is_one_line(tmp_path):
    from convert.hf_read import hf_args

    (tmp_path / "config.json").write_text(
        '{"model_type": "mistral", "hidden_size": "big", "num_attention_heads": 4}'
    )
    with pytest.raises(KinoeError, match=r"config.json: transformers cannot read it.*hidden_size"):
        hf_args(tmp_path)
