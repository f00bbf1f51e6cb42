"""Japanese character-level quality filters, as datatrove steps, on real Japanese text.

Every rule is shown two ways on real documents from ../shared/data: the unmodified document is
kept by the rule's step, and the same document changed to break the rule is removed with a
reason that names the failing score.
"""

from __future__ import annotations

import gzip
import json
import tarfile
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from datatrove.data import Document
from datatrove.pipeline.writers import JsonlWriter
from pydantic import ValidationError

from data_prep.aozora import clean_aozora
from data_prep.filter_rules import QualityConfig
from data_prep.filter_steps import (
    CharacterFilter,
    EllipsisFilter,
    LengthFilter,
    NgWordFilter,
    RepetitionFilter,
    SentenceFilter,
    quality_steps,
)
from data_prep.source_presets import PRESET_NAMES, source_preset
from data_prep.text_scores import (
    character_fractions,
    duplicate_line_fractions,
    duplicate_ngram_char_fractions,
    ellipsis_line_fraction,
    load_ng_words,
    ng_char_fraction,
    ng_word_pattern,
    sentence_stats,
    top_ngram_char_fractions,
    without_whitespace,
)

# A real FineWeb-2 page (a blog post on protecting children's personal data): 487 characters,
# 8 lines, every line a sentence ending in 。.
SCHOOL_PAGE_ID = "<urn:uuid:6728a18b-5607-4bf5-8044-823c38600b66>"
RULES = {"web": source_preset("web").filters, "wikipedia": source_preset("wikipedia").filters}


