"""kinoe eval on real JGLUE files: metrics against hand-computed values, log-likelihood scoring, placement, reports.

The models are tiny ``MistralForCausalLM``s built here with a kinoe tokenizer trained on the
real Wikipedia leads (vocabulary 2048): a random one, and "unigram" ones whose output is the
same fixed distribution at every position, so what the scorer must find is known exactly.
"""

from __future__ import annotations

import gzip
import http.server
import json
import logging
import math
import shutil
import threading
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from common.errors import ConfigError, KinoeError
from common.run import load_stage_config, run_stage
from eval.cli import STEPS, _shortcuts, step_dir
from eval.config import EvalConfig
from eval.data import JGLUE_FILES, download_jglue, llm_jp_eval_train_dev, load_task, subset
from eval.loglik import build_requests, score_choices
from eval.metrics import (
    char_f1,
    choice_accuracy,
    exact_match,
    normalize_prediction,
    parse_float,
    pearson,
    spearman,
    token_sort_ratio,
)
from eval.model import Batcher, LoadedModel, common_prefix, load_model
from eval.placement import check_placement, inspect_placement
from eval.prefix import layout
from eval.tasks import REGISTRY
from eval.tasks.base import few_shot_header, prompt
from launch.cli import build_parser

from conftest import SHARED_DATA, error_lines
from wandb_records import offline_runs, records_of

JGLUE = SHARED_DATA / "eval" / "jglue"
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "eval"
LOGGER = logging.getLogger("kinoe.test_eval")


# ---------------------------------------------------------------- tiny models and their tokenizer


def build_tokenizer(root: Path) -> tuple[Path, Path]:
    """Train and export a 2048-piece kinoe tokenizer on the real Wikipedia leads; (HF dir, held-out JSONL)."""
    from tokenizer import cli as tokenizer_cli
    from tokenizer.config import TokenizerConfig

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/SOURCES.md)")
    documents = root / "documents"
    documents.mkdir(parents=True)
    source = SHARED_DATA / "corpus" / "wikipedia_ja_leads.jsonl.gz"
    with (
        gzip.open(source, "rt", encoding="utf-8") as reader,
        gzip.open(documents / "wikipedia.jsonl.gz", "wt", encoding="utf-8") as writer,
    ):
        for record in map(json.loads, reader):
            document = {"id": record["id"], "text": record["text"], "source": "wikipedia"}
            writer.write(json.dumps({**document, "metadata": {}}, ensure_ascii=False) + "\n")
    config = TokenizerConfig.model_validate(
        {
            "run": {"root": str(root / "runs"), "name": "eval-tests"},
            "sample": {
                "documents": str(documents),
                "character_budget": 400_000,
                "held_out_fraction": 0.05,
                "held_out_max_documents": 40,
            },
            "trainer": {"vocab_size": 2048, "character_coverage": 0.995, "num_threads": 2},
        }
    )
    for step in ("train", "export"):
        run_stage(tokenizer_cli.STEPS[step], config)
    held_out = tokenizer_cli.step_dir(config, "train") / tokenizer_cli.HELD_OUT_FILE
    return tokenizer_cli.hf_path(config), held_out


def mistral(tie: bool = True, sliding_window: int | None = None, positions: int = 1024):
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=positions,
        sliding_window=sliding_window,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = MistralForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 6], pad_token_id=3)
    return model


def unigram(bias: torch.Tensor):
    """A model whose next-token distribution is softmax(8 * bias) at every position, whatever came before.

    Attention and MLP outputs are zero, so the residual stream is the token's embedding, which
    is the same unit vector for every token; the final norm keeps one dimension, and that
    column of the output layer is the bias.
    """
    model = mistral(tie=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = bias
    return model


def unigram_logprobs(model) -> torch.Tensor:
    """The fixed log-distribution of a ``unigram`` model."""
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9]])).logits[0, -1].log_softmax(-1)


def save(model, tokenizer_dir: Path, directory: Path) -> Path:
    model.save_pretrained(directory)
    for path in tokenizer_dir.iterdir():
        shutil.copyfile(path, directory / path.name)
    return directory


def loaded_from(model, tokenizer_dir: Path, max_length: int = 1024) -> LoadedModel:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    placement = inspect_placement(model, "cpu")
    return LoadedModel(
        model,
        tokenizer,
        torch.device("cpu"),
        max_length,
        placement,
        {"tokenizer": str(tokenizer_dir)},
    )


def token_ids(loaded: LoadedModel, text: str) -> list[int]:
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> tuple[Path, Path]:
    return build_tokenizer(tmp_path_factory.mktemp("eval_tokenizer"))


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer) -> Path:
    return tokenizer[0]


@pytest.fixture(scope="module")
def held_out(tokenizer) -> Path:
    return tokenizer[1]


@pytest.fixture(scope="module")
def random_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    return save(mistral(), tokenizer_dir, tmp_path_factory.mktemp("random_model"))


def eval_config(root: Path, name: str, model: Path, **values) -> EvalConfig:
    data = {
        "run": {"root": str(root), "name": name},
        "model": str(model),
        "device": "cpu",
        "dtype": "float32",
        "jglue_dir": str(JGLUE),
        "task_shots": {"jnli": 0, "jsquad": 0},
        "batch_size": 4,
        **values,
    }
    return EvalConfig.model_validate(data)


