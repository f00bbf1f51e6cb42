"""kinoe convert on CPU: tiny Mistral and Mixtral trained under ZeRO 2 and 3 on 2 ranks, converted
to Hugging Face and back, checked against transformers and DeepSpeed's own consolidation."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_pretrain_train import launch, run_dir, write_config
from test_training_safe_load import CodePayload
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import KinoeError
from common.manifest import read_manifest
from common.run import load_stage_config, run_stage
from convert.cli import STEPS, step_dir
from convert.config import ConvertConfig
from convert.consolidate import deepspeed_tensors, resolve_tag
from convert.initial import load_initial_weights
from convert.sources import inference_args
from convert.texts import load_texts
from convert.verify import VerificationFailed
from launch.cli import main as kinoe_main
from models import FAMILIES
from pretrain.config import ModelConfig
from tokenizer.chat import CHAT_TEMPLATE, TURN_END, TURN_START
from tokenizer.hf_export import export_hf_tokenizer
from training.checkpoint import TrainerState
from training.digests import file_digest

from conftest import REPO, SHARED_DATA, error_lines

TEXT = SHARED_DATA / "corpus" / "wikipedia_ja_leads.jsonl.gz"
PRESETS = {"mistral": "tiny", "mixtral": "mixtral_tiny"}
HF_CLASSES = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}
MIXTRAL_MISSING = pytest.mark.skipif(
    "mixtral" not in FAMILIES, reason="the Mixtral family is not registered yet"
)
FAMILY = ["mistral", pytest.param("mixtral", marks=MIXTRAL_MISSING)]


@pytest.fixture(scope="module")
def shards(pretrain_shards):
    return pretrain_shards


@pytest.fixture(scope="module")
def hf_tokenizer(shards, tmp_path_factory) -> Path:
    """The Hugging Face export of the tokenizer the shards were encoded with."""
    out = tmp_path_factory.mktemp("tokenizer") / "hf"
    return export_hf_tokenizer(shards["tokenizer"], out, CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """``trained(family, zero_stage)``: a pretrain run of 10 steps on 2 ranks, trained once per module."""
    runs: dict[tuple[str, int], Path] = {}

    def train(family: str, stage: int) -> Path:
        if (family, stage) not in runs:
            root = tmp_path_factory.mktemp(f"{family}_zero{stage}")
            config = write_config(
                root,
                shards,
                f"{family}_zero{stage}",
                model={"family": family, "preset": PRESETS[family]},
                engine={"zero_stage": stage},
                train={"steps": 10, "global_batch_size": 8, "micro_batch_size": 2},
                checkpoint={"interval": 10},
            )
            result = launch(config, 2)
            assert result.returncode == 0, result.stdout[-3000:]
            runs[family, stage] = run_dir(config)
        return runs[family, stage]

    return train


def convert_config(root: Path, name: str, **values) -> ConvertConfig:
    data = {"run": {"root": str(root), "name": name}, "verify": {"text": str(TEXT)}}
    for key, value in values.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return ConvertConfig.model_validate(json.loads(json.dumps(data, default=str)))


def kinoe_convert(tmp_path: Path, step: str, config: ConvertConfig, *overrides: str):
    """``kinoe convert <step> -c config.yaml`` through the console script's entry point, in this
    process: what a user sees (exit code, stderr) without a new interpreter's seconds of imports
    per call. A traceback would surface here as the test's own exception."""
    path = tmp_path / f"{config.run.name}-{step}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), allow_unicode=True))
    arguments = ["convert", step, "-c", str(path), *overrides]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = kinoe_main(arguments)
    return subprocess.CompletedProcess(
        ["kinoe", *arguments], code, stdout.getvalue(), stderr.getvalue()
    )


def documents(tokenizer, count: int = 4, length: int = 96) -> list[list[int]]:
    return [ids[:length] for ids in tokenizer(load_texts(TEXT, count)).input_ids]


