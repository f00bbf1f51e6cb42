"""Normalisation on real Japanese text: Unicode policy, boilerplate sections and lines, whitespace."""

from __future__ import annotations

import gzip
import json
import random
import re
import unicodedata
from pathlib import Path

import pytest
from datatrove.data import Document
from pydantic import ValidationError

from common.config import load_config
from common.errors import ConfigError
from data_prep.normalise import NormaliseConfig, Normaliser, normalise_text
from data_prep.source_presets import source_preset

WIKIPEDIA = source_preset("wikipedia").normalise
WEB = source_preset("web").normalise
LITERATURE = source_preset("literature").normalise
UNICODE_ONLY = {"strip_control": False, "collapse_whitespace": False, "drop_empty_brackets": False}


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture
def leads(shared_data) -> list[str]:
    """Real Japanese Wikipedia article leads."""
    return [
        r["text"] for r in read_jsonl_gz(shared_data / "corpus" / "wikipedia_ja_leads.jsonl.gz")
    ]


@pytest.fixture
def web_pages(shared_data) -> list[str]:
    """Real Japanese web pages (FineWeb-2)."""
    return [r["text"] for r in read_jsonl_gz(shared_data / "corpus" / "fineweb2_ja_web.jsonl.gz")]


def half_width_katakana(text: str) -> str:
    """``text`` with its katakana written in half-width forms (the inverse of NFKC on them)."""
    single = {}
    for code in range(0xFF66, 0xFFA0):
        full = unicodedata.normalize("NFKC", chr(code))
        if len(full) == 1 and "\u30a0" <= full <= "\u30ff":
            single[full] = chr(code)
    voiced = {}
    for half in single.values():
        for mark in ("\uff9e", "\uff9f"):
            combined = unicodedata.normalize("NFKC", half + mark)
            if len(combined) == 1:
                voiced[combined] = half + mark
    return "".join(voiced.get(c) or single.get(c) or c for c in text)