# ---------------------------------------------------------------- metrics, by hand


def test_char_f1_is_llm_jp_evals_token_sort_ratio():
    # Identical after processing: 「」 and 。 become spaces, which strip and split remove.
    assert token_sort_ratio("「小笠原諸島」。", "小笠原諸島") == 100
    # LCS("東京都", "東京") = 2: round(100 * 2 * 2 / 5) = 80.
    assert token_sort_ratio("東京都", "東京") == 80
    # Tokens are sorted before comparing; letters are lower-cased.
    assert token_sort_ratio("Tokyo Osaka", "osaka tokyo") == 100
    # 2 * LCS 5 / 16 characters = 62.5, which Python rounds half to even: 62.
    assert token_sort_ratio("abcdefgh", "abcdeXYZ") == 62
    # fuzzywuzzy's force_ascii deletes U+0080-U+00FF: "café" becomes "caf"; 2 * 3 / 7 -> 86.
    assert token_sort_ratio("cafe", "café") == 86
    # Two strings empty after processing are equal (100); one empty scores 0.
    assert token_sort_ratio("。", "、") == 100
    assert token_sort_ratio("", "雨季") == 0
    # Kanji, kana and the long vowel mark are word characters; ・ is not.
    assert token_sort_ratio("データ・セット", "セット データ") == 100
    assert char_f1(["東京都", "雨季"], ["東京", "雨季"]) == pytest.approx((0.8 + 1.0) / 2)


def test_generation_scoring_follows_llm_jp_eval():
    assert normalize_prediction(" ２ \n\n説明です") == "2"  # first paragraph, NFKC, stripped
    assert exact_match(["2", "1", "0"], ["2", "2", "0"]) == pytest.approx(2 / 3)
    assert (parse_float("類似度は3.5です"), parse_float("なし"), parse_float("1.2.3")) == (
        3.5,
        -2.0,
        -2.0,
    )
    golds = ["1.0", "2.0", "3.0", "4.0"]
    # Hand-computed: x = (1,2,3,4); y = (1,2,4,3): cov 1.0, var 1.25 each -> r = 0.8.
    assert pearson(["1", "2", "4", "3"], golds) == pytest.approx(0.8)
    # Ranks swap 3 and 4: 1 - 6 * (1 + 1) / (4 * 15) = 0.8.
    assert spearman(["1", "2", "4", "3"], golds) == pytest.approx(0.8)
    # Constant predictions have no correlation: NaN counts as 0, as in llm-jp-eval.
    assert pearson(["3", "3", "3", "3"], golds) == 0.0
    # An unparseable prediction reads as -2.0: y = (-2, 2, 3, 4), deviations from 1.75 give
    # covariance sum 9.5, squares 5 (x) and 20.75 (y).
    assert pearson(["x", "2", "3", "4"], golds) == pytest.approx(9.5 / math.sqrt(5 * 20.75))


def test_acc_and_acc_norm():
    logliks = [[-3.0, -4.0], [-6.0, -5.0], [-2.0, -2.0]]
    choices = [["ab", "abcd"], ["a", "abcdef"], ["x", "y"]]
    # acc: argmax 0, 1, 0 (a tie goes to the first). acc_norm: -1.5 vs -1.0 -> 1; -6 vs -0.83 -> 1; 0.
    assert choice_accuracy(logliks, choices, [0, 1, 0]) == {
        "acc": 1.0,
        "acc_norm": pytest.approx(2 / 3),
    }


# ---------------------------------------------------------------- data and prompts


def test_llm_jp_eval_splits_few_shots_and_prompt():
    if not JGLUE.is_dir():
        pytest.skip(f"{JGLUE} is absent")
    task = REGISTRY["jcommonsenseqa"]
    train, dev = llm_jp_eval_train_dev(task, JGLUE, 42)
    assert (len(train), len(dev)) == (8045, 894)  # 90/10 of 8,939
    again = load_task(task, "generation", JGLUE, "test", 4, 42)
    data = load_task(task, "generation", JGLUE, "test", 4, 42)
    assert data.shots == again.shots and len(data.shots) == 4
    assert data.shots[0].id == str(train[0]["q_id"])
    assert len(data.examples) == 1119 and data.examples[0].id == "8939"
    header = few_shot_header(task.generation.instruction, data.shots)
    text = prompt(header, data.examples[0])
    assert text.startswith(
        "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
        "\n\n### 指示:\n質問と回答の選択肢を入力として受け取り、選択肢から回答を選択してください。"
    )
    assert text.endswith(
        "\n\n### 入力:\n質問：電子機器で使用される最も主要な電子回路基板の事をなんと言う？\n"
        "選択肢：0.掲示板,1.パソコン,2.マザーボード,3.ハードディスク,4.まな板\n\n### 応答:\n"
    )
    assert text.count("### 応答:\n") == 5 and f"### 応答:\n{data.shots[3].output}\n\n" in text
    assert data.examples[0].output == "2"
    loglik = load_task(task, "loglik", JGLUE, "test", 4, 42)
    assert loglik.examples[0].output == "マザーボード" and len(loglik.examples[0].choices) == 5
    dev_data = load_task(task, "generation", JGLUE, "dev", 0, 42)
    assert len(dev_data.examples) == 894
    with pytest.raises(KinoeError, match=r"jnli-train.json.*task_shots.jnli=0"):
        load_task(REGISTRY["jnli"], "loglik", JGLUE, "test", 4, 42)
    squad = load_task(REGISTRY["jsquad"], "generation", JGLUE, "test", 0, 42)
    assert len(squad.examples) == 4442 and squad.examples[0].input.startswith("文章：梅雨 [SEP] ")