@torch.no_grad()
def greedy(model, prompt: list[int], steps: int, stops: set[int]) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
        if tokens[-1] in stops:
            break
    return tokens[len(prompt) :]


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("family", FAMILY)
def test_to_hf_loads_in_transformers_and_matches_our_model(
    family, stage, trained, hf_tokenizer, tmp_path
):
    pretrain_run = trained(family, stage)
    config = convert_config(
        tmp_path, "tiny", checkpoint=pretrain_run, tokenizer=hf_tokenizer, dtype="fp32"
    )
    result = run_stage(STEPS["to-hf"], config)
    out = result.run_dir

    summary = result.manifest.summary
    exact = summary["verification"]["exact"]
    assert summary["verification"]["passed"] and "bf16" not in summary["verification"]
    assert exact["max_abs"] < 1e-4 and exact["argmax_agreement"] == 1.0
    assert exact["greedy"]["identical"] == exact["greedy"]["prompts"] == 8
    # The manifest traces the model to the checkpoint, the tokenizer and the training data.
    assert set(result.manifest.inputs) == {"checkpoint", "tokenizer"}
    source = summary["source"]
    assert source["step"] == 10 and source["zero_stage"] == stage and source["world_size"] == 2
    assert source["pretrain_manifest"]["fingerprint"] == read_manifest(pretrain_run).fingerprint
    assert {"data.sources.wikipedia", "data.tokenizer"} <= source["pretrain_manifest"][
        "inputs"
    ].keys()

    hf_config = json.loads((out / "config.json").read_text())
    args = ModelConfig(family=family, preset=PRESETS[family]).build_args()
    assert hf_config["architectures"] == [HF_CLASSES[family]]
    assert hf_config["num_key_value_heads"] == args.num_kv_heads == 2
    assert hf_config["rope_parameters"]["rope_theta"] == args.rope_theta
    assert hf_config["sliding_window"] == args.sliding_window
    assert hf_config["dtype"] == "float32"
    if family == "mixtral":
        assert hf_config["num_local_experts"] == args.num_experts
        assert hf_config["num_experts_per_tok"] == args.top_k
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(TURN_END),
    ]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "こんにちは"}], tokenize=False
    )
    assert chat.startswith(TURN_START) and TURN_END in chat

    # Independently of kinoe's consolidation and verification: our model from DeepSpeed's
    # own consolidated state dict against the directory loaded by transformers.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = resolve_tag(pretrain_run, "latest")
    ours = FAMILIES[family].model_type(inference_args(args)).eval()
    ours.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == HF_CLASSES[family]
    stops = set(generation["eos_token_id"])
    with torch.no_grad():
        for ids in documents(tokenizer):
            expected, got = ours(torch.tensor([ids]))[0], hf(torch.tensor([ids])).logits[0]
            assert (expected - got).abs().max() < 1e-4
            prompt = ids[:16]
            generated = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
            assert generated[0, len(prompt) :].tolist() == greedy(ours, prompt, 16, stops)


@pytest.mark.parametrize(
    ("family", "stage"),
    [
        ("mistral", 1),
        ("mistral", 2),
        ("mistral", 3),
        *(pytest.param("mixtral", stage, marks=MIXTRAL_MISSING) for stage in (2, 3)),
    ],
)
def test_streamed_consolidation_equals_deepspeeds(family, stage, trained):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = resolve_tag(trained(family, stage), "latest")
    expected = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    streamed = deepspeed_tensors(tag, TrainerState.from_json(tag / "trainer_state.json"))
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert streamed[name].shape == tuple(tensor.shape)
        assert torch.equal(streamed[name].read(), tensor), name


