"""tokenizer.hf_export: tiny real SentencePiece models (unigram and BPE) and their Hugging Face twins."""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, normalizers

from tokenizer.chat import CHAT_TEMPLATE, CHAT_TOKENS, TURN_END, TURN_START
from tokenizer.hf_export import (
    export_hf_tokenizer,
    id_mismatches,
    load_proto,
    quantise_unigram_scores,
)

from conftest import SHARED_DATA

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# kinoe's SentencePiece options (tokenizer/train.py), on a vocabulary small enough to train in
# about a second on the ~190k characters of the two corpora.
OPTIONS = {
    "vocab_size": 4000,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "split_by_whitespace": True,
    "allow_whitespace_only_pieces": True,
    "byte_fallback": True,
    "split_digits": True,
    "user_defined_symbols": ["\n", *CHAT_TOKENS],
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": 3,
    "unk_piece": "<unk>",
    "bos_piece": "<s>",
    "eos_piece": "</s>",
    "pad_piece": "<pad>",
    "num_threads": 2,
    "minloglevel": 2,
}
NEWLINE_ID, START_ID, END_ID = 4, 5, 6
RARE = "𠮷野家の龘、絵文字😀👨‍👩‍👧、한국어 안녕하세요、العربية مرحبا"
EDGE_CASES = [
    RARE,
    "2024年12月31日 3.14159",
    "  二重  スペース  ",
    "\tタブ\t区切り\t\t",
    "\n\n改行\n",
    "GPT-4とLlama 2",
    "",
    " ",
    "   先頭と末尾   ",
    "全角数字１２３と丸数字①②",
    "<0x41>と書いた文字列",
    f"{TURN_START}user\nこんにちは{TURN_END}\n{TURN_START}assistant\n",
    f"文中の{TURN_END}と{TURN_START}と<|im_start>",
]
MESSAGES = [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "はい。"}]


def train(lines: list[str], prefix: Path, model_type: str) -> Path:
    """Train a SentencePiece model with kinoe's options on ``lines``; returns the ``.model`` path."""
    text_file = prefix.with_suffix(".txt")
    text_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(prefix), model_type=model_type, **OPTIONS
    )
    return prefix.with_suffix(".model")


def load_hf(hf_dir: Path, **kwargs) -> PreTrainedTokenizerBase:
    """The exported directory through AutoTokenizer, as every consumer loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir), **kwargs)


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
    """All Wikipedia leads and all web pages, full texts."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/SOURCES.md)")
    texts = {}
    for source, name in (("wikipedia", "wikipedia_ja_leads"), ("web", "fineweb2_ja_web")):
        with gzip.open(SHARED_DATA / "corpus" / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            texts[source] = [json.loads(line)["text"] for line in f]
    return texts


@pytest.fixture(scope="module")
def lines(corpus) -> list[str]:
    """Training lines: every text split after 。 and at newlines."""
    texts = corpus["wikipedia"] + corpus["web"]
    return [part for text in texts for part in re.split(r"(?<=。)|\n", text) if part.strip()]


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def exported(request, lines, tmp_path_factory) -> tuple[Path, Path]:
    """(SentencePiece model, exported Hugging Face directory) for each model type."""
    folder = tmp_path_factory.mktemp(request.param)
    model = train(lines, folder / "sp", request.param)
    return model, export_hf_tokenizer(model, folder / "hf", CHAT_TEMPLATE)


def test_ids_and_decoding_match_sentencepiece(exported, corpus):
    model, hf_dir = exported
    texts = corpus["wikipedia"] + corpus["web"] + EDGE_CASES
    assert len(corpus["wikipedia"]) == 2022 and any("\n" in t for t in corpus["web"])
    mismatches = id_mismatches(model, hf_dir, texts)
    assert [m.text[:60] for m in mismatches] == []

    # The edge cases do exercise what they are meant to.
    processor = spm.SentencePieceProcessor(model_file=str(model))
    assert any(processor.is_byte(i) for i in processor.encode(RARE))
    assert processor.encode("\n\n改行\n")[:2] == [NEWLINE_ID, NEWLINE_ID]
    assert processor.encode(EDGE_CASES[-1]).count(END_ID) == 1


def test_decode_of_encode_is_the_text(exported, corpus):
    hf = load_hf(exported[1])
    for text in corpus["wikipedia"] + corpus["web"] + EDGE_CASES:
        assert hf.decode(hf(text, add_special_tokens=False).input_ids) == text
        if not any(token in text for token in CHAT_TOKENS):
            assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text


def test_directory_loads_as_fast_tokenizer_with_kinoe_special_tokens(exported):
    model, hf_dir = exported
    hf = load_hf(hf_dir)
    processor = spm.SentencePieceProcessor(model_file=str(model))
    assert hf.is_fast
    named = [(hf.bos_token, hf.bos_token_id), (hf.eos_token, hf.eos_token_id)]
    named += [(hf.pad_token, hf.pad_token_id), (hf.unk_token, hf.unk_token_id)]
    assert named == [("<s>", 1), ("</s>", 2), ("<pad>", 3), ("<unk>", 0)]
    assert hf.convert_tokens_to_ids(list(CHAT_TOKENS)) == [START_ID, END_ID]
    assert set(CHAT_TOKENS) <= set(hf.all_special_tokens)
    text = "日本語の文章です。"
    assert hf(text).input_ids == [1, *processor.encode(text)]
    assert hf("").input_ids == [1]
    assert hf.model_max_length >= 10**20
    assert len(hf) == processor.get_piece_size()
    assert (hf_dir / "tokenizer.model").read_bytes() == model.read_bytes()
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in hf_dir.iterdir()
    }