def test_limit_and_fraction_pick_deterministic_subsets():
    assert subset(1119, 5, None, 42) == [0, 1, 2, 3, 4]
    tenth = subset(1119, None, 0.1, 42)
    assert len(tenth) == 112 and tenth == sorted(tenth) == subset(1119, None, 0.1, 42)
    assert tenth != subset(1119, None, 0.1, 7)
    assert subset(3, None, 0.1, 42) == [subset(3, None, 0.1, 42)[0]]  # at least one example
    config = load_stage_config(EvalConfig, None, ["model=/m", "limit=3", "fraction=null"])
    assert config.limit == 3
    with pytest.raises(ConfigError, match="limit or fraction"):
        load_stage_config(EvalConfig, None, ["limit=3", "fraction=0.1"])
    with pytest.raises(ConfigError, match="unknown tasks jcola"):
        load_stage_config(EvalConfig, None, ["tasks=[jnli,jcola]"])
    # The command's flags become the same overrides, after (and over) the key=value ones.
    args = build_parser("eval").parse_args(
        [
            "eval",
            "run",
            "-c",
            str(CONFIGS / "jglue.yaml"),
            "--fraction",
            "0.1",
            "--tasks",
            "jnli,jsts",
            "model=/m",
            "limit=5",
        ]
    )
    config = load_stage_config(EvalConfig, args.config, [*args.overrides, *_shortcuts(args)])
    assert (config.fraction, config.limit, config.tasks) == (0.1, None, ["jnli", "jsts"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_named_configs_validate(path):
    config = load_stage_config(EvalConfig, path, ["model=/models/some-model"])
    assert config.run.name == path.stem


# ---------------------------------------------------------------- log-likelihood


def full_recompute(model, context: list[int], continuation: list[int]) -> float:
    """The plain way: context and choice in one row, nothing shared."""
    with torch.no_grad():
        logprobs = model(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
    return sum(logprobs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))


def test_shared_context_scores_equal_full_recomputation(tokenizer_dir):
    if not JGLUE.is_dir():
        pytest.skip(f"{JGLUE} is absent")
    # A sliding window shorter than the prompts exercises the windowed cache too.
    model = mistral(sliding_window=64)
    loaded = loaded_from(model, tokenizer_dir, max_length=300)
    data = load_task(REGISTRY["jcommonsenseqa"], "loglik", JGLUE, "test", 2, 42)
    examples = data.examples[:7]
    header = few_shot_header(REGISTRY["jcommonsenseqa"].loglik.instruction, data.shots)
    texts = [prompt(header, sample) for sample in examples]
    texts[3] = texts[3][-60:]  # a much shorter prompt in the batch: left padding
    requests = build_requests(loaded, texts, [s.choices for s in examples])
    assert any(r.truncated for r in requests) and not requests[3].truncated
    assert all(len(r.context) + max(map(len, r.continuations)) <= 300 for r in requests)
    scores = score_choices(loaded, requests, Batcher(3, 3, LOGGER))
    for request, row in zip(requests, scores, strict=True):
        expected = [full_recompute(model, request.context, c) for c in request.continuations]
        assert row == pytest.approx(expected, abs=2e-4)
    # The choice's tokens are exactly those of the choice text after the prompt.
    [whole] = loaded.encode([texts[0] + examples[0].choices[1]])
    assert (
        requests[0].context[-5:] + requests[0].continuations[1]
        == whole[-5 - len(requests[0].continuations[1]) :]
    )


def few_shot_prompts(count: int, shots: int = 4) -> tuple[list[str], list]:
    """The first ``count`` JCommonsenseQA prompts under one few-shot header, and their examples."""
    task = REGISTRY["jcommonsenseqa"]
    data = load_task(task, "loglik", JGLUE, "test", shots, 42)
    header = few_shot_header(task.loglik.instruction, data.shots)
    return [prompt(header, sample) for sample in data.examples[:count]], data.examples[:count]


def test_batched_encoding_gives_the_tokenizers_own_ids(tokenizer_dir):
    # LoadedModel.encode calls the Rust tokenizer directly for speed; the ids must be those
    # transformers' tokenizer gives each text alone: BOS, Japanese prompts, choices, edge cases.
    if not JGLUE.is_dir():
        pytest.skip(f"{JGLUE} is absent")
    loaded = loaded_from(mistral(), tokenizer_dir)
    texts, examples = few_shot_prompts(20)
    texts += [t + c for t, s in zip(texts, examples, strict=True) for c in s.choices]
    texts += ["", " ", "\n\n", "ＡＢＣ　全角", "<s>", "絵文字🙂と記号①"]
    expected = [list(loaded.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    assert loaded.encode(texts) == expected
    assert expected[0][0] == loaded.bos_id


def test_encoding_follows_a_wrapper_that_changes_the_ids(tokenizer_dir):
    # A tokenizer whose Python side changes what the Rust tokenizer gives (here: a marker id
    # after BOS) is encoded through that Python side, for every text.
    real = loaded_from(mistral(), tokenizer_dir).tokenizer

    class Marking:
        backend_tokenizer = real.backend_tokenizer

        def __call__(self, texts, add_special_tokens):
            ids = real(texts, add_special_tokens=add_special_tokens)["input_ids"]
            return {"input_ids": [[row[0], 7, *row[1:]] for row in ids]}

    loaded = LoadedModel(None, Marking(), torch.device("cpu"), 64, None, {})
    texts = ["質問です。", "答えは2です。"]
    assert loaded.encode(texts) == [[i[0], 7, *i[1:]] for i in real(texts)["input_ids"]]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3, 4], [1, 2]) == 2
    assert common_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert common_prefix([], [1]) == 0
    assert common_prefix([7], [8]) == 0


@pytest.mark.parametrize("sliding_window", [None, 64])
def test_a_shared_few_shot_header_runs_once_and_scores_as_recomputed(tokenizer_dir, sliding_window):
    if not JGLUE.is_dir():
        pytest.skip(f"{JGLUE} is absent")
    model = mistral(sliding_window=sliding_window)
    loaded = loaded_from(model, tokenizer_dir)
    texts, examples = few_shot_prompts(6)
    texts[4] = texts[4] + "補足" * 30  # a longer question: left padding after the header
    requests = build_requests(loaded, texts, [s.choices for s in examples])
    batch = layout([r.context for r in requests], loaded.pad_id, loaded.full_attention)
    # A window shorter than max_length: every prompt whole (a windowed cache holds the window's
    # last tokens only, not a prefix run on its own).
    assert (batch.shared >= 200) == (sliding_window is None)
    assert not any(r.truncated for r in requests)
    calls = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    scores = score_choices(loaded, requests, Batcher(6, 6, LOGGER))
    hook.remove()
    # The header once (one row), then only the questions after it, then the choices.
    if batch.shared:
        assert calls[0] == (1, batch.shared)
        assert calls[1][1] == batch.ids.shape[1] < batch.shared / 2
    else:
        assert calls[0][0] == len(requests)
    for request, row in zip(requests, scores, strict=True):
        expected = [full_recompute(model, request.context, c) for c in request.continuations]
        assert row == pytest.approx(expected, abs=2e-4)


def test_generation_stops_at_the_blank_line_that_ends_an_answer(tokenizer_dir):
    from eval.generate import Decoding, generate
    from eval.metrics import ANSWER_END, normalize_prediction

    probe = loaded_from(mistral(), tokenizer_dir)
    newline = token_ids(probe, "答\n")[-1]
    assert probe.tokenizer.decode([newline, newline]) == ANSWER_END
    bias = torch.zeros(2048)
    bias[newline] = 4.0  # greedy: a newline after every token
    model = unigram(bias)
    loaded = loaded_from(model, tokenizer_dir)
    # The last prompt ends in a newline, as every task prompt does: only generated text counts
    # towards the blank line (transformers' own stop strings would stop at its first newline).
    texts = ["質問です。", "もう一つの長い質問です。", "### 応答:\n"]
    prompts = [token_ids(loaded, text) for text in texts]
    assert prompts[-1][-1] == newline
    steps = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kw: steps.append(kw["input_ids"].shape), with_kwargs=True
    )
    stopped = generate(
        loaded, prompts, Decoding(20, stop_strings=(ANSWER_END,)), Batcher(3, 3, LOGGER)
    )
    hook.remove()
    # The prompt pass and one step per token; stopped at the blank line, not at the limit.
    assert stopped == [ANSWER_END] * 3, stopped
    assert len(steps) == 2, steps
    whole = generate(loaded, prompts, Decoding(20), Batcher(3, 3, LOGGER))
    assert whole == [ANSWER_END * 10] * 3
    assert [normalize_prediction(t) for t in stopped] == [normalize_prediction(t) for t in whole]


def test_generation_after_a_shared_header_equals_generation_without(tokenizer_dir, monkeypatch):
    from eval import prefix
    from eval.generate import Decoding, generate, prompt_ids

    if not JGLUE.is_dir():
        pytest.skip(f"{JGLUE} is absent")
    loaded = loaded_from(mistral(), tokenizer_dir)
    texts, _ = few_shot_prompts(5)
    texts[2] = texts[2] + "補足" * 30
    prompts = [ids for ids, _ in prompt_ids(loaded, texts, 8)]
    assert layout(prompts, loaded.pad_id).shared >= 200
    decoding = Decoding(max_new_tokens=8)
    shared = generate(loaded, prompts, decoding, Batcher(5, 5, LOGGER))
    monkeypatch.setattr(prefix, "MIN_SHARED", 10**9)  # every prompt whole, as before sharing
    assert layout(prompts, loaded.pad_id).shared == 0
    assert shared == generate(loaded, prompts, decoding, Batcher(5, 5, LOGGER))
    assert all(shared)


def test_loglik_picks_the_choices_a_model_prefers(tokenizer_dir):
    if not JGLUE.is_dir():
        pytest.skip(f"{JGLUE} is absent")
    probe = loaded_from(mistral(), tokenizer_dir)
    task = REGISTRY["jcommonsenseqa"]
    data = load_task(task, "loglik", JGLUE, "test", 0, 42)
    header = few_shot_header(task.loglik.instruction, [])
    # Questions whose gold choice shares no token with any wrong choice, its own or the other
    # questions', so one model can prefer every gold answer at once.
    examples, gold_tokens, wrong_tokens = [], set(), set()
    candidates = data.examples[:300]
    probed = build_requests(
        probe, [prompt(header, s) for s in candidates], [s.choices for s in candidates]
    )
    for sample, request in zip(candidates, probed, strict=True):
        label = sample.choices.index(sample.output)
        gold = set(request.continuations[label])
        wrong = {t for i, c in enumerate(request.continuations) if i != label for t in c}
        if not gold & (wrong | wrong_tokens) and not wrong & gold_tokens:
            examples.append(sample)
            gold_tokens |= gold
            wrong_tokens |= wrong
    assert len(examples) >= 8
    bias = torch.zeros(2048)
    bias[sorted(gold_tokens)] = 1.0
    bias[sorted(wrong_tokens - gold_tokens)] = -1.0
    model = unigram(bias)
    loaded = loaded_from(model, tokenizer_dir)
    table = unigram_logprobs(model)
    requests = build_requests(
        loaded, [prompt(header, s) for s in examples], [s.choices for s in examples]
    )
    scores = score_choices(loaded, requests, Batcher("auto", 8, LOGGER))
    for request, row in zip(requests, scores, strict=True):
        # Each choice scores the sum of its tokens' fixed log-probabilities, computed by hand.
        assert row == pytest.approx(
            [table[c].sum().item() for c in map(torch.tensor, request.continuations)], abs=1e-4
        )
    labels = [s.choices.index(s.output) for s in examples]
    accuracy = choice_accuracy(scores, [s.choices for s in examples], labels)
    assert accuracy == {"acc": 1.0, "acc_norm": 1.0}

    # A model that prefers "neutral" gets "neutral" for every JNLI pair, in both measures.
    neutral = torch.zeros(2048)
    neutral[sorted(set(token_ids(probe, "neutral")))] = 3.0
    loaded = loaded_from(unigram(neutral), tokenizer_dir)
    pairs = load_task(REGISTRY["jnli"], "loglik", JGLUE, "test", 0, 42).examples[:12]
    header = few_shot_header(REGISTRY["jnli"].loglik.instruction, [])
    scores = score_choices(
        loaded,
        build_requests(loaded, [prompt(header, s) for s in pairs], [s.choices for s in pairs]),
        Batcher(5, 5, LOGGER),
    )
    share = sum(s.output == "neutral" for s in pairs) / len(pairs)
    assert 0 < share < 1
    assert choice_accuracy(
        scores, [s.choices for s in pairs], [s.choices.index(s.output) for s in pairs]
    ) == {
        "acc": pytest.approx(share),
        "acc_norm": pytest.approx(share),
    }


def test_greedy_generation_answers_what_the_model_prefers(tokenizer_dir):
    from eval.generate import Decoding, generate, prompt_ids

    probe = loaded_from(mistral(), tokenizer_dir)
    [two] = token_ids(probe, "2")
    bias = torch.zeros(2048)
    bias[two] = 4.0
    loaded = loaded_from(unigram(bias), tokenizer_dir, max_length=64)
    prompts = prompt_ids(loaded, ["質問" * n for n in (3, 80)], 1)
    assert [cut for _, cut in prompts] == [False, True]
    assert len(prompts[1][0]) == 63 and prompts[1][0][0] == loaded.bos_id
    outputs = generate(
        loaded, [ids for ids, _ in prompts], Decoding(max_new_tokens=1), Batcher(2, 2, LOGGER)
    )
    assert outputs == ["2", "2"]


# ---------------------------------------------------------------- bits per character


def test_bits_per_character_scores_every_token_once(tokenizer_dir, held_out):
    from eval.bpc import bits_per_character, prepare_windows, read_texts, windows

    for count, width, stride in ((10, 4, 2), (100, 16, 8), (7, 32, 16), (50, 8, 7)):
        scored = [t for _, end, first in windows(count, width, stride) for t in range(first, end)]
        assert scored == list(range(1, count))
        assert all(end - begin <= width for begin, end, _ in windows(count, width, stride))
    texts, malformed = read_texts([held_out], 3)
    assert len(texts) == 3 and malformed == 0
    model = mistral()
    full = loaded_from(model, tokenizer_dir, max_length=1024)
    windowed = loaded_from(model, tokenizer_dir, max_length=24)
    results = []
    for loaded in (full, windowed):
        prepared = prepare_windows(loaded, texts, None)
        results.append(bits_per_character(loaded, prepared, Batcher(4, 4, LOGGER)))
    # By hand, for the first text: one forward over BOS + its tokens.
    ids = [1, *token_ids(full, texts[0])]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    bits = -sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))) / math.log(2)
    one = bits_per_character(full, prepare_windows(full, texts[:1], None), Batcher(1, 1, LOGGER))
    assert one["bpc"] == pytest.approx(bits / len(texts[0]), rel=1e-5)
    assert (
        results[0]["characters"] == sum(map(len, texts))
        and results[0]["round_trip_mismatches"] == 0
    )
    assert results[1]["windows"] > results[0]["windows"] == 3
    # Shorter windows see less context, so the model can only be as good or worse on average;
    # for a random model both are near log2(2048) / characters per token.
    assert results[0]["tokens"] == results[1]["tokens"]
    assert 0.5 * results[0]["bpc"] < results[1]["bpc"] < 2 * results[0]["bpc"]


