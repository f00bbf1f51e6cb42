"""kinoe finetune: label masks, data checks, packing, jaster data, and SFT/LoRA/DPO runs under torchrun.

The training runs start from a tiny Mistral that `kinoe pretrain` trained and `kinoe convert`
wrote as a Hugging Face directory (the ``kinoe_model_dir`` fixture), and train on JCommonsenseQA
questions from ../shared/data, as jaster-style examples.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from common.errors import KinoeError
from common.run import run_stage
from eval.cli import STEPS as EVAL_STEPS
from eval.config import EvalConfig
from eval.data import llm_jp_eval_train_dev
from eval.tasks import REGISTRY
from eval.tasks.base import few_shot_header, prompt
from finetune.cli import STEPS
from finetune.config import FinetuneConfig
from finetune.examples import KEPT_RECORD_CHARACTERS, Encoder, load_units
from finetune.jaster import jaster_record
from finetune.packing import IGNORE, collate, pack, rank_micro_batches, training_plan
from tokenizer.chat import TURN_END

from conftest import SHARED_DATA, error_lines

JGLUE = SHARED_DATA / "eval" / "jglue"
JCQA = REGISTRY["jcommonsenseqa"]

pytestmark = pytest.mark.skipif(
    not JGLUE.is_dir(), reason=f"real data folder {JGLUE} is absent (see ../shared/data/SOURCES.md)"
)


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            line = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)
            handle.write(line + "\n")
    return path


def trained_text(encoder: Encoder, segment) -> str:
    ids = [token for token, trained in zip(segment.ids, segment.trained, strict=True) if trained]
    return encoder.tokenizer.decode(ids)


def trained_runs(segment) -> int:
    """How many separate stretches of trained tokens the segment has."""
    flags = segment.trained
    return sum(1 for i, flag in enumerate(flags) if flag and (i == 0 or not flags[i - 1]))


# ------------------------------------------------------------------- label masks


def test_assistant_only_mask_is_exact_on_multi_turn_conversations(kinoe_model_dir):
    encoder = Encoder(kinoe_model_dir, max_length=512)
    questions = [r.fields for r in JCQA.read(JGLUE / "jcommonsenseqa-valid.json").records[:3]]
    messages = [{"role": "system", "content": "あなたは常識に詳しいアシスタントです。"}]
    answers = []
    for index, question in enumerate(questions):
        label = question["label"]
        answer = f"答えは「{question[f'choice{label}']}」です。\n理由も説明できます。"
        if index == 1:
            answer = "ＡＢＣ full-width と English words, 123"
        messages += [
            {"role": "user", "content": question["question"]},
            {"role": "assistant", "content": answer},
        ]
        answers.append(answer)
    unit = encoder.sft({"messages": messages})
    (segment,) = unit.segments

    assert trained_text(encoder, segment) == "".join(answer + TURN_END for answer in answers)
    assert trained_runs(segment) == len(answers)  # one stretch per assistant turn, nothing between
    # The whole sequence is the conversation as the chat template renders it, BOS first.
    rendered = encoder.tokenizer.apply_chat_template(messages, tokenize=False)
    assert segment.ids[0] == encoder.tokenizer.bos_token_id
    assert segment.ids[1:-1] == encoder.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert segment.ids[-1] == encoder.tokenizer.eos_token_id and not segment.trained[-1]

    # Labels in a packed batch are exactly the trained tokens, shifted by one.
    batch = collate([unit], [(0,)], 512, pad_id=0)
    labels = batch.labels_BT[0]
    expected = [
        t if trained else IGNORE
        for t, trained in zip(segment.ids[1:], segment.trained[1:], strict=True)
    ]
    assert labels[: segment.length].tolist() == expected
    assert (labels[segment.length :] == IGNORE).all()


def test_prompt_completion_trains_the_completion_and_eos(kinoe_model_dir):
    encoder = Encoder(kinoe_model_dir, max_length=512)
    question = JCQA.read(JGLUE / "jcommonsenseqa-valid.json").records[0].fields
    sample = JCQA.loglik.render(question)
    text_prompt = prompt(few_shot_header(JCQA.loglik.instruction, []), sample)
    (segment,) = encoder.sft({"prompt": text_prompt, "completion": sample.output}).segments
    eos = encoder.tokenizer.eos_token_id
    trained = [t for t, flag in zip(segment.ids, segment.trained, strict=True) if flag]
    assert trained[-1] == eos
    assert encoder.tokenizer.decode(trained[:-1]) == sample.output
    assert trained_runs(segment) == 1


def test_bad_records_are_counted_and_set_aside_and_good_ones_kept(kinoe_model_dir, tmp_path):
    good = {
        "messages": [
            {"role": "user", "content": "こんにちは"},
            {"role": "assistant", "content": "はい"},
        ]
    }
    records = [
        good,
        "{not json",
        {"messages": [{"role": "user", "content": "質問だけ"}]},
        {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]},
        {
            "messages": [
                {"role": "user", "content": "長い" * 400},
                {"role": "assistant", "content": "y"},
            ]
        },
        {"prompt": "問い", "completion": ""},
        {"text": "何の形でもない"},
        {"prompt": "問い", "completion": "答え"},
    ]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    rejected = tmp_path / "rejected.jsonl"
    units, account = load_units(
        Encoder(kinoe_model_dir, max_length=64), [path], "data.train", "sft", rejected
    )

    assert len(units) == 2 and account.kept == 2 and account.read == 9
    assert [unit.origin for unit in units] == [f"{path}:1", f"{path}:9"]
    assert dict(account.rejected) == {
        "not_json": 1,
        "no_assistant_turn": 1,
        "bad_role": 1,
        "empty_content": 1,
        "too_long": 1,
        "empty_text": 1,
        "unknown_shape": 1,
    }
    lines = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert [line["origin"] for line in lines] == [f"{path}:{n}" for n in range(2, 9)]

    with pytest.raises(
        KinoeError, match=r"data.train: none of the 1 records is usable for sft \(not_json 1\)"
    ):
        load_units(
            Encoder(kinoe_model_dir, 64),
            [write_jsonl(tmp_path / "bad.jsonl", ["{"])],
            "data.train",
            "sft",
            None,
        )
    with pytest.raises(KinoeError, match="does not exist"):
        load_units(
            Encoder(kinoe_model_dir, 64), [tmp_path / "missing.jsonl"], "data.train", "sft", None
        )


# ------------------------------------------------------------------- packing


def test_packing_keeps_examples_whole_and_apart(kinoe_model_dir):
    encoder = Encoder(kinoe_model_dir, max_length=48)
    units = [
        encoder.sft({"prompt": f"問{i}：" + "あ" * (i * 3), "completion": f"答{i}"})
        for i in range(12)
    ]
    lengths = [unit.length for unit in units]
    sequences = pack(lengths, list(range(12)), 48, packing=True)
    assert sorted(i for s in sequences for i in s) == list(range(12))
    assert all(sum(lengths[i] for i in s) <= 48 for s in sequences)
    assert len(sequences) < 12  # several examples share a sequence

    batch = collate(units, sequences[:2], 48, pad_id=0)
    for row, indices in enumerate(sequences[:2]):
        documents = batch.document_ids_BT[row].tolist()
        start = 0
        for document, index in enumerate(indices):
            end = start + lengths[index]
            assert documents[start:end] == [document] * lengths[index]
            assert batch.input_ids_BT[row, start:end].tolist() == units[index].segments[0].ids[:-1]
            start = end
        assert all(d == len(indices) for d in documents[start:])  # padding: its own document
        assert (batch.labels_BT[row, start:] == IGNORE).all()

    plan = training_plan(units, epochs=2, seed=3, max_length=48, packing=True, global_batch_size=4)
    again = training_plan(units, epochs=2, seed=3, max_length=48, packing=True, global_batch_size=4)
    assert plan.sequences == again.sequences and plan.identity() == again.identity()
    assert sorted(i for s in plan.sequences for i in s) == sorted(list(range(12)) * 2)
    last = plan.step_sequences(plan.steps - 1)
    assert len(last) == 4
    # Two ranks split a step into contiguous halves.
    step = plan.step_sequences(0)
    halves = [rank_micro_batches(step, rank, 2, 1) for rank in range(2)]
    assert [s for rank in halves for micro in rank for s in micro] == step


# ------------------------------------------------------------------- jaster


def test_jaster_writes_llm_jp_eval_train_split_and_skips_missing_tasks(tmp_path):
    config = FinetuneConfig.model_validate(
        {
            "run": {"root": str(tmp_path / "runs"), "name": "jaster"},
            "jaster": {"jglue_dir": str(JGLUE), "tasks": ["jcommonsenseqa", "jnli"]},
        }
    )
    result = run_stage(STEPS["jaster"], config)
    summary = result.manifest.summary
    train, dev = llm_jp_eval_train_dev(JCQA, JGLUE, 42)
    assert summary["examples"] == {"jcommonsenseqa": len(train)}
    assert "jnli" in summary["skipped"]  # no JNLI train file in the shared data
    records = [
        json.loads(line)
        for line in (result.run_dir / "jcommonsenseqa.jsonl").read_text().splitlines()
    ]
    first = JCQA.generation.render(train[0])
    assert records[0] == {
        "id": f"jcommonsenseqa/{first.id}",
        "prompt": prompt(few_shot_header(JCQA.generation.instruction, []), first),
        "completion": first.output,
    }
    dev_ids = {f"jcommonsenseqa/{record['q_id']}" for record in dev}
    assert not dev_ids & {record["id"] for record in records}  # the dev split stays unseen


# ------------------------------------------------------------------- training runs


def jaster_jcqa(records: list[dict]) -> list[dict]:
    """JCommonsenseQA records as jaster examples in the log-likelihood prompt format (what eval scores)."""
    return [jaster_record(JCQA, record, "loglik", "prompt_completion") for record in records]


def write_finetune_config(
    tmp_path: Path, name: str, model_dir: Path, data: list[Path], **sections
) -> Path:
    config = {
        "run": {"root": str(tmp_path / "runs"), "name": name},
        "model": {"path": str(model_dir)},
        "data": {"train": [str(p) for p in data], "max_length": 512, "eval_fraction": 0.1},
        "train": {"epochs": 3, "global_batch_size": 4, "micro_batch_size": 1, "eval_interval": 10},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "engine": {"zero_stage": 2},
        "checkpoint": {"interval": 1000},
        "monitor": {"log_interval": 5},
        "output": {"verify": {"documents": 2, "greedy_tokens": 4}},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def finetune_run(config: Path, step: str) -> Path:
    data = yaml.safe_load(config.read_text())
    return Path(data["run"]["root"]) / "finetune" / data["run"]["name"] / step


def evaluations(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


def jcqa_dev_accuracy(model_dir: Path, root: Path, name: str, limit: int) -> float:
    """`kinoe eval run`: 0-shot log-likelihood accuracy on the first ``limit`` dev questions."""
    config = EvalConfig.model_validate(
        {
            "run": {"root": str(root), "name": name},
            "model": str(model_dir),
            "device": "cpu",
            "dtype": "float32",
            "jglue_dir": str(JGLUE),
            "tasks": ["jcommonsenseqa"],
            "scoring": ["loglik"],
            "split": "dev",
            "limit": limit,
            "shots": 0,
            "batch_size": 8,
        }
    )
    run = run_stage(EVAL_STEPS["run"], config).run_dir
    [result] = json.loads((run / "report.json").read_text())["results"]
    return result["metrics"]["acc"]


@pytest.mark.slow
def test_sft_lowers_held_out_loss_and_raises_jcqa_accuracy(kinoe_model_dir, tmp_path):
    from test_pretrain_train import launch

    # llm-jp-eval's dev questions (the last 10% of JGLUE's shuffled train file) as SFT data, then
    # `kinoe eval` on the same questions: the model learns the answers it is shown, which only
    # happens when the completion tokens are the ones trained.
    _, dev = llm_jp_eval_train_dev(JCQA, JGLUE, 42)
    data = write_jsonl(tmp_path / "jcqa.jsonl", jaster_jcqa(dev[:48]))
    config = write_finetune_config(tmp_path, "sft", kinoe_model_dir, [data], train={"epochs": 6})
    result = launch(config, 2, stage=("finetune", "sft"))
    assert result.returncode == 0, result.stdout[-4000:]

    run = finetune_run(config, "sft")
    history = evaluations(run)
    assert history[0]["step"] == 0 and history[-1]["step"] > 0
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["summary"]["verification"]["passed"] is True
    before = jcqa_dev_accuracy(kinoe_model_dir, tmp_path / "eval", "before", 48)
    after = jcqa_dev_accuracy(run / "model", tmp_path / "eval", "after", 48)
    assert after > before + 0.1, (before, after)


@pytest.mark.slow
def test_lora_under_zero3_saves_a_loadable_merged_model(kinoe_model_dir, tmp_path):
    from safetensors.torch import load_file
    from test_pretrain_train import launch
    from transformers import AutoModelForCausalLM

    _, dev = llm_jp_eval_train_dev(JCQA, JGLUE, 42)
    data = write_jsonl(tmp_path / "jcqa.jsonl", jaster_jcqa(dev[:24]))
    config = write_finetune_config(
        tmp_path,
        "lora",
        kinoe_model_dir,
        [data],
        model={
            "lora": {
                "enabled": True,
                "rank": 4,
                "alpha": 8,
                "target_modules": ["q_proj", "v_proj", "down_proj"],
            }
        },
        train={"epochs": 2},
        optimizer={"lr": 1e-2, "weight_decay": 0.0},
        engine={"zero_stage": 3},
    )
    result = launch(config, 2, stage=("finetune", "sft"))
    assert result.returncode == 0, result.stdout[-4000:]

    run = finetune_run(config, "sft")
    summary = json.loads((run / "manifest.json").read_text())["summary"]
    assert summary["lora"] is True
    assert 0 < summary["parameters"]["trainable"] < summary["parameters"]["total"] / 10
    history = evaluations(run)
    assert history[-1]["loss"] < history[0]["loss"]

    base = load_file(kinoe_model_dir / "model.safetensors")
    tuned = load_file(run / "model" / "model.safetensors")
    assert base.keys() == tuned.keys()
    for name, tensor in base.items():
        adapted = any(f".{target}." in name for target in ("q_proj", "v_proj", "down_proj"))
        if adapted:
            assert not torch.equal(tensor, tuned[name]), name  # the adapters are merged in
        else:
            assert torch.equal(tensor, tuned[name]), name  # everything else is the starting model
    model = AutoModelForCausalLM.from_pretrained(str(run / "model"))
    assert type(model).__name__ == "MistralForCausalLM"
    assert summary["verification"]["passed"] is True

    # The adapters alone, as peft writes them: on the starting model they give the merged weights.
    from peft import PeftModel

    assert (
        summary["adapter"] == str(run / "adapter") and summary["adapter_modules"] == 2 * 3
    )  # 2 layers x q, v, down
    starting = AutoModelForCausalLM.from_pretrained(str(kinoe_model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(starting, str(run / "adapter")).merge_and_unload()
    merged_state = merged.state_dict()
    for name, tensor in tuned.items():
        torch.testing.assert_close(merged_state[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_dpo_raises_the_chosen_over_rejected_margin(kinoe_model_dir, tmp_path):
    from test_pretrain_train import launch

    from wandb_records import offline_runs, records_of

    # A toy preference set from real questions: the right answer chosen, a wrong one rejected,
    # the question as a user turn (chat template), the answers as the assistant's turn.
    train, _ = llm_jp_eval_train_dev(JCQA, JGLUE, 42)
    pairs = []
    for record in train[:40]:
        choices = [record[f"choice{i}"] for i in range(5)]
        wrong = choices[(record["label"] + 1) % 5]
        pairs.append(
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": f"{record['question']}\n選択肢：{'、'.join(choices)}",
                    }
                ],
                "chosen": f"答えは{choices[record['label']]}です。",
                "rejected": [{"role": "assistant", "content": f"答えは{wrong}です。"}],
            }
        )
    data = write_jsonl(tmp_path / "pairs.jsonl", [*pairs, {"prompt": "問い", "chosen": "はい"}])
    config = write_finetune_config(
        tmp_path,
        "dpo",
        kinoe_model_dir,
        [data],
        train={"epochs": 4, "eval_interval": 5},
        optimizer={"lr": 2e-3, "weight_decay": 0.0},
        engine={"zero_stage": 1},
        dpo={"beta": 0.5},
        monitor={"log_interval": 2, "wandb": {"enabled": True, "mode": "offline"}},
    )
    # Stopped by SIGTERM (as SLURM stops a job) after a few steps, then resumed to the end:
    # the resumed run must use the saved reference log-probabilities, not its trained weights.
    run = finetune_run(config, "dpo")
    process = launch(config, 1, stage=("finetune", "dpo"), wait=False)
    deadline = time.monotonic() + 300
    while (
        not (run / "metrics.jsonl").is_file()
        or len((run / "metrics.jsonl").read_text().splitlines()) < 3
    ):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0, output[-3000:]  # torchrun reports a worker that exited 75
    assert json.loads((run / "manifest.json").read_text())["status"] == "stopped"
    reference = (run / "reference_logps.pt").read_bytes()
    result = launch(config, 1, stage=("finetune", "dpo"))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "resumed from" in result.stdout
    assert (run / "reference_logps.pt").read_bytes() == reference

    summary = json.loads((run / "manifest.json").read_text())["summary"]
    assert summary["data"]["train"]["rejected"] == {"unknown_shape": 1}
    # Before the first update the policy is the reference: every margin is zero. The training
    # figures are taken on the pairs the step trains on, before its update.
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in steps] == list(range(1, len(steps) + 1))
    assert abs(steps[0]["reward_margin"]) < 1e-4 and steps[0]["loss"] == pytest.approx(
        0.6931, abs=1e-3
    )
    assert steps[-1]["reward_margin"] > 1.0 and steps[-1]["reward_accuracy"] >= 0.75
    history = evaluations(run)
    assert history[0]["step"] == 0 and abs(history[0]["reward_margin"]) < 1e-4
    assert {"reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"} <= history[
        -1
    ].keys()
    assert (run / "reference_logps.pt").is_file()
    # The same W&B integration as pretraining (an offline run per launch, one run id): the
    # train/ and eval/ figures in the history.
    keys = {
        item.key or "/".join(item.nested_key)
        for records in offline_runs(run)
        for row in records_of(records, "history")
        for item in row.item
    }
    assert {
        "train/reward_margin",
        "train/reward_accuracy",
        "eval/reward_margin",
        "train/loss",
    } <= keys


@pytest.mark.slow
def test_mixtral_lora_reports_expert_balance_and_merges(kinoe_model_dir, tmp_path):
    from safetensors.torch import load_file
    from test_pretrain_train import launch

    from convert.hf_write import write_hf_directory
    from convert.sources import module_source
    from models import FAMILIES

    family = FAMILIES["mixtral"]
    args = family.presets["mixtral_tiny"]()
    args = type(args).model_validate({**args.model_dump(), "max_seq_len": 512})
    torch.manual_seed(0)
    model_dir = tmp_path / "mixtral"
    write_hf_directory(
        module_source("mixtral", family.model_type(args), {"kind": "test"}),
        model_dir,
        "fp32",
        kinoe_model_dir,
        10**9,
    )
    _, dev = llm_jp_eval_train_dev(JCQA, JGLUE, 42)
    data = write_jsonl(tmp_path / "jcqa.jsonl", jaster_jcqa(dev[:16]))
    config = write_finetune_config(
        tmp_path,
        "mixtral",
        model_dir,
        [data],
        model={"lora": {"enabled": True, "rank": 4, "alpha": 8}},
        train={"epochs": 1},
        monitor={"log_interval": 1},
    )
    result = launch(config, 1, stage=("finetune", "sft"))
    assert result.returncode == 0, result.stdout[-4000:]
    # The experts are stacked tensors, not linear layers: LoRA adapts attention only, and says so.
    assert "down_proj, gate_proj, up_proj are not linear layers" in result.stdout

    run = finetune_run(config, "sft")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(step["moe/aux_loss"] > 0 and "moe/load_cv" in step for step in steps)
    base, tuned = (
        load_file(model_dir / "model.safetensors"),
        load_file(run / "model" / "model.safetensors"),
    )
    changed = {name for name in base if not torch.equal(base[name], tuned[name])}
    assert changed and all("self_attn" in name for name in changed), sorted(changed)[:4]


# ------------------------------------------------------------------- bad input: what the user sees
#
# The matrix of tests/test_tokenizer_stage.py and tests/test_eval.py for `kinoe finetune sft`'s
# data.train (docs/reliability.md, "Bad input"): one `error:` line and a non-zero exit code, or
# the bad records counted by reason, the first named file:line in a warning, set aside in
# rejected.jsonl, and every good record kept. The data are read and counted before the model
# is built; so that no row trains, the rows that count give the config an architecture
# override fine-tuning refuses when it builds the model (model.overrides.hidden_size), and the
# run stops there, right after counting.

GOOD_EXAMPLES = 6
STOP = "model.overrides.hidden_size: fine-tuning keeps the starting model's architecture"


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Mistral with the project's tokenizer and chat template (tests/test_eval.py)."""
    from test_eval import build_tokenizer, mistral, save

    tokenizer_dir, _ = build_tokenizer(tmp_path_factory.mktemp("ft_tokenizer"))
    return save(mistral(), tokenizer_dir, tmp_path_factory.mktemp("ft_model"))