def read_records(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture
def leads(shared_data) -> list[str]:
    """2,022 real Japanese Wikipedia article leads."""
    return [r["text"] for r in read_records(shared_data / "corpus" / "wikipedia_ja_leads.jsonl.gz")]


@pytest.fixture
def web_pages(shared_data) -> dict[str, str]:
    """Real Japanese web pages from FineWeb-2, by id."""
    records = read_records(shared_data / "corpus" / "fineweb2_ja_web.jsonl.gz")
    return {r["id"]: r["text"] for r in records}


@pytest.fixture
def page(web_pages) -> str:
    return web_pages[SCHOOL_PAGE_ID]


def document(text: str, source: str = "web", doc_id: str = "doc") -> Document:
    return Document(text=text, id=doc_id, metadata={"source": source})


def kept_by_all_steps(texts: list[str], source: str) -> list[Document]:
    docs = [document(text, source, str(index)) for index, text in enumerate(texts)]
    stream = iter(docs)
    for step in quality_steps(RULES, lambda name: None):
        stream = step.run(stream)
    return list(stream)


def removal_reason(step, text: str, source: str = "web") -> str | None:
    verdict = step.filter(document(text, source))
    return None if verdict is True else verdict[1]


def to_katakana(text: str) -> str:
    return text.translate({code: code + 0x60 for code in range(0x3041, 0x3097)})


# --- the presets on real corpora ------------------------------------------------------------


def test_real_wikipedia_leads_mostly_pass_the_wikipedia_preset(leads):
    assert len(leads) == 2022
    kept = kept_by_all_steps(leads, "wikipedia")
    assert len(kept) / len(leads) >= 0.8


def test_real_web_pages_mostly_pass_the_web_preset(web_pages):
    kept = kept_by_all_steps(list(web_pages.values()), "web")
    assert len(kept) / len(web_pages) >= 0.9


def test_ordinary_text_scores_near_zero_on_the_ng_list(leads, web_pages):
    pattern = ng_word_pattern(load_ng_words())
    for texts in (leads, list(web_pages.values())):
        fractions = [ng_char_fraction(text, pattern) for text in texts]
        assert sum(fraction > 0 for fraction in fractions) <= 0.05 * len(texts)
        assert sum(fractions) / len(fractions) < 0.002


# --- each rule: the real document is kept, the broken one removed -----------------------------


def test_length_rule(page, leads):
    step = LengthFilter(RULES)
    assert removal_reason(step, page) is None
    assert removal_reason(step, leads[0], "wikipedia") is None
    assert removal_reason(step, page[:5]).startswith("too_short 5 chars")
    assert removal_reason(step, "").startswith("empty")
    assert removal_reason(step, " \n\u3000\t ").startswith("empty")


def test_a_50_megabyte_document_is_rejected_without_being_read(page):
    huge = page * (50_000_000 // len(page.encode("utf-8")) + 1)
    assert len(huge.encode("utf-8")) > 50_000_000
    doc = document(huge)
    started = time.perf_counter()
    verdict = LengthFilter(RULES).filter(doc)
    elapsed = time.perf_counter() - started
    assert verdict[0] is False and verdict[1].startswith("too_long")
    assert elapsed < 0.01
    assert doc.metadata["filter_scores"]["length"] == {"chars": len(huge)}


def test_chinese_and_kanji_only_text_fail_the_hiragana_fraction(page, leads):
    step = CharacterFilter(RULES)
    assert removal_reason(step, page) is None
    # Written for this test: simplified Chinese about a hot-spring town (no kana at all).
    chinese = (
        "这个小镇位于山谷之中，以温泉和古老的木造旅馆而闻名。每年秋天，山上的枫叶变红，"
        "许多游客从城市来到这里散步、泡温泉、品尝当地的豆腐料理。镇上的居民大多经营旅馆或商店，"
        "生活节奏缓慢而安静。"
    )
    assert character_fractions(chinese)["japanese_fraction"] > 0.9  # hanzi count as kanji
    assert removal_reason(step, chinese).startswith("hiragana_fraction 0.000 <")
    without_hiragana = "".join(char for char in leads[0] if not "\u3041" <= char <= "\u309f")
    assert removal_reason(step, without_hiragana * 10, "wikipedia").startswith("hiragana")
    # Below kana_below_chars katakana counts as kana too, but Chinese has none of either.
    assert removal_reason(step, chinese[:40], "wikipedia").startswith("kana_fraction 0.000 <")


def test_short_katakana_and_kanji_leads_are_japanese(leads):
    """Held-out Wikipedia leads without hiragana (issue 19) and the real ones like them."""
    step = CharacterFilter(RULES)
    for lead in ("JRNフルネット局。", "アイデンティティー、又は、アイデンティティ。"):
        assert character_fractions(lead)["hiragana_fraction"] < 0.05
        assert removal_reason(step, lead, "wikipedia") is None
    short_without_hiragana = [
        lead
        for lead in leads
        if len(lead) < 100
        and character_fractions(lead)["hiragana_fraction"] < 0.05
        and character_fractions(lead)["japanese_fraction"] >= 0.4
    ]
    kanji_only = [
        lead
        for lead in short_without_hiragana
        if character_fractions(lead)["katakana_fraction"] < 0.05
    ]
    # 通称サンスポ。, 別名サル目。, コピー。, ... and 通称世陸、世界陸上、世界選手権。, 右投右打。, ...
    assert len(short_without_hiragana) >= 20 and len(kanji_only) >= 10
    removed = [lead for lead in short_without_hiragana if removal_reason(step, lead, "wikipedia")]
    assert removed == ["＜br＞"]  # markup left in the corpus, not a lead
    # A long text keeps the hiragana rule: a page of katakana and kanji is a list, not prose.
    assert removal_reason(step, "東京タワー観光案内。" * 12, "wikipedia").startswith("hiragana")
    # Without kana, one kanji outside JIS level 1 is enough to refuse a short text.
    assert removal_reason(step, "篆書、篆文。", "wikipedia").endswith(
        "level1_kanji_fraction 0.500 < 1.000"
    )


# Written for this test: wiki-lead and web-style Chinese, simplified then traditional, short
# enough for the short-text rules. Kanji strings that read the same in both languages (北京大学
# 教授。) are left out: script cannot tell them apart, and the length rule takes most of them.
CHINESE = [
    "北京是中华人民共和国的首都，也是全国的政治、文化中心。",
    "长江是亚洲第一长河，全长约六千三百公里，流经青海、西藏、四川等省区。",
    "他毕业于清华大学计算机系，现任一家互联网公司的技术总监。",
    "这家餐厅的菜很好吃，价格也不贵，我们下次还会再来。",
    "鲁迅，原名周树人，浙江绍兴人，中国现代著名文学家、思想家。",
    "熊猫是中国特有的动物，主要生活在四川、陕西和甘肃的山区。",
    "欢迎光临本店，全场商品八折优惠。",
    "广东省辖地级市。",
    "臺北市是中華民國的首都，位於臺灣北部的臺北盆地。",
    "香港是一個國際金融中心，也是世界上人口最稠密的地區之一。",
    "我們明天下午三點在車站見面，不要遲到喔。",
    "本店營業時間為上午十點至晚上九點，週一公休。",
    "她說這本書寫得很好，值得一讀再讀。",
    "又稱玉山。",
]


def test_chinese_is_not_japanese_in_any_preset(shared_data):
    rules = {name: source_preset(name).filters for name in PRESET_NAMES}
    step = CharacterFilter(rules)
    # Literature counts katakana as kana in every work: 雨ニモマケズ has no hiragana at all.
    with tarfile.open(shared_data / "corpus" / "aozora" / "card000081.tar.gz") as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("45630_txt_23610.txt"))
        work, _ = clean_aozora(archive.extractfile(member).read())
    assert work.startswith("雨ニモマケズ") and character_fractions(work)["hiragana_fraction"] == 0
    assert removal_reason(step, work, "literature") is None
    long_chinese = "".join(CHINESE) * 2  # past every kana_below_chars but literature's
    for preset in rules:
        for text in [*CHINESE, long_chinese]:
            reason = removal_reason(step, text, preset)
            assert reason is not None and reason.split(" ", 1)[0] in (
                "hiragana_fraction",
                "kana_fraction",
            ), (preset, text, reason)


def test_katakana_spam_fails_the_katakana_fraction(page):
    step = CharacterFilter(RULES)
    spam = "ダウンロードキャンペーンポイントプレゼントクリックランキング"
    stuffed = page + spam * (len(page) * 3 // 2 // len(spam))
    fractions = character_fractions(stuffed)
    assert fractions["hiragana_fraction"] >= RULES["web"].characters.min_hiragana_fraction
    assert removal_reason(step, stuffed).startswith("katakana_fraction")
    # The page written in katakana only has no hiragana left: the hiragana check catches it first.
    assert removal_reason(step, to_katakana(page)).startswith("hiragana_fraction")


def test_english_text_fails_the_japanese_fraction(page):
    step = CharacterFilter(RULES)
    english = (
        "This page describes how parents can keep personal information about their children "
        "safe, from shredding letters to choosing what to write on school bags. "
    )
    assert removal_reason(step, english * 4).startswith("japanese_fraction")
    assert removal_reason(step, page + english * 6).startswith("japanese_fraction")


def test_repeated_lines_sentences_and_ngrams_fail_the_repetition_rule(page, leads):
    step = RepetitionFilter(RULES)
    assert removal_reason(step, page) is None
    first_line = page.splitlines()[0]
    sentence = leads[0].split("。")[0] + "。"
    cases = {
        "duplicate_line_fraction": page + ("\n" + first_line) * 20,
        "duplicate_sentence_fraction": sentence * 20,
        "top_2gram_char_fraction": page.rstrip("。\n") + "激安" * 150 + "。",
        # Every sentence a second time with one character added: no line or sentence repeats,
        # but nearly every character sits in a repeated 5-gram.
        "duplicate_5gram_char_fraction": page + "\n" + page.replace("。", "ね。"),
    }
    for score, text in cases.items():
        assert removal_reason(step, text).startswith(f"{score} "), score


def test_run_on_text_fails_the_sentence_rule(page, leads):
    step = SentenceFilter(RULES)
    assert removal_reason(step, page) is None
    run_on = page.replace("。", "、").replace("\n", "")
    assert removal_reason(step, run_on).startswith("max_sentence_chars")
    assert sentence_stats(run_on)["sentences"] == 1
    assert removal_reason(step, page.split("。")[0] + "。").startswith("sentences 1 < 3")
    assert removal_reason(step, leads[0], "wikipedia") is None


@pytest.mark.parametrize("ellipsis", ["…", "...", "・・・"])
def test_truncated_lines_fail_the_ellipsis_rule(page, ellipsis):
    step = EllipsisFilter(RULES)
    assert removal_reason(step, page) is None
    truncated = "\n".join(line.rstrip("。")[:30] + ellipsis for line in page.splitlines())
    assert ellipsis_line_fraction(truncated) == 1.0
    assert removal_reason(step, truncated).startswith("ellipsis_line_fraction 1.000 >")


def test_ng_words_fail_the_ng_word_rule(page):
    step = NgWordFilter(RULES)
    assert removal_reason(step, page) is None
    spam = page + "\n出会い系で今すぐ会える!無料登録は今すぐクリック。副業で即金、高収入が稼げる。"
    assert removal_reason(step, spam).startswith("ng_char_fraction")


# --- behaviour of the steps -------------------------------------------------------------------


def test_a_disabled_rule_keeps_everything_and_records_nothing():
    config = source_preset("web").filters
    config.characters.enabled = False
    step = CharacterFilter({"web": config})
    doc = document("Plain English text with no Japanese at all.")
    assert step.filter(doc) is True
    assert "filter_scores" not in doc.metadata


def test_an_unknown_source_is_a_clear_error(page):
    with pytest.raises(ValueError, match=r"source 'mc4'.*known sources: web, wikipedia"):
        LengthFilter(RULES).filter(document(page, "mc4"))


def test_every_step_writes_its_scores_to_metadata(page):
    doc = document(page)
    for step in quality_steps(RULES, lambda name: None):
        assert step.filter(doc) is True
    scores = doc.metadata["filter_scores"]
    assert list(scores) == [
        "length",
        "japanese_characters",
        "ellipsis_lines",
        "sentence_length",
        "ng_words",
        "repetition",
    ]
    assert scores["length"] == {"chars": len(page)}
    assert 0.3 < scores["japanese_characters"]["hiragana_fraction"] < 0.7
    assert scores["repetition"]["duplicate_10gram_char_fraction"] < 0.4
    for values in scores.values():
        for value in values.values():
            assert type(value) in (int, float)  # not numpy scalars, which JSON writers refuse
            assert value == round(value, 4)
    assert orjson.loads(orjson.dumps(doc.metadata)) == doc.metadata


def test_removed_documents_reach_the_exclusion_writer(tmp_path, page):
    writer = JsonlWriter(str(tmp_path / "removed"))
    step = CharacterFilter(RULES, exclusion_writer=writer)
    docs = [document(page, doc_id="real"), document(to_katakana(page), doc_id="katakana")]
    kept = list(step.run(iter(docs)))
    assert [doc.id for doc in kept] == ["real"]
    files = list((tmp_path / "removed").glob("*.jsonl.gz"))
    assert len(files) == 1
    removed = read_records(files[0])
    assert [record["id"] for record in removed] == ["katakana"]
    metadata = removed[0]["metadata"]
    assert metadata["filter_reason"].startswith("hiragana_fraction 0.000 <")
    assert metadata["filter_scores"]["japanese_characters"]["hiragana_fraction"] == 0.0
    # One datatrove stat per failing score, not per measured value.
    assert "dropped_hiragana_fraction" in step.stats.stats


def test_quality_steps_put_length_first_and_give_each_step_its_writer(tmp_path):
    asked: list[str] = []

    def writer_for(name: str) -> JsonlWriter:
        asked.append(name)
        return JsonlWriter(str(tmp_path / name))

    steps = quality_steps(RULES, writer_for)
    names = [step.name for step in steps]
    assert names[0] == "length" and names == asked
    assert set(names) == {
        "length",
        "japanese_characters",
        "repetition",
        "sentence_length",
        "ellipsis_lines",
        "ng_words",
    }
    assert all(step.exclusion_writer.output_folder.path.endswith(step.name) for step in steps)
    assert {type(step) for step in steps} == {
        LengthFilter,
        CharacterFilter,
        RepetitionFilter,
        SentenceFilter,
        EllipsisFilter,
        NgWordFilter,
    }


# --- scores and configs -------------------------------------------------------------------------


def brute_force_duplicate_fraction(text: str, n: int) -> float:
    compact = without_whitespace(text)
    grams = [compact[i : i + n] for i in range(len(compact) - n + 1)]
    counts = Counter(grams)
    covered = set()
    for start, gram in enumerate(grams):
        if counts[gram] > 1:
            covered.update(range(start, start + n))
    return len(covered) / len(compact)


def brute_force_top_fraction(text: str, n: int) -> float:
    compact = without_whitespace(text)
    grams = [compact[i : i + n] for i in range(len(compact) - n + 1)]
    gram, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    covered = set()
    for start, other in enumerate(grams):
        if other == gram:
            covered.update(range(start, start + n))
    return len(covered) / len(compact)


def test_ngram_scores_match_a_direct_count(web_pages):
    for text in list(web_pages.values())[:10]:
        duplicates = duplicate_ngram_char_fractions(text, [5, 7, 10])
        tops = top_ngram_char_fractions(text, [2, 3, 4])
        for n in (5, 7, 10):
            assert duplicates[n] == pytest.approx(brute_force_duplicate_fraction(text, n))
        for n in (2, 3, 4):
            # Ties between equally frequent n-grams may pick another one of the same count.
            assert tops[n] == pytest.approx(
                brute_force_top_fraction(text, n), abs=2 * n / len(text)
            )


def test_character_and_line_scores_on_small_examples():
    fractions = character_fractions("ひらがな カタカナ 漢字。\nabc")  # 14 non-whitespace
    assert fractions["hiragana_fraction"] == pytest.approx(4 / 14)
    assert fractions["katakana_fraction"] == pytest.approx(4 / 14)
    assert fractions["japanese_fraction"] == pytest.approx(11 / 14)
    assert fractions["chars"] == 14
    assert character_fractions(" \n") == {
        "chars": 0,
        "japanese_fraction": 0.0,
        "hiragana_fraction": 0.0,
        "katakana_fraction": 0.0,
    }
    assert duplicate_line_fractions("あいう\nえお\nあいう\n\nあいう") == pytest.approx(
        (2 / 4, 6 / 11)
    )
    assert sentence_stats("今日は晴れ。明日は雨?あさっては")["sentences"] == 3
    assert sentence_stats("円周率は3.14です.次の文です.")["sentences"] == 2  # ． as NFKC leaves it


def test_ng_word_list_is_bundled_and_replaceable(tmp_path):
    words = load_ng_words()
    assert 60 <= len(words) <= 150
    assert not any(word.startswith("#") or not word for word in words)
    assert {"出会い系", "無料登録", "副業", "カジノ", "今すぐクリック"} <= set(words)
    # Longest first: カジノボーナス is matched whole, not as カジノ plus the rest.
    assert ng_word_pattern(["カジノ", "カジノボーナス"]).findall("カジノボーナス") == [
        "カジノボーナス"
    ]

    custom = tmp_path / "ng.txt"
    custom.write_text("# our own list\n激安\n", encoding="utf-8")
    config = source_preset("web").filters
    config.ng_words.word_list = custom
    step = NgWordFilter({"web": config})
    verdict = step.filter(document("激安" * 10 + "のお店です。"))
    assert verdict[0] is False and verdict[1].startswith("ng_char_fraction")


def test_config_mistakes_are_caught_where_they_enter(tmp_path):
    data = RULES["web"].model_dump()
    with pytest.raises(ValidationError, match="min_hiragana"):
        QualityConfig.model_validate(
            {**data, "characters": {**data["characters"], "min_hiragana": 0.1}}
        )
    with pytest.raises(ValidationError, match="not found"):
        QualityConfig.model_validate(
            {**data, "ng_words": {**data["ng_words"], "word_list": str(tmp_path / "missing.txt")}}
        )
    with pytest.raises(ValidationError, match="min_chars"):
        QualityConfig.model_validate({**data, "length": {"min_chars": 500, "max_chars": 100}})
    with pytest.raises(ValidationError, match="n-gram size 0"):
        QualityConfig.model_validate(
            {**data, "repetition": {**data["repetition"], "max_top_ngram_char_fraction": {0: 0.2}}}
        )


def test_presets_filter_web_harder_than_wikipedia():
    assert set(PRESET_NAMES) >= {"web", "wikipedia", "literature"}
    web, wikipedia = RULES["web"], RULES["wikipedia"]
    assert web.length.min_chars > wikipedia.length.min_chars
    assert web.characters.max_katakana_fraction < wikipedia.characters.max_katakana_fraction
    assert web.sentences.max_sentence_chars < wikipedia.sentences.max_sentence_chars
    assert web.ng_words.max_ng_char_fraction < wikipedia.ng_words.max_ng_char_fraction