# ---------------------------------------------------------------- placement


def test_a_model_off_its_device_is_refused(tmp_path, caplog):
    from accelerate import disk_offload

    model = mistral()
    assert inspect_placement(model, "cpu").ok
    # Configured for a GPU but sitting on CPU (a silent spill, seen from the GPU's side).
    with pytest.raises(KinoeError, match=r"not on cuda .*--allow-offload") as error:
        check_placement(model, "cuda", False, LOGGER)
    assert "\n" not in str(error.value)
    # A parameter left on the meta device (what accelerate's offload does to the weights).
    meta = mistral()
    meta.lm_head.weight = torch.nn.Parameter(torch.empty_like(meta.lm_head.weight, device="meta"))
    with pytest.raises(KinoeError, match=r"lm_head.weight on meta \(offloaded\)"):
        check_placement(meta, "cpu", False, LOGGER)
    # Real accelerate disk offload: weights on meta behind hooks.
    offloaded = disk_offload(mistral(), offload_dir=tmp_path / "offload", execution_device="cpu")
    with pytest.raises(KinoeError, match=r"accelerate offload hook|meta"):
        check_placement(offloaded, "cpu", False, LOGGER)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        placement = check_placement(offloaded, "cpu", True, LOGGER)
    assert placement.offload_allowed and placement.summary()["misplaced"] > 0
    assert "OFFLOADED MODEL" in caplog.text
    with pytest.raises(KinoeError, match="sees no GPU; set device=cpu"):
        load_model(EvalConfig(model=tmp_path, device="cuda"), LOGGER)