def examples(count: int, start: int = 0) -> list[dict]:
    """JCommonsenseQA validation questions as prompt/completion records."""
    records = JCQA.read(JGLUE / "jcommonsenseqa-valid.json").records[start : start + count]
    return [
        {
            "prompt": r.fields["question"] + "\n答え：",
            "completion": r.fields[f"choice{r.fields['label']}"],
        }
        for r in records
    ]


def example_lines(records: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def among_good_examples(*bad: bytes) -> dict[str, bytes]:
    good = example_lines(examples(GOOD_EXAMPLES)).splitlines(keepends=True)
    return {"good.jsonl": b"".join(good[:3] + list(bad) + good[3:])}


def truncated_examples_gz() -> dict[str, bytes]:
    packed = gzip.compress(example_lines(examples(200, start=GOOD_EXAMPLES)))
    return {
        "good.jsonl": example_lines(examples(GOOD_EXAMPLES)),
        "other.jsonl.gz": packed[: len(packed) // 2],
    }


# name -> (files of the data folder, config changes, expected: exit code and the error's words,
# or (records rejected by reason, words of the first rejection))
FINETUNE_MATRIX = {
    "empty file": (lambda: {"empty.jsonl": b""}, {}, (1, "data.train: no record in")),
    "invalid UTF-8": (
        lambda: among_good_examples(b'{"prompt": "caf\xe9", "completion": "x"}\n'),
        {},
        ({"invalid_utf8": 1}, "good.jsonl:4: not UTF-8 (byte 15)"),
    ),
    "Shift_JIS file": (
        lambda: {
            "good.jsonl": example_lines(examples(GOOD_EXAMPLES)),
            "sjis.jsonl": example_lines(examples(3, start=50)).decode().encode("cp932", "replace"),
        },
        {},
        ({"invalid_utf8": 3}, "sjis.jsonl:1: not UTF-8 (byte 12) but reads as Shift_JIS"),
    ),
    "truncated .gz": (
        truncated_examples_gz,
        {},
        ({"corrupt_file": 1}, "the file cannot be read from this line on"),
    ),
    "malformed record": (
        lambda: among_good_examples('{"prompt": "途中で切れ\n'.encode()),
        {},
        ({"not_json": 1}, "good.jsonl:4: not JSON (Invalid control character"),
    ),
    "wrong field type": (
        lambda: among_good_examples(b'{"prompt": 42, "completion": "x"}\n', b"[1, 2]\n"),
        {},
        ({"unknown_shape": 2}, "good.jsonl:4: prompt is a int, not text"),
    ),
    "50 MB record": (
        lambda: among_good_examples(
            example_lines([{"prompt": "問" * (50 * 2**20 // 3), "completion": "答"}])
        ),
        {},
        ({"too_long": 1}, "good.jsonl:4: 17,476,283 characters, more than an example may have"),
    ),
    "missing file": (lambda: {}, {"data": {"train": ["nowhere"]}}, (1, "input data.train.0 = ")),
    "number as a string": (
        lambda: among_good_examples(),
        {"train": {"global_batch_size": "2", "micro_batch_size": 1}},
        (2, "global_batch_size must be an integer, not the string '2'"),
    ),
}


@pytest.mark.parametrize("case", list(FINETUNE_MATRIX))
def test_bad_input_to_finetune_sft(case, small_model_dir, tmp_path, kinoe):
    files, changes, expected = FINETUNE_MATRIX[case]
    data = tmp_path / "data"
    data.mkdir()
    for name, content in files().items():
        (data / name).write_bytes(content)
    settings = {
        "run": {"root": str(tmp_path / "runs"), "name": "bad"},
        "model": {"path": str(small_model_dir), "overrides": {"hidden_size": 32}},
        "data": {"train": [str(data)], "max_length": 256, "eval_fraction": 0},
        "train": {"global_batch_size": 2, "micro_batch_size": 1},
    }
    for section, values in changes.items():
        settings[section].update(values)
    if case == "missing file":
        settings["data"]["train"] = [str(tmp_path / "nowhere")]
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(settings, allow_unicode=True))
    # The process's distributed settings, given here so that none outlives the run.
    distributed = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}
    outcome = kinoe("finetune", "sft", "-c", config, env=distributed)
    [error] = error_lines(outcome) or [""]
    if isinstance(expected[0], int):
        code, words = expected
        assert outcome.returncode == code and len(error_lines(outcome)) == 1, outcome.stderr
        assert words in error, error
        return
    rejected, first = expected
    # Stopped where the model is built: after the data were counted, before any training.
    assert outcome.returncode == 1 and len(error_lines(outcome)) == 1, outcome.stderr
    assert STOP in error, error
    total = sum(rejected.values())
    warning = next(line for line in outcome.stderr.splitlines() if "records rejected" in line)
    reasons = ", ".join(f"{reason} {count}" for reason, count in rejected.items())
    assert f"({reasons}), the first " in warning and first in warning, warning
    read = int(warning.split(f"data.train: {total} of ")[1].split()[0])
    set_aside = (tmp_path / "runs/finetune/bad/sft/rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["reason"] for line in set_aside] == [
        r for r, n in rejected.items() for _ in range(n)
    ]
    # A huge record is set aside as its start and size, not copied whole.
    assert all(len(line) < 2 * KEPT_RECORD_CHARACTERS for line in set_aside)
    if case == "50 MB record":
        entry = json.loads(set_aside[0])
        assert entry["record_start"].startswith('{"prompt": "問問')
        assert entry["record_characters"] > 17_000_000 and "record" not in entry
    # Every good record was kept: read = kept + rejected, and kept is every good example
    # (and, for the damaged .gz, the examples before the damage).
    if case == "truncated .gz":
        assert read - total > GOOD_EXAMPLES
    else:
        assert read - total == GOOD_EXAMPLES