def test_bf16_output_passes_its_thresholds(trained, hf_tokenizer, tmp_path):
    config = convert_config(
        tmp_path, "bf16", checkpoint=trained("mistral", 3), tokenizer=hf_tokenizer
    )
    result = run_stage(STEPS["to-hf"], config)
    verification = result.manifest.summary["verification"]
    assert verification["passed"] and verification["stored_dtype"] == "bfloat16"
    assert verification["exact"]["max_abs"] < 1e-4
    bf16 = verification["bf16"]
    assert 0 < bf16["max_abs"] < config.verify.bf16.max_abs
    assert bf16["argmax_agreement"] >= config.verify.bf16.argmax_agreement
    weights = load_file(result.run_dir / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert json.loads((result.run_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_output_has_an_index_and_loads(trained, hf_tokenizer, tmp_path):
    config = convert_config(
        tmp_path,
        "sharded",
        checkpoint=trained("mistral", 2),
        tokenizer=hf_tokenizer,
        dtype="fp32",
        max_shard_size_mb=1,
    )
    result = run_stage(STEPS["to-hf"], config)
    out = result.run_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and all((out / name).is_file() for name in files)
    assert not (out / "model.safetensors").exists()
    assert all((out / name).stat().st_size <= 1_000_000 + 200_000 for name in files)
    assert result.manifest.summary["verification"]["passed"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == result.manifest.summary["parameters"]


def damaged_copy(pretrain_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "damaged"
    shutil.copytree(pretrain_run, copy)
    return copy, resolve_tag(copy, "latest")


@pytest.mark.parametrize(
    ("stage", "damage", "message"),
    [
        (2, "truncate_optimizer", "bytes, but"),
        (2, "truncate_unrecorded", "unreadable (PytorchStreamReader failed reading zip archive"),
        (2, "flip_bytes", "its XXH3-128 digest differs from the one recorded when the checkpoint"),
        (2, "planted_pickle", "pickles posix.mkdir, which kinoe never unpickles"),
        (3, "missing_optimizer", "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
        (3, "missing_model_states", "zero_pp_rank_1_mp_rank_00_model_states.pt is missing"),
        (2, "missing_trainer_state", "is not a complete checkpoint (no trainer_state.json"),
    ],
)
def test_damaged_checkpoint_fails_in_one_line(
    stage, damage, message, trained, hf_tokenizer, tmp_path
):
    copy, tag = damaged_copy(trained("mistral", stage), tmp_path)
    optimizer = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage.startswith("truncate"):
        with optimizer.open("r+b") as handle:
            handle.truncate(optimizer.stat().st_size // 2)
        if damage == "truncate_unrecorded":  # written before kinoe recorded digests
            state = json.loads((tag / "trainer_state.json").read_text())
            (tag / "trainer_state.json").write_text(json.dumps({**state, "files": {}}))
    elif damage == "flip_bytes":
        data = bytearray(optimizer.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(255 - b for b in data[middle : middle + 8])
        optimizer.write_bytes(data)
    elif damage == "planted_pickle":  # digests rewritten too, as whoever planted it would
        torch.save({"optimizer_state_dict": CodePayload(tmp_path / "ran")}, optimizer)
        state = json.loads((tag / "trainer_state.json").read_text())
        state["files"][optimizer.name] = file_digest(optimizer)
        (tag / "trainer_state.json").write_text(json.dumps(state))
    elif damage == "missing_optimizer":
        optimizer.unlink()
    elif damage == "missing_model_states":
        (tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    else:
        (tag / "trainer_state.json").unlink()
    config = convert_config(tmp_path, "damaged", checkpoint=copy, tokenizer=hf_tokenizer)
    result = kinoe_convert(tmp_path, "to-hf", config)
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = error_lines(result)
    assert message in line, line
    assert "Traceback" not in result.stderr
    assert not (step_dir(config, "to-hf") / "model.safetensors").exists()
    assert not (tmp_path / "ran").exists()


def test_verify_fails_when_one_weight_is_perturbed(trained, hf_tokenizer, tmp_path):
    config = convert_config(
        tmp_path,
        "perturbed",
        checkpoint=trained("mistral", 2),
        tokenizer=hf_tokenizer,
        dtype="fp32",
    )
    out = run_stage(STEPS["to-hf"], config).run_dir
    assert run_stage(STEPS["verify"], config).manifest.summary["verification"]["passed"]

    weights = load_file(out / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"][7, 3] += 0.1
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    result = kinoe_convert(tmp_path, "verify", config, "--force")  # its input changed
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = error_lines(result)
    assert "verification of" in line and "max |logit difference|" in line, line
    manifest = read_manifest(step_dir(config, "verify"))
    assert manifest.status == "failed"
    verification = manifest.summary["verification"]
    assert not verification["passed"] and verification["exact"]["max_abs"] > 1e-4
    assert json.loads((step_dir(config, "verify") / "verification.json").read_text()) == (
        manifest.summary
    )


@pytest.mark.parametrize("family", FAMILY)
def test_from_hf_then_to_hf_round_trips_bit_exactly(family, trained, hf_tokenizer, tmp_path):
    there = convert_config(
        tmp_path, "there", checkpoint=trained(family, 2), tokenizer=hf_tokenizer, dtype="fp32"
    )
    hf_dir = run_stage(STEPS["to-hf"], there).run_dir
    back = convert_config(tmp_path, "back", hf_model=hf_dir, max_shard_size_mb=1)
    weights_dir = run_stage(STEPS["from-hf"], back)
    assert weights_dir.manifest.summary["verification"]["passed"]
    assert (weights_dir.run_dir / "weights" / "model.safetensors.index.json").is_file()
    section = json.loads((weights_dir.run_dir / "model.json").read_text())["pretrain_model"]
    assert section == {
        "family": family,
        "preset": PRESETS[family],
        "overrides": {},
        "init_from": str(weights_dir.run_dir),
    }
    again = convert_config(tmp_path, "again", checkpoint=weights_dir.run_dir, dtype="fp32")
    round_trip = run_stage(STEPS["to-hf"], again).run_dir

    original, converted = (
        load_file(hf_dir / "model.safetensors"),
        load_file(round_trip / "model.safetensors"),
    )
    assert original.keys() == converted.keys()
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name
    first, second = (json.loads((d / "config.json").read_text()) for d in (hf_dir, round_trip))
    assert first == second

    # What pretraining's model.init_from does with the directory.
    model = FAMILIES[family].model_type(
        ModelConfig(family=family, preset=PRESETS[family]).build_args()
    )
    load_initial_weights(model, weights_dir.run_dir)
    hf_names = FAMILIES[family].to_hf(model.state_dict())
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(hf_names[name], tensor), name


def transformers_model(family: str, directory: Path, hf_tokenizer: Path) -> Path:
    """A model made and saved by transformers: GQA with one KV head, a sliding window shorter
    than the text, RoPE theta 1e6, tied embeddings, bf16; experts one per tensor for Mixtral."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    shape = {
        "vocab_size": 2048,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 512,
        "sliding_window": 12,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "rms_norm_eps": 1e-6,
    }
    torch.manual_seed(0)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**shape))
    else:
        model = MixtralForCausalLM(
            MixtralConfig(**shape, num_local_experts=3, num_experts_per_tok=2)
        )
    model.to(torch.bfloat16).save_pretrained(directory)
    for path in hf_tokenizer.iterdir():
        shutil.copyfile(path, directory / path.name)
    return directory


@pytest.mark.parametrize("family", FAMILY)
def test_from_hf_reads_a_model_transformers_saved(family, hf_tokenizer, tmp_path):
    hf_dir = transformers_model(family, tmp_path / "hf", hf_tokenizer)
    config = convert_config(tmp_path, "foreign", hf_model=hf_dir)
    result = run_stage(STEPS["from-hf"], config)
    verification = result.manifest.summary["verification"]
    assert verification["passed"] and verification["stored_dtype"] == "bfloat16"
    assert verification["exact"]["max_abs"] < 1e-4
    model_json = json.loads((result.run_dir / "model.json").read_text())
    assert model_json["family"] == family
    args = model_json["args"]
    assert (args["num_kv_heads"], args["sliding_window"], args["rope_theta"]) == (1, 12, 1e6)
    assert args["tie_embeddings"] and (result.run_dir / "tokenizer" / "tokenizer.json").is_file()

    # And back, in the stored dtype: the same tensors under the same names as transformers wrote.
    back = convert_config(tmp_path, "foreign-back", checkpoint=result.run_dir, dtype="bf16")
    round_trip = run_stage(STEPS["to-hf"], back).run_dir
    original, converted = (
        load_file(hf_dir / "model.safetensors"),
        load_file(round_trip / "model.safetensors"),
    )
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[name], converted[name]) for name in original)


def test_initial_weights_refuse_another_architecture(trained, hf_tokenizer, tmp_path):
    hf_dir = transformers_model("mistral", tmp_path / "hf", hf_tokenizer)
    config = convert_config(tmp_path, "mismatch", hf_model=hf_dir, verify={"enabled": False})
    weights = run_stage(STEPS["from-hf"], config).run_dir
    tiny = FAMILIES["mistral"].model_type(ModelConfig(preset="tiny").build_args())
    with pytest.raises(KinoeError, match=r"num_kv_heads=1 \(the model has 2\).*set model.preset"):
        load_initial_weights(tiny, weights)

    section = json.loads((weights / "model.json").read_text())["pretrain_model"]
    fitting = ModelConfig(
        family="mistral", preset=section["preset"], overrides=section["overrides"]
    )
    model = FAMILIES["mistral"].model_type(fitting.build_args())
    load_initial_weights(model, weights)
    tensors = load_file(weights / "weights" / "model.safetensors")
    del tensors["norm.weight"]
    save_file(tensors, weights / "weights" / "model.safetensors")
    with pytest.raises(KinoeError, match=r"missing norm\.weight"):
        load_initial_weights(model, weights)


def test_pretraining_continues_from_converted_weights(trained, shards, hf_tokenizer, tmp_path):
    there = convert_config(
        tmp_path, "continue", checkpoint=trained("mistral", 2), tokenizer=hf_tokenizer, dtype="fp32"
    )
    hf_dir = run_stage(STEPS["to-hf"], there).run_dir
    weights = run_stage(STEPS["from-hf"], convert_config(tmp_path, "continue", hf_model=hf_dir))
    sections = {
        "train": {"steps": 5, "global_batch_size": 8, "micro_batch_size": 8},
        "schedule": {"warmup_steps": 0},
    }
    fresh = write_config(tmp_path / "fresh", shards, "fresh", **sections)
    continued = write_config(
        tmp_path / "continued",
        shards,
        "continued",
        model={"preset": "tiny", "init_from": str(weights.run_dir)},
        **sections,
    )
    losses = []
    for config in (fresh, continued):
        result = launch(config, 1)
        assert result.returncode == 0, result.stdout[-3000:]
        metrics = (run_dir(config) / "metrics.jsonl").read_text().splitlines()
        losses.append(json.loads(metrics[0])["loss"])
    assert losses[1] < losses[0] - 0.3, losses  # the 10 steps of training carried over


def test_verification_failure_keeps_its_figures(trained, hf_tokenizer, tmp_path):
    config = convert_config(
        tmp_path,
        "strict",
        checkpoint=trained("mistral", 2),
        tokenizer=hf_tokenizer,
        verify={"exact": {"max_abs": 1e-12, "mean_abs": 1e-12, "argmax_agreement": 1.0}},
    )
    with pytest.raises(VerificationFailed, match=re.escape("exact: max |logit difference|")):
        run_stage(STEPS["to-hf"], config)
    manifest = read_manifest(step_dir(config, "to-hf"))
    assert manifest.status == "failed" and manifest.error.startswith("VerificationFailed")
    assert manifest.summary["parameters"] > 0
    assert not manifest.summary["verification"]["passed"]


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "convert").glob("*.yaml")), ids=lambda path: path.name
)
def test_named_configs_load(path):
    config = load_stage_config(ConvertConfig, path)
    assert config.run.name == path.stem


def test_another_tokenizer_is_refused(trained, hf_tokenizer, tmp_path):
    other = tmp_path / "other_tokenizer"
    shutil.copytree(hf_tokenizer, other)
    with (other / "tokenizer.model").open("ab") as handle:
        handle.write(b"\0")  # not the file the model was trained with
    config = convert_config(tmp_path, "other", checkpoint=trained("mistral", 2), tokenizer=other)
    with pytest.raises(KinoeError, match="not the one the model was trained with"):
        run_stage(STEPS["to-hf"], config)