# ---------------------------------------------------------------- the command, end to end


def test_eval_run_end_to_end_on_real_jglue(kinoe, kinoe_model_dir, held_out, tmp_path):
    if not JGLUE.is_dir():
        pytest.skip(f"{JGLUE} is absent")
    result = kinoe(
        "eval", "run", "--limit", "6", "--batch-size", "4",
        f"model={kinoe_model_dir}", "device=cpu", "dtype=float32", f"jglue_dir={JGLUE}",
        "task_shots.jnli=0", "task_shots.jsquad=0", "tasks=[jcommonsenseqa,jnli,jsquad,jsts,bpc]",
        f"bpc.texts=[{held_out}]", "bpc.max_documents=5", "run.name=tiny",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "eval" / "tiny" / "run"
    report = json.loads((run_dir / "report.json").read_text())
    pairs = [(r["task"], r["scoring"]) for r in report["results"]]
    assert pairs == [
        ("jcommonsenseqa", "loglik"),
        ("jcommonsenseqa", "generation"),
        ("jnli", "loglik"),
        ("jnli", "generation"),
        ("jsquad", "generation"),
        ("jsts", "generation"),
        ("bpc", "bpc"),
    ]
    by_pair = {(r["task"], r["scoring"]): r for r in report["results"]}
    jcqa = by_pair["jcommonsenseqa", "loglik"]
    assert (
        set(jcqa["metrics"]) == {"acc", "acc_norm"} and jcqa["examples"] == 6 and jcqa["of"] == 1119
    )
    assert jcqa["shots"] == 4 and jcqa["prompt_version"] == "llm-jp-eval-1.3+choice-text"
    generated = by_pair["jcommonsenseqa", "generation"]
    limit = generated["answer_length"]["max_new_tokens"]
    assert generated["decoding"] == {
        "do_sample": False,
        "max_new_tokens": limit,
        "stop_strings": ["\n\n"],
    }
    assert limit >= 1
    assert generated["answer_length"]["golds_longer_than_limit"] == 0
    assert set(by_pair["jsquad", "generation"]["metrics"]) == {"char_f1"}
    assert set(by_pair["jsts", "generation"]["metrics"]) == {"pearson", "spearman"}
    assert (
        by_pair["jnli", "loglik"]["shots"] == 0
        and by_pair["jnli", "loglik"]["split"] == "test (jnli-valid.json)"
    )
    assert 0 < by_pair["bpc", "bpc"]["metrics"]["bpc"] < 20
    assert all(r["wall_s"] > 0 and r["truncated_prompts"] == 0 for r in report["results"])
    assert report["model"]["sha256"] and report["model"]["parameters"] > 0
    assert report["settings"]["placement"]["misplaced"] == 0
    assert {"torch", "transformers", "kinoe"} <= set(report["versions"])
    lines = (run_dir / "predictions" / "jnli-loglik.jsonl").read_text().splitlines()
    assert len(lines) == 6 and set(json.loads(lines[0])) >= {"id", "gold", "predicted", "logliks"}
    assert (run_dir / "prompts" / "jsquad-generation.txt").read_text().endswith("### 応答:\n")
    assert "| jcommonsenseqa | loglik | acc_norm |" in (run_dir / "report.md").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "model" in manifest["inputs"]
    assert manifest["summary"]["scores"]["jnli/loglik"] == by_pair["jnli", "loglik"]["metrics"]
    assert "ETA" in (run_dir / "logs" / "eval.log").read_text()

    # The same config again is skipped; refusing a missing train file is one line.
    config = load_stage_config(EvalConfig, None, [
        f"run.root={tmp_path / 'runs'}", "run.name=tiny", f"model={kinoe_model_dir}", "device=cpu",
        "dtype=float32", f"jglue_dir={JGLUE}", "task_shots.jnli=0", "task_shots.jsquad=0",
        "tasks=[jcommonsenseqa,jnli,jsquad,jsts,bpc]", f"bpc.texts=[{held_out}]",
        "bpc.max_documents=5", "limit=6", "batch_size=1",
    ])  # fmt: skip
    assert run_stage(STEPS["run"], config).status == "skipped"
    failed = kinoe(
        "eval",
        "run",
        f"model={kinoe_model_dir}",
        "device=cpu",
        f"jglue_dir={JGLUE}",
        "tasks=[jnli]",
    )
    assert failed.returncode == 1
    [line] = error_lines(failed)
    assert f"{JGLUE}/jnli-train.json does not exist" in line and "set task_shots.jnli=0" in line


def test_truncation_wandb_and_compare(kinoe, random_model_dir, tmp_path):
    if not JGLUE.is_dir():
        pytest.skip(f"{JGLUE} is absent")
    runs = tmp_path / "runs"
    short = eval_config(
        runs, "short", random_model_dir, tasks=["jsquad"], limit=3, max_length=96,
        wandb={"enabled": True, "mode": "offline"},
    )  # fmt: skip
    assert run_stage(STEPS["run"], short).status == "complete"
    [squad] = json.loads((step_dir(short, "run") / "report.json").read_text())["results"]
    assert squad["truncated_prompts"] == 3 and squad["max_length"] == 96
    [records] = offline_runs(step_dir(short, "run"))
    [history] = records_of(records, "history")
    logged = {tuple(item.nested_key) or (item.key,): item.value_json for item in history.item}
    assert (
        logged["eval/results", "_type"] == '"table-file"' and logged["eval/results", "nrows"] == "1"
    )
    [table_file] = (step_dir(short, "run") / "wandb").glob(
        "offline-run-*/files/media/table/eval/*.json"
    )
    table = json.loads(table_file.read_text())
    assert table["columns"][:4] == ["task", "scoring", "metric", "value"]
    assert table["data"][0][:3] == ["jsquad", "generation", "char_f1"]
    summary = {item.key for s in records_of(records, "summary") for item in s.update}
    assert "eval/jsquad/generation/char_f1" in summary

    tenth = eval_config(
        runs,
        "tenth",
        random_model_dir,
        tasks=["jsquad", "jnli"],
        fraction=0.001,
        scoring=["loglik", "generation"],
    )
    assert run_stage(STEPS["run"], tenth).status == "complete"
    result = kinoe(
        "eval", "compare", str(step_dir(short, "run") / "report.json"), str(step_dir(tenth, "run")),
        "--out", str(tmp_path / "compare.md"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()
    assert table[0] == "| task | scoring | metric | short | tenth |"
    squad_row = next(line for line in table if line.startswith("| jsquad | generation | char_f1"))
    assert "≠" in squad_row  # 3 truncated examples against a 0.1% sample: not the same measurement
    assert any(line.startswith("| jnli | loglik | acc | — |") for line in table)
    assert (tmp_path / "compare.md").read_text() == result.stdout
    bad = kinoe(
        "eval", "compare", str(step_dir(short, "run") / "report.md"), str(step_dir(tenth, "run"))
    )
    assert bad.returncode == 1 and len(error_lines(bad)) == 1


def test_download_checks_pinned_hashes(tmp_path):
    if not JGLUE.is_dir():
        pytest.skip(f"{JGLUE} is absent")
    served: dict[str, bytes] = {
        f"/datasets/{upstream}": (JGLUE / name).read_bytes()
        for name, (upstream, _) in JGLUE_FILES.items()
        if (JGLUE / name).is_file()
    }

    class Files(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = served.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/datasets"
    try:
        record = download_jglue(tmp_path / "jglue", ["jnli-valid.json", "jsts-train.json"], base)
        assert all(r["pinned"] for r in record.values())
        assert (tmp_path / "jglue" / "jnli-valid.json").read_bytes() == (
            JGLUE / "jnli-valid.json"
        ).read_bytes()
        served["/datasets/jsts-v1.3/valid-v1.3.json"] = b'{"tampered": true}\n'
        with pytest.raises(KinoeError, match="not the pinned"):
            download_jglue(tmp_path / "jglue", ["jsts-valid.json"], base)
        assert not (tmp_path / "jglue" / "jsts-valid.json").exists()
    finally:
        server.shutdown()


# ---------------------------------------------------------------- bad input: what the user sees
#
# The same matrix as tests/test_tokenizer_stage.py for `kinoe eval run` (docs/reliability.md,
# "Bad input"): one `error:` line and a non-zero exit code, or a run that completes and counts,
# one line each, the records it left out, evaluating every good one.

GOOD_QUESTIONS = 6


def good_questions() -> list[bytes]:
    """The first JCommonsenseQA validation questions, as the lines of a JGLUE file."""
    lines = (JGLUE / "jcommonsenseqa-valid.json").read_bytes().splitlines(keepends=True)
    return lines[:GOOD_QUESTIONS]


def question_with(**fields) -> bytes:
    record = {**json.loads(good_questions()[0]), "q_id": 99_999, **fields}
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


def among_good(*bad: bytes) -> bytes:
    good = good_questions()
    return b"".join(good[:3] + list(bad) + good[3:])


def truncated_texts(held_out: Path) -> bytes:
    packed = gzip.compress(held_out.read_bytes())
    return packed[: len(packed) // 2]


# name -> (the file's bytes from the held-out texts, which file it is, the config's changes,
# expected: exit code and the error's words, or (records evaluated, left out, their words))
EVAL_MATRIX = {
    "empty file": (lambda held_out: b"", "test", {}, (0, 0, "")),
    "invalid UTF-8": (
        lambda held_out: among_good(
            question_with(question="caf\xe9").replace(b"caf\xc3\xa9", b"caf\xe9")
        ),
        "test",
        {},
        (GOOD_QUESTIONS, 1, "not UTF-8"),
    ),
    "Shift_JIS file": (
        lambda held_out: b"".join(good_questions()).decode().encode("cp932", "replace"),
        "test",
        {},
        (0, GOOD_QUESTIONS, "reads as Shift_JIS: convert the file"),
    ),
    "truncated .gz": (truncated_texts, "bpc", {"tasks": ["bpc"]}, None),
    "malformed record": (
        lambda held_out: among_good('{"q_id": 7, "question": "途中で切れ\n'.encode()),
        "test",
        {},
        (GOOD_QUESTIONS, 1, "not JSON"),
    ),
    "wrong field type": (
        lambda held_out: among_good(question_with(label=[1])),
        "test",
        {},
        (GOOD_QUESTIONS, 1, "not 'list'"),
    ),
    "50 MB record": (
        lambda held_out: among_good(question_with(question="問" * (50 * 2**20 // 3))),
        "test",
        {},
        (GOOD_QUESTIONS, 1, "characters, more than an example may have"),
    ),
    "missing file": (
        lambda held_out: None,
        "test",
        {},
        (1, "jcommonsenseqa-valid.json does not exist"),
    ),
    "number as a string": (
        lambda held_out: b"".join(good_questions()),
        "test",
        {"limit": "5"},
        (2, "limit must be an integer, not the string '5'"),
    ),
}


@pytest.mark.parametrize("case", list(EVAL_MATRIX))
def test_bad_input_to_eval_run(case, random_model_dir, held_out, tmp_path, kinoe):
    if not JGLUE.is_dir():
        pytest.skip(f"{JGLUE} is absent")
    contents, which, changes, expected = EVAL_MATRIX[case]
    data = contents(held_out)
    jglue = tmp_path / "jglue"
    jglue.mkdir()
    texts = tmp_path / "held_out.jsonl.gz"
    if data is not None:
        (texts if which == "bpc" else jglue / "jcommonsenseqa-valid.json").write_bytes(data)
    config = tmp_path / "bad.yaml"
    settings = {
        "run": {"root": str(tmp_path / "runs")},
        "model": str(random_model_dir),
        "device": "cpu",
        "dtype": "float32",
        "batch_size": 4,
        "jglue_dir": str(jglue),
        "tasks": ["jcommonsenseqa"],
        "scoring": ["loglik"],
        "task_shots": {"jcommonsenseqa": 0},
        "bpc": {"texts": [str(texts)]},
        **changes,
    }
    config.write_text(yaml.safe_dump(settings, allow_unicode=True))
    outcome = kinoe("eval", "run", "-c", config)
    if expected is not None and len(expected) == 2:
        code, words = expected
        assert outcome.returncode == code and len(error_lines(outcome)) == 1, outcome.stderr
        assert words in error_lines(outcome)[0], error_lines(outcome)[0]
        return
    assert outcome.returncode == 0 and not error_lines(outcome), outcome.stderr
    [result] = json.loads((tmp_path / "runs/eval/bad/run/report.json").read_text())["results"]
    if which == "bpc":
        # Every document before the damage is scored; the damaged rest is counted once.
        complete_lines = zlib.decompressobj(31).decompress(data).count(b"\n")
        assert result["examples"] == complete_lines > 0
        assert result["figures"]["unreadable_lines"] == 1
        assert "damaged files in bpc.texts were skipped" in outcome.stderr
        return
    evaluated, left_out, words = expected
    assert result["malformed"] == left_out
    assert all(words in line for line in result["malformed_records"]), result["malformed_records"]
    if evaluated:
        assert result["examples"] == evaluated and not result.get("skipped")
    else:
        assert result["skipped"] == f"no valid record ({left_out} malformed)"
        assert "no valid record in test" in outcome.stderr
    if left_out:
        assert "skipped a malformed record" in outcome.stderr


def test_bpc_texts_that_cannot_be_read_are_counted(held_out, tmp_path):
    from eval.bpc import read_texts

    good = [json.loads(line)["text"] for line in held_out.read_text().splitlines()[:3]]
    sjis = tmp_path / "novel.txt"
    sjis.write_bytes(good[0].encode("cp932", "replace"))  # a .txt that is not UTF-8: skipped whole
    mixed = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": text}, ensure_ascii=False).encode() for text in good]
    # Not UTF-8 (never scored as replacement characters), not JSON, text not a string.
    bad = [good[1].encode("cp932", "replace"), b'{"text": "cut', b'{"text": 5}']
    mixed.write_bytes(b"\n".join(lines[:2] + bad + lines[2:]) + b"\n")
    texts, unreadable = read_texts([sjis, mixed], None)
    assert texts == good and unreadable == 4