def test_chat_template_renders_and_tokenises_turns(exported):
    model, hf_dir = exported
    hf = load_hf(hf_dir)
    processor = spm.SentencePieceProcessor(model_file=str(model))
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False)
    by_hand = f"{TURN_START}user\nこんにちは{TURN_END}\n{TURN_START}assistant\nはい。{TURN_END}\n"
    assert rendered == by_hand

    def turn(role: str, content: str) -> list[int]:
        return [START_ID, *processor.encode(role), NEWLINE_ID, *processor.encode(content), END_ID]

    expected = [*turn("user", "こんにちは"), NEWLINE_ID, *turn("assistant", "はい。"), NEWLINE_ID]
    assert hf(rendered).input_ids == [1, *expected]
    # transformers 5 tokenises the rendered chat with add_special_tokens=False, and the template
    # writes no <s>: apply_chat_template's ids start at the first turn.
    assert hf.apply_chat_template(MESSAGES)["input_ids"] == expected
    prompt = hf.apply_chat_template(MESSAGES[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith(f"{TURN_END}\n{TURN_START}assistant\n")


def test_literal_control_tokens_are_special_in_hugging_face_only(exported):
    """The documented divergence: transformers matches <s> and </s> written in text."""
    model, hf_dir = exported
    processor = spm.SentencePieceProcessor(model_file=str(model))
    text = "<s>タグ</s>"
    assert 1 not in processor.encode(text) and 2 not in processor.encode(text)
    assert load_hf(hf_dir)(text, add_special_tokens=False).input_ids[0] == 1
    spelt_out = load_hf(hf_dir, split_special_tokens=True)(text, add_special_tokens=False)
    assert spelt_out.input_ids == processor.encode(text)


def test_id_mismatches_finds_broken_ids_and_broken_decoding(exported, tmp_path):
    model, hf_dir = exported
    texts = ["スペース の ある 文", "絵文字😀"]
    backend = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    backend.normalizer = normalizers.Sequence([])  # spaces no longer become ▁
    backend.decoder = None  # byte pieces no longer become characters
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in hf_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    backend.save(str(broken / "tokenizer.json"))
    space, emoji = id_mismatches(model, broken, texts)
    assert space.text == texts[0] and space.ids_differ
    assert emoji.text == texts[1] and not emoji.ids_differ and emoji.sp_ids == emoji.hf_ids


def test_export_refuses_options_it_cannot_reproduce(lines, tmp_path):
    text_file = tmp_path / "lines.txt"
    text_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # SentencePiece's defaults: NFKC normaliser, dummy prefix, extra whitespace removed.
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(tmp_path / "default"),
        model_type="bpe",
        vocab_size=4000,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="add_dummy_prefix"):
        export_hf_tokenizer(tmp_path / "default.model", tmp_path / "hf", CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def indented(lines, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Models whose vocabulary has whitespace-only pieces: every fourth line also indented."""
    folder = tmp_path_factory.mktemp("indented")
    extra = [" " * (2 * (1 + i % 4)) + line for i, line in enumerate(lines[::4])]
    models = {t: train(lines + extra, folder / t, t) for t in ("unigram", "bpe")}
    quantise_unigram_scores(models["unigram"], folder / "rounded.model")
    models["rounded"] = folder / "rounded.model"
    return {
        name: (m, export_hf_tokenizer(m, folder / f"hf-{name}", CHAT_TEMPLATE))
        for name, m in models.items()
    }


RUNS = [
    f"{before}{' ' * n}{after}"
    for n in range(1, 25)
    for before, after in (("", ""), ("記", "表"), ("Hello", " x"), ("\n", "い"))
] + [char * n for n in range(2, 13) for char in "ほー.=w"]


def test_whitespace_runs_match_for_bpe_and_rounded_unigram(indented, corpus):
    for name in ("bpe", "rounded"):
        model, hf_dir = indented[name]
        pieces = load_proto(model).pieces
        assert {"▁▁", "▁▁▁▁"} <= {p.piece for p in pieces}, name
        long_text = "\n".join(corpus["web"])  # one ~65k-character text
        assert id_mismatches(model, hf_dir, [*RUNS, long_text]) == [], name


def test_unigram_differs_only_by_reordering_equal_scores(indented):
    """Without rounded scores, SentencePiece's float32 sums order tied pieces its own way."""
    model, hf_dir = indented["unigram"]
    processor = spm.SentencePieceProcessor(model_file=str(model))
    mismatches = id_mismatches(model, hf_dir, RUNS)
    assert mismatches, "no tie broken differently: quantise_unigram_scores may be unnecessary"
    for mismatch in mismatches:
        assert mismatch.ids_differ
        assert collections.Counter(mismatch.sp_ids) == collections.Counter(mismatch.hf_ids)
        assert processor.decode(mismatch.hf_ids) == mismatch.text


def test_quantise_refuses_bpe_and_steps_that_are_not_powers_of_two(indented, tmp_path):
    with pytest.raises(ValueError, match="unigram"):
        quantise_unigram_scores(indented["bpe"][0], tmp_path / "out.model")
    with pytest.raises(ValueError, match="power of two"):
        quantise_unigram_scores(indented["unigram"][0], tmp_path / "out.model", step=0.1)
    scores = [p.score for p in load_proto(indented["rounded"][0]).pieces if p.type == p.NORMAL]
    assert all(score * 16 == int(score * 16) for score in scores)