def full_width_ascii(text: str) -> str:
    """``text`` with ASCII letters and digits written full width (ＡＢＣ１２３)."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in text)


def test_clean_wikipedia_leads_barely_change(leads):
    normalised = [normalise_text(lead, WIKIPEDIA) for lead in leads]
    for lead, result in zip(leads, normalised, strict=True):
        if unicodedata.is_normalized("NFKC", lead):
            assert result == lead
    before = sum(len(lead) for lead in leads)
    after = sum(len(result) for result in normalised)
    assert abs(before - after) < 0.001 * before
    assert (
        sum(result != lead for lead, result in zip(leads, normalised, strict=True))
        < len(leads) // 5
    )


def test_wikipedia_sections_after_the_first_boilerplate_heading_are_cut(leads):
    body = "\n\n".join(leads[:4])
    references = "\n".join(leads[4:7])
    article = (
        f"{body}\n\n== 脚注 ==\n{references}\n\n== 関連項目 ==\n* {leads[7][:20]}\n"
        f"\n外部リンク\n公式サイト\n"
    )
    result = normalise_text(article, WIKIPEDIA)
    assert result == normalise_text(body, WIKIPEDIA)
    assert leads[5] not in result and "関連項目" not in result


@pytest.mark.parametrize(
    "heading",
    [
        "脚注",
        "== 脚注 ==",
        "=== 関連項目 ===",
        "■参考文献",
        "◆ 外部リンク",
        "　出典　",
        "脚注・出典",
        "＝＝注釈＝＝",
    ],
)
def test_decorated_headings_are_recognised(leads, heading):
    text = f"{leads[0]}\n{heading}\n{leads[1]}"
    assert normalise_text(text, WIKIPEDIA) == normalise_text(leads[0], WIKIPEDIA)


@pytest.mark.parametrize(
    "line", ["脚注についての説明は以下の通り。", "この本は参考文献として有名である。", "関連項目:"]
)
def test_a_heading_word_inside_a_sentence_is_not_a_heading(leads, line):
    text = f"{leads[0]}\n{line}\n{leads[1]}"
    assert normalise_text(text, WIKIPEDIA) == normalise_text(text, LITERATURE)


def test_half_width_katakana_and_full_width_letters_become_standard(leads):
    with_katakana = [lead for lead in leads if any("\u30a1" <= c <= "\u30fa" for c in lead)][:200]
    with_digits = [lead for lead in leads if any(c.isascii() and c.isalnum() for c in lead)][:200]
    assert len(with_katakana) > 50 and len(with_digits) > 50
    for lead in with_katakana:
        disguised = half_width_katakana(lead)
        assert disguised != lead
        assert normalise_text(disguised, WIKIPEDIA) == normalise_text(lead, WIKIPEDIA)
    for lead in with_digits:
        assert normalise_text(full_width_ascii(lead), WIKIPEDIA) == normalise_text(lead, WIKIPEDIA)
    assert normalise_text("ｶﾀｶﾅ ｶﾞｷﾞｸﾞ ﾊﾟﾝ ＡＢＣ１２３", WIKIPEDIA) == "カタカナ ガギグ パン ABC123"
    assert normalise_text("①\u3000②", WIKIPEDIA) == "1 2"


def test_nfc_and_none_keep_widths():
    text = "ｶﾀｶﾅ（ＡＢＣ１２３）！"
    assert normalise_text(text, NormaliseConfig(unicode="NFC")) == text
    assert normalise_text(text, NormaliseConfig(unicode="none")) == text
    assert normalise_text("か\u3099", NormaliseConfig(unicode="NFC")) == "が"


def test_run_by_run_normalisation_equals_whole_text_normalisation(leads, web_pages):
    """normalise_text normalises only runs of unstable characters; the result must not differ."""
    pool = (
        [chr(c) for c in range(0x3040, 0x3100)]  # kana, combining voiced marks
        + [chr(c) for c in range(0xFF00, 0xFFF0)]  # full- and half-width forms
        + [chr(c) for c in range(0x1100, 0x1200)]  # Hangul jamo that compose
        + [chr(c) for c in range(0xAC00, 0xAC20)]  # Hangul syllables that take a final jamo
        + [chr(c) for c in range(0x0300, 0x0370)]  # combining diacritics
        + [
            "\u3099",
            "\u309a",
            "\u309b",
            "\u309c",
            "\uf900",
            "\U0002f800",
            "\U0001d15e",
            "\U0001f600",
        ]
        + ["\u0b47", "\u0b3e", "\u0cc6", "\u0cc2", "\u1025", "\u102e", "\U000110b9", "\U000110ba"]
        + list("abcあい漢字e\n 。")
    )
    rng = random.Random(0)
    samples = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(20000)]
    for form in ("NFKC", "NFC"):
        config = NormaliseConfig(unicode=form, **UNICODE_ONLY)
        for text in [*leads, *web_pages, *samples]:
            assert normalise_text(text, config) == unicodedata.normalize(form, text), repr(text)


def test_control_and_zero_width_characters_are_removed(leads):
    lead = leads[10]
    middle = len(lead) // 2
    noisy = (
        "\ufeff"
        + lead[:middle]
        + "\u200b\u00ad\x00\x07\u200d\u2060\u200e"
        + lead[middle:]
        + "\r\n"
        + lead
        + "\r"
        + lead
        + "\x85"
    )
    assert normalise_text(noisy, WIKIPEDIA) == normalise_text(f"{lead}\n{lead}\n{lead}", WIKIPEDIA)
    kept_tabs = NormaliseConfig(collapse_whitespace=False)
    assert normalise_text("a\tb\x0cc\u2028d", kept_tabs) == "a\tb\nc\nd"


def test_empty_brackets_go_and_full_ones_stay():
    text = "東京（）は「」首都『』【】［］[]( )（、）（；）（ ・ ）「（）」で、「東京」（とうきょう）[1]。"
    assert normalise_text(text, WIKIPEDIA) == "東京は首都で、「東京」(とうきょう)[1]。"
    off = NormaliseConfig(drop_empty_brackets=False)
    assert "()" in normalise_text("東京（）は", off)


def test_whitespace_is_collapsed_within_lines_only():
    text = "\n\n  一行目  の\t\tテキスト   \n二行目\u3000\u3000です\n\n\n\n\n三行目  \n\n"
    assert normalise_text(text, WIKIPEDIA) == "一行目 の テキスト\n二行目 です\n\n三行目"


def test_web_boilerplate_lines_go_and_prose_stays(web_pages):
    page = next(p for p in web_pages if len(p.splitlines()) >= 4 and len(p) < 3000)
    prose = (
        "昨日から社内システムにログインできない状態が続いており、情報システム部に問い合わせたところ、"
        "パスワードの有効期限が切れていたことが原因だと分かった。"
    )
    boilerplate = [
        "Copyright © 2023 Example Inc. All Rights Reserved.",
        "(C) 2019 株式会社サンプル",
        "当サイトではクッキー（Cookie）を使用しています。同意する",
        "このウェブサイトはCookieを利用しています。詳しくはプライバシーポリシーをご覧ください。",
        "ログイン | 会員登録",
        "新規会員登録",
        "ログインはこちら",
        "ホーム > カテゴリ > 記事",
        "トップ ＞ ニュース ＞ 今日の話題",
        "ページの先頭へ",
        "▲ページトップへ戻る",
        "この記事をシェア",
        "ツイート シェア はてブ",
    ]
    kept_lines = [
        *page.splitlines(),
        prose,
        "ログインできなかった。",
        "クッキーを焼くのが好きです。",
    ]
    mixed = []
    for index, line in enumerate(kept_lines):
        mixed += [line, boilerplate[index % len(boilerplate)]]
    mixed += boilerplate
    result = normalise_text("\n".join(mixed), WEB)
    assert result == normalise_text("\n".join(kept_lines), WEB)
    assert prose in result


def test_web_patterns_keep_almost_every_real_web_line(web_pages):
    lines = [line for page in web_pages for line in normalise_text(page, LITERATURE).splitlines()]
    kept = [line for page in web_pages for line in normalise_text(page, WEB).splitlines()]
    assert len(lines) > 1000
    assert len(lines) - len(kept) < 0.02 * len(lines)


@pytest.mark.parametrize(
    ("pattern", "complaint"),
    [
        ("(unclosed", "'(unclosed' is not a valid regular expression"),
        ("(?i)cookie", "write flags scoped"),
        ("(ログイン)", "has capturing groups"),
    ],
)
def test_bad_patterns_fail_at_validation(pattern, complaint):
    with pytest.raises(ValidationError, match=re.escape(complaint)):
        NormaliseConfig(drop_line_patterns=["^ok$", pattern])


def test_bad_pattern_in_a_config_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "normalise.yaml"
    path.write_text('drop_line_patterns: ["[a-"]\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(NormaliseConfig, path)
    message = str(caught.value)
    assert "\n" not in message and "'[a-'" in message and "drop_line_patterns" in message


def test_presets():
    # The exact values are checked in test_data_presets.py; here, which steps each preset sets.
    assert WIKIPEDIA.strip_sections[:2] == ["脚注", "注釈"] and WIKIPEDIA.drop_line_patterns == []
    assert len(WEB.drop_line_patterns) == 10 and WEB.strip_sections == []
    assert NormaliseConfig() == LITERATURE


@pytest.mark.slow
def test_fifty_megabytes_are_normalised(leads):
    unit = "\n".join(leads)
    size = 50 * 2**20
    text = (unit * (size // len(unit.encode()) + 1)).encode()[:size].decode(errors="ignore")
    result = normalise_text(text, WEB)
    assert 0.99 * len(text) < len(result) <= len(text)


def test_normaliser_step_uses_each_sources_config(leads, web_pages):
    article = f"{leads[0]}\n\n== 脚注 ==\n{leads[1]}"
    page = f"ホーム > ニュース > 記事\n{web_pages[0]}"
    documents = [
        Document(text=article, id="w1", metadata={"source": "wikipedia"}),
        Document(text=page, id="p1", metadata={"source": "web"}),
        Document(text=article, id="p2", metadata={"source": "web"}),
        Document(text="ページの先頭へ\n\u200b", id="p3", metadata={"source": "web"}),
    ]
    lengths = [len(doc.text) for doc in documents]
    step = Normaliser({"wikipedia": WIKIPEDIA, "web": WEB})
    results = {doc.id: doc for doc in step.run(iter(documents), 0, 1)}
    assert list(results) == ["w1", "p1", "p2", "p3"]
    assert results["w1"].text == leads[0]
    assert results["p1"].text == normalise_text(web_pages[0], WEB)
    assert leads[1] in results["p2"].text  # the web config cuts no sections
    assert results["p3"].text == ""  # emptied, but still passed on for the length filter
    assert results["w1"].metadata["normalise"] == {
        "chars_before": len(article),
        "chars_after": len(leads[0]),
    }
    assert step.stats["documents"].total == 4
    assert step.stats["emptied"].total == 1
    assert step.stats["chars_before"].total == sum(lengths)
    assert step.stats["chars_after"].total == sum(len(doc.text) for doc in results.values())


def test_normaliser_names_an_unknown_source():
    step = Normaliser({"wikipedia": WIKIPEDIA, "web": WEB})
    stray = Document(text="テキスト", id="x", metadata={"source": "aozora"})
    with pytest.raises(ValueError, match=r"'aozora'.*known sources: web, wikipedia"):
        list(step.run(iter([stray]), 0, 1))
