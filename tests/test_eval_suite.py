"""The llm-jp-eval suite on the real files in ../shared/data/eval: every task's records, bad data,
generation limits in the model's own tokens, categories, task lists, and one run end to end.

The end-to-end run uses the tiny model `kinoe pretrain` trains for the eval and finetune tests
(the session fixture ``kinoe_model_dir``), so its tokenizer is a kinoe-trained SentencePiece one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import ConfigError, KinoeError
from common.run import load_stage_config, run_stage
from eval.answer_length import MARGIN, answer_length
from eval.categories import CATEGORIES, category_scores
from eval.cli import STEPS
from eval.config import EvalConfig
from eval.data import TaskSource, load_task, task_source
from eval.model import LoadedModel
from eval.tasks import REGISTRY
from eval.tasks.jnli import LABELS as JNLI_LABELS
from eval.tasks.jsick import TASK as JSICK
from finetune.config import FinetuneConfig

from conftest import SHARED_DATA

EVAL_DATA = SHARED_DATA / "eval"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "eval" / "llm_jp_eval.yaml"


def needs_data() -> None:
    if not EVAL_DATA.is_dir():
        pytest.skip(f"real data folder {EVAL_DATA} is absent (see ../shared/data/SOURCES.md)")


def suite_config(*overrides: str) -> EvalConfig:
    data = [f"data_dir={EVAL_DATA}", f"jglue_dir={EVAL_DATA / 'jglue'}", "model=/m"]
    return load_stage_config(EvalConfig, CONFIG, [*data, *overrides])


def test_every_task_reads_the_real_files():
    needs_data()
    config = suite_config()
    assert len(config.dataset_tasks) == 12
    loaded = {}
    # Generation for every task; log-likelihood renders the same records (JMMLU's letters here,
    # every mode in the end-to-end run).
    for name, scoring in [(name, "generation") for name in config.dataset_tasks] + [
        ("jmmlu", "loglik")
    ]:
        task = REGISTRY[name]
        data = load_task(task, scoring, config.source_for(name), "test", config.shots_for(name), 42)
        assert data.examples and len(data.shots) == config.shots_for(name), (name, scoring)
        for sample in data.examples + data.shots:
            assert sample.input and sample.output
            assert not sample.choices or sample.output in sample.choices
        loaded[name, scoring] = data
    counts = {name: len(loaded[name, "generation"].examples) for name in config.dataset_tasks}
    # SOURCES.md's record counts; JMMLU and JSeM lose 32 each to the few-shot pool.
    assert counts == {
        "jcommonsenseqa": 1119, "jnli": 2434, "jsquad": 4442, "jsts": 1457, "jmmlu": 5708 - 32,
        "jemhopqa": 103, "niilc": 800 - 5, "jsick": 5000, "janli": 13680, "jamp": 9950,
        "jsem": 17293 - 32 - 10 - 4555, "mawps": 809,
    }  # fmt: skip
    jsem = loaded["jsem", "generation"]
    # Acceptability problems are not entailment problems; ten have no answer at all.
    assert jsem.excluded == 4555 and len(jsem.malformed) == 10
    assert all(line.endswith(".xml:" + line.split(".xml:")[1]) for line in jsem.malformed)
    assert jsem.malformed[0].split(": ")[-1] == "empty gold answer"
    assert {s.output for s in jsem.examples} == {"yes", "no", "unknown", "undef"}
    mmlu = loaded["jmmlu", "loglik"]
    assert mmlu.examples[0].choices == ("A", "B", "C", "D")
    assert mmlu.examples[0].input.startswith("質問：") and "\n選択肢：A." in mmlu.examples[0].input
    # MAWPS-ja's shots answer with the number their chain of thought ends on.
    mawps = loaded["mawps", "generation"]
    assert all(s.output.replace(".", "").isdigit() for s in mawps.shots)
    assert not mawps.examples[0].input.endswith("解答：")
    assert (
        loaded["niilc", "generation"].examples[1].output
        == "愛知県、岐阜県、三重県、静岡県、愛知県、岐阜県、三重県"
    )
    assert loaded["jemhopqa", "generation"].examples[0].output == "YES"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_malformed_records_are_one_line_each_and_skipped(tmp_path):
    header = "pair_ID\tsentence_A_Ja\tsentence_B_Ja\tentailment_label_Ja\n"
    write(
        tmp_path / "jsick" / "test.tsv",
        header
        + "1\t犬が走る\t動物が走る\tentailment\n"
        + "2\t猫が寝る\tneutral\n"  # a column short
        + "3\t鳥が飛ぶ\t鳥が泳ぐ\tmaybe\n"  # not a label
        + "4\t人が歩く\t人が動く\tentailment\n",
    )
    data = load_task(JSICK, "loglik", task_source(JSICK, tmp_path), "test", 0, 42)
    assert [s.id for s in data.examples] == ["1", "4"]
    test_file = tmp_path / "jsick" / "test.tsv"
    assert data.malformed == [
        f"{test_file}:3: 3 columns, the header has 4",
        f"{test_file}:4: label 'maybe' is not one of entailment, contradiction, neutral",
    ]
    # A JSON array with a non-object and a record lacking its answer; JMMLU with a bad letter.
    jemhopqa = REGISTRY["jemhopqa"]
    write(
        tmp_path / "jemhopqa" / "dev_ver1.1.json",
        '[\n  {"qid": "a", "question": "首都は？", "answer": "東京"},\n  7,\n'
        '  {"qid": "b",\n   "question": "川は？"}\n]',
    )
    data = load_task(jemhopqa, "generation", task_source(jemhopqa, tmp_path), "test", 0, 42)
    path = tmp_path / "jemhopqa" / "dev_ver1.1.json"
    assert len(data.examples) == 1
    assert data.malformed == [f"{path}:3: not a JSON object", f"{path}:4: no field 'answer'"]
    jmmlu = REGISTRY["jmmlu"]
    write(
        tmp_path / "jmmlu" / "a.csv", '"一は？\n(二行)",1,2,3,4,A\n二は？,1,2,3,4,E\n三は？,1,2\n'
    )
    data = load_task(
        jmmlu, "loglik", TaskSource(tmp_path / "jmmlu", {"test": "*.csv"}), "test", 0, 42
    )
    csv_path = tmp_path / "jmmlu" / "a.csv"
    assert len(data.examples) == 0 and len(data.shots) == 0  # the one good record went to the pool
    assert data.malformed == [
        f"{csv_path}:3: label 'E' is not one of A, B, C, D",
        f"{csv_path}:4: 3 columns, expected 6",
    ]


def test_a_file_serving_both_splits_is_divided_by_its_split_column(tmp_path):
    janli = REGISTRY["janli"]
    header = "\tsentence_A_Ja\tsentence_B_Ja\tentailment_label_Ja\tsplit\n"
    rows = [
        f"{i}\t文{i}\t文{i}だ\tentailment\t{'test' if i % 3 == 0 else 'train'}\n" for i in range(9)
    ]
    write(tmp_path / "janli" / "janli.tsv", header + "".join(rows))
    source = task_source(janli, tmp_path)  # upstream: janli.tsv for both splits
    data = load_task(janli, "loglik", source, "test", 2, 42)
    assert [s.id for s in data.examples] == ["0", "3", "6"]
    assert {s.id for s in data.shots} <= {"1", "2", "4", "5", "7", "8"}
    # A file named for one split only is read whole.
    whole = task_source(janli, tmp_path, files={"test": "janli.tsv", "train": "other.tsv"})
    assert len(load_task(janli, "loglik", whole, "test", 0, 42).examples) == 9


def test_generation_limit_fits_every_jnli_label_in_a_kinoe_tokenizer(kinoe_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(kinoe_model_dir)
    loaded = LoadedModel(None, tokenizer, None, 1024, None, {})
    labels = list(JNLI_LABELS)
    golds = labels * 5
    limit = answer_length(loaded.encode_answers, golds, REGISTRY["jnli"].output_length)
    prompt = "### 指示:\n前提と仮説の関係を回答してください。\n\n### 入力:\n前提：犬\n仮説：猫\n\n### 応答:\n"
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for label in labels:
        # The tokens generating the label after a real prompt end take: all must fit the limit.
        full = tokenizer(prompt + label, add_special_tokens=False)["input_ids"]
        assert full[: len(base)] == base
        assert len(full) - len(base) <= limit.max_new_tokens, label
    assert limit.max_new_tokens == max(3, limit.longest_gold_tokens + MARGIN)
    assert limit.golds_longer_than_limit == 0
    # llm-jp-eval's 3 tokens, fixed, cut every label of this tokenizer: counted, never silent.
    fixed = answer_length(loaded.encode_answers, golds, 3, fixed=3)
    assert limit.longest_gold_tokens > 3 and fixed.golds_longer_than_limit == len(golds)
    assert fixed.summary()["rule"] == "task_max_new_tokens"


def test_categories_name_what_they_lack():
    results = [
        {"task": "jnli", "scoring": "generation", "metrics": {"exact_match": 0.5}},
        {"task": "jnli", "scoring": "loglik", "metrics": {"acc": 0.9}},
        {"task": "jsick", "scoring": "generation", "metrics": {"exact_match": 0.3}},
        {"task": "jsquad", "scoring": "generation", "metrics": {"char_f1": 0.6}},
        {"task": "jsts", "scoring": "generation", "metrics": {"pearson": 0.2, "spearman": 0.4}},
        {"task": "jamp", "scoring": "generation", "metrics": {}, "skipped": "no valid record"},
    ]
    summary = category_scores(results)
    nli = summary["categories"]["NLI"]
    assert nli["score"] == pytest.approx(0.4) and nli["missing"] == ["jamp", "janli", "jsem"]
    assert summary["categories"]["STS"]["score"] == pytest.approx(0.3)
    average = summary["AVG"]
    assert average["over"] == ["NLI", "RC", "STS"] and average["score"] == pytest.approx(1.3 / 3)
    assert "QA" in average["missing_categories"] and average["incomplete_categories"] == ["NLI"]
    assert not average["comparable_with_llm_jp_eval"]
    assert {d for members in CATEGORIES.values() for d, _ in members} >= set(REGISTRY)


def test_task_lists_take_any_single_task_or_refuse_in_one_line(tmp_path):
    needs_data()
    for name in REGISTRY:
        config = suite_config(f"tasks=[{name}]")
        assert config.dataset_tasks == [name] and config.source_for(name).paths(
            REGISTRY[name], "test"
        )
        jaster = {"run": {"root": str(tmp_path)}, "jaster": {"tasks": [name]}}
        if "train" in REGISTRY[name].files:
            assert FinetuneConfig.model_validate(jaster).jaster.tasks == [name]
        else:
            with pytest.raises(ValueError, match=f"{name} has no train split"):
                FinetuneConfig.model_validate(jaster)
    with pytest.raises(ConfigError, match="task_files names unknown tasks: jcola"):
        suite_config("task_files.jcola.test=x.tsv")
    with pytest.raises(KinoeError, match=r"task_files\.jmmlu: jmmlu has no train split"):
        suite_config("task_files.jmmlu.train=x.csv").source_for("jmmlu")
    with pytest.raises(KinoeError, match="jmmlu has no dev split"):
        load_task(REGISTRY["jmmlu"], "loglik", suite_config().source_for("jmmlu"), "dev", 0, 42)
    with pytest.raises(KinoeError, match=r"jsick/nope.tsv not found; set task_files.jsick.test"):
        suite_config("task_files.jsick.test=nope.tsv").source_for("jsick").paths(JSICK, "test")


def test_suite_end_to_end_on_the_tiny_trained_model(kinoe_model_dir, tmp_path):
    needs_data()
    bad = write(tmp_path / "bad.tsv", "pair_ID\tsentence_A_Ja\n1\tだけ\n")
    config = suite_config(
        f"run.root={tmp_path / 'runs'}", "run.name=suite", f"model={kinoe_model_dir}",
        "device=cpu", "dtype=float32", "limit=2", "batch_size=4", "shots=1",
        f"task_files.jsick.test={bad}", "task_max_new_tokens.niilc=4",
    )  # fmt: skip
    result = run_stage(STEPS["run"], config)
    assert result.status == "complete"
    report = json.loads((result.run_dir / "report.json").read_text())
    by_pair = {(r["task"], r["scoring"]): r for r in report["results"]}
    expected = {(name, s) for name in REGISTRY for s in REGISTRY[name].scorings()}
    assert set(by_pair) == expected
    skipped = [pair for pair, r in by_pair.items() if r.get("skipped")]
    assert sorted(skipped) == [("jsick", "generation"), ("jsick", "loglik")]
    assert by_pair["jsick", "loglik"]["malformed_records"] == [f"{bad}:2: no field 'sentence_B_Ja'"]
    for pair, r in by_pair.items():
        if pair[0] != "jsick":
            assert r["examples"] == 2 and r["metrics"], pair
    for name in ("jmmlu", "jsem", "janli", "jamp", "jcommonsenseqa", "jnli"):
        assert set(by_pair[name, "loglik"]["metrics"]) == {"acc", "acc_norm"}
    generated = [
        r for r in report["results"] if r["scoring"] == "generation" and not r.get("skipped")
    ]
    for r in generated:
        task = REGISTRY[r["task"]]
        assert r["decoding"]["max_new_tokens"] == r["answer_length"]["max_new_tokens"]
        if r["task"] != "niilc":
            assert r["answer_length"]["max_new_tokens"] >= task.output_length
            assert r["answer_length"]["golds_longer_than_limit"] == 0
    assert by_pair["niilc", "generation"]["answer_length"]["golds_longer_than_limit"] > 0
    categories = report["llm_jp_eval"]["categories"]
    assert categories["NLI"]["missing"] == ["jsick"] and categories["QA"]["missing"] == ["aio"]
    assert not report["llm_jp_eval"]["AVG"]["comparable_with_llm_jp_eval"]
    markdown = (result.run_dir / "report.md").read_text()
    assert "| jsick | loglik | skipped: no valid record (1 malformed)" in markdown
    assert "**Not** llm-jp-eval's AVG" in markdown and "| NLI |" in markdown
    assert "golds longer" in markdown
    assert (result.run_dir / "prompts" / "mawps-generation.txt").read_text().endswith("### 応答:\n")


def test_a_config_json_with_a_wrong_type_is_one_line(kinoe_model_dir, tmp_path):
    import logging
    import shutil

    from eval.model import load_model

    model = Path(shutil.copytree(kinoe_model_dir, tmp_path / "model"))
    fields = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**fields, "num_hidden_layers": "2"}))
    config = EvalConfig.model_validate({"model": str(model), "device": "cpu", "dtype": "float32"})
    with pytest.raises(KinoeError) as caught:
        load_model(config, logging.getLogger("kinoe.test_eval_suite"))
    message = str(caught.value)
    assert message.startswith(f"{model / 'config.json'}: ") and "\n" not in message
    assert "'num_hidden_layers' expected int, got str" in message


def test_evaluation_while_training_matches_kinoe_eval_on_the_same_weights(
    kinoe_model_dir, tmp_path, caplog
):
    """The callback on a kinoe model holding the tiny trained weights gives `kinoe eval`'s figures."""
    import logging
    import os

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.bpc import bits_per_character, prepare_windows, read_texts
    from eval.loglik import build_requests, score_choices
    from eval.metrics import choice_accuracy
    from eval.model import Batcher
    from eval.placement import inspect_placement
    from eval.tasks.base import few_shot_header, prompt
    from models.mistral.model import Mistral
    from models.mistral.state_dict import args_from_hf_config, from_hf
    from training.callbacks import RunInfo, standard_callbacks
    from training.config import EvaluationConfig, MonitorConfig
    from training.world import World

    needs_data()
    hf = AutoModelForCausalLM.from_pretrained(kinoe_model_dir, dtype=torch.float32).eval()
    args = args_from_hf_config(hf.config)
    model = Mistral(args)
    model.load_state_dict(from_hf(hf.state_dict()))
    texts = [SHARED_DATA / "corpus" / "wikipedia_ja_leads.jsonl.gz"]
    with pytest.raises(ValueError, match="jsquad has no closed answer set"):
        EvaluationConfig(interval=2, tokenizer=kinoe_model_dir, tasks=["jsquad"])
    monitor = MonitorConfig(
        evaluation=EvaluationConfig(
            interval=2, tokenizer=kinoe_model_dir, bpc_texts=texts, bpc_max_documents=3,
            tasks=["jcommonsenseqa", "jmmlu"], limit=4, shots=1,
            data_dir=EVAL_DATA, jglue_dir=EVAL_DATA / "jglue", micro_batch_size=3,
        )
    )  # fmt: skip
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{29400 + os.getpid() % 500}", rank=0, world_size=1
        )
    try:
        world = World(0, 0, 1, torch.device("cpu"), dist.group.WORLD)
        logger = logging.getLogger("kinoe.test_eval_suite")
        run = RunInfo("during", tmp_path, {}, 1, world.device, 1.0, logger)
        callbacks = standard_callbacks(monitor, run, world, model, total_steps=3)
        with caplog.at_level(logging.INFO, logger="kinoe.test_eval_suite"):
            callbacks.on_step_end(1, model)  # neither the interval nor the end
            callbacks.on_step_end(2, model)
            callbacks.on_step_end(3, model)  # the end
    finally:
        if started_here:
            dist.destroy_process_group()
    lines = [json.loads(line) for line in (tmp_path / "evaluation.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 3] and lines[0] == {**lines[1], "step": 2} | {
        "eval/seconds": lines[0]["eval/seconds"]
    }
    assert "evaluation at step 2: eval/bpc" in caplog.text
    during = lines[0]

    # kinoe eval's own scorers on the Hugging Face directory holding the same weights.
    tokenizer = AutoTokenizer.from_pretrained(kinoe_model_dir)
    loaded = LoadedModel(
        hf, tokenizer, torch.device("cpu"), args.max_seq_len, inspect_placement(hf, "cpu"), {}
    )
    batcher = Batcher(4, 4, logger)
    documents, _ = read_texts(texts, 3)
    bpc = bits_per_character(loaded, prepare_windows(loaded, documents, None), batcher, lambda n: 0)
    assert during["eval/bpc"] == pytest.approx(bpc["bpc"], rel=1e-4)
    for name in ("jcommonsenseqa", "jmmlu"):
        task = REGISTRY[name]
        source = task_source(task, EVAL_DATA, EVAL_DATA / "jglue")
        data = load_task(task, "loglik", source, "test", 1, 42)
        header = few_shot_header(task.loglik.instruction, data.shots)
        examples = data.examples[:4]
        requests = build_requests(
            loaded, [prompt(header, s) for s in examples], [s.choices for s in examples]
        )
        scores = score_choices(loaded, requests, batcher, lambda n: 0)
        figures = choice_accuracy(
            scores, [s.choices for s in examples], [s.choices.index(s.output) for s in examples]
        )
        assert during[f"eval/{name}/acc"] == figures["acc"], name
        assert during[f"eval/{name}/acc_norm"] == figures["acc_norm"], name
