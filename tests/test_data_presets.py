"""Source presets as data: data_prep/presets/*.yaml, each setting with its reason.

The expected values below were captured from the Python literals the presets were before they
became files (data_prep/filters.py and data_prep/normalise.py at commit 21a6470), so a source
resolves to the same settings, value for value and type for type.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import tomllib
from pathlib import Path

import pytest
import yaml

from common.config import load_config
from common.errors import ConfigError
from data_prep.config import DEFAULT_PRESET, DataConfig, SourceConfig
from data_prep.filter_rules import QualityConfig
from data_prep.source_presets import PRESET_NAMES, PRESETS_DIR, read_preset, source_preset

REPO = Path(__file__).resolve().parent.parent

_PROSE_REPETITION = {
    "enabled": True,
    "max_duplicate_line_fraction": 0.3,
    "max_duplicate_line_char_fraction": 0.2,
    "max_duplicate_sentence_fraction": 0.3,
    "max_top_ngram_char_fraction": {2: 0.2, 3: 0.2, 4: 0.2},
    "max_duplicate_ngram_char_fraction": {5: 0.6, 7: 0.5, 10: 0.4},
    "ngram_min_chars": 200,
}
FORMER_FILTERS = {
    "web": {
        "length": {"enabled": True, "min_chars": 200, "max_chars": 100_000},
        "characters": {
            "enabled": True,
            "min_japanese_fraction": 0.5,
            "min_hiragana_fraction": 0.15,
            "kana_below_chars": 0,
            "min_level1_kanji_fraction": 1.0,
            "max_katakana_fraction": 0.5,
        },
        "repetition": _PROSE_REPETITION,
        "sentences": {
            "enabled": True,
            "min_sentences": 3,
            "max_mean_sentence_chars": 150.0,
            "max_sentence_chars": 400,
        },
        "ellipsis": {"enabled": True, "max_ellipsis_line_fraction": 0.3},
        "ng_words": {"enabled": True, "max_ng_char_fraction": 0.03, "word_list": None},
    },
    "wikipedia": {
        "length": {"enabled": True, "min_chars": 10, "max_chars": 1_000_000},
        "characters": {
            "enabled": True,
            "min_japanese_fraction": 0.4,
            "min_hiragana_fraction": 0.05,
            "kana_below_chars": 100,
            "min_level1_kanji_fraction": 1.0,
            "max_katakana_fraction": 0.8,
        },
        "repetition": _PROSE_REPETITION,
        "sentences": {
            "enabled": True,
            "min_sentences": 1,
            "max_mean_sentence_chars": 300.0,
            "max_sentence_chars": 1000,
        },
        "ellipsis": {"enabled": True, "max_ellipsis_line_fraction": 0.3},
        "ng_words": {"enabled": True, "max_ng_char_fraction": 0.15, "word_list": None},
    },
    "literature": {
        "length": {"enabled": True, "min_chars": 20, "max_chars": 2_000_000},
        "characters": {
            "enabled": True,
            "min_japanese_fraction": 0.7,
            "min_hiragana_fraction": 0.05,
            "kana_below_chars": 2_000_000,
            "min_level1_kanji_fraction": 1.0,
            "max_katakana_fraction": 0.8,
        },
        "repetition": {
            "enabled": True,
            "max_duplicate_line_fraction": 0.5,
            "max_duplicate_line_char_fraction": 0.5,
            "max_duplicate_sentence_fraction": 0.4,
            "max_top_ngram_char_fraction": {2: 0.4, 3: 0.4, 4: 0.4},
            "max_duplicate_ngram_char_fraction": {5: 0.9, 7: 0.85, 10: 0.8},
            "ngram_min_chars": 200,
        },
        "sentences": {
            "enabled": False,
            "min_sentences": 1,
            "max_mean_sentence_chars": 300.0,
            "max_sentence_chars": 3000,
        },
        "ellipsis": {"enabled": True, "max_ellipsis_line_fraction": 0.5},
        "ng_words": {"enabled": True, "max_ng_char_fraction": 0.05, "word_list": None},
    },
}
# The normalise settings no preset changed, then the two it did.
NORMALISE_UNCHANGED = {
    "unicode": "NFKC",
    "strip_control": True,
    "collapse_whitespace": True,
    "drop_empty_brackets": True,
}
FORMER_STRIP_SECTIONS = {
    "web": [],
    "wikipedia": [
        "脚注",
        "注釈",
        "出典",
        "参考文献",
        "関連項目",
        "外部リンク",
        "関連文献",
        "参考資料",
    ],
    "literature": [],
}
FORMER_PATTERN_COUNT = {"web": 10, "wikipedia": 0, "literature": 0}
# SHA-256 of json.dumps({"filters": ..., "normalise": ...}, sort_keys=True, ensure_ascii=False)
# over a source's resolved settings, in JSON mode: this also pins the web preset's ten
# boilerplate patterns character for character (kana_below_chars and
# min_level1_kanji_fraction added for issue 19).
FORMER_DIGESTS = {
    "web": "141d76139d0e2bccc2bd45cf9ad5323f4e9e2cec058e607e191f419af6981c7a",
    "wikipedia": "2aa4277c0175813a16191c5b7cbb3c426ca55314e307f19da65b26148b121bdb",
    "literature": "33e16bbb9c960e899d33abc876784e7c89854195d09cd6d0f9a16318a8f01233",
}
# Settings a preset may leave at the rule's default rather than give with a reason.
NOT_THRESHOLDS = {"enabled", "word_list"}


def typed(value):
    """``value`` with every leaf (and key) paired with its type, so 150 and 150.0 differ."""
    if isinstance(value, dict):
        return {(type(key).__name__, key): typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return type(value).__name__, repr(value)


def source(**fields) -> SourceConfig:
    return SourceConfig.model_validate({"name": "s", "kind": "jsonl", "path": "x", **fields})


@pytest.mark.parametrize("kind", sorted(DEFAULT_PRESET))
def test_each_kind_resolves_to_the_former_literal_values(kind):
    preset = DEFAULT_PRESET[kind]
    resolved = source(kind=kind)
    assert typed(resolved.filters.model_dump()) == typed(FORMER_FILTERS[preset])
    normalise = resolved.normalise.model_dump()
    assert normalise.pop("strip_sections") == FORMER_STRIP_SECTIONS[preset]
    # The digest below pins the patterns' text.
    assert len(normalise.pop("drop_line_patterns")) == FORMER_PATTERN_COUNT[preset]
    assert normalise == NORMALISE_UNCHANGED
    dumped = resolved.model_dump(mode="json")
    settings = {"filters": dumped["filters"], "normalise": dumped["normalise"]}
    digest = json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()
    assert hashlib.sha256(digest).hexdigest() == FORMER_DIGESTS[preset]


def test_every_setting_in_every_preset_file_has_a_reason():
    files = sorted(PRESETS_DIR.glob("*.yaml"))
    assert [path.stem for path in files] == list(PRESET_NAMES)
    assert {"web", "wikipedia", "literature"} <= set(PRESET_NAMES)
    for path in files:
        written = yaml.safe_load(path.read_text(encoding="utf-8"))
        settings = {f"normalise.{key}": s for key, s in (written.get("normalise") or {}).items()}
        settings |= {f"pii.{key}": s for key, s in written["pii"].items()}
        for rule, rule_settings in written["filters"].items():
            settings |= {f"filters.{rule}.{key}": s for key, s in rule_settings.items()}
        for key, setting in settings.items():
            assert set(setting) == {"value", "reason"}, f"{path.name}: {key}"
            reason = setting["reason"]
            assert isinstance(reason, str) and reason.strip(), f"{path.name}: {key} has no reason"
            assert "\n" not in reason.strip(), f"{path.name}: {key}'s reason is not one line"
        # Every threshold of every rule is written out, so none hides behind a default.
        for rule, field in QualityConfig.model_fields.items():
            for key in set(field.annotation.model_fields) - NOT_THRESHOLDS:
                assert f"filters.{rule}.{key}" in settings, f"{path.name}: {rule}.{key} missing"
        assert source_preset(path.stem).reasons == {
            key: setting["reason"].strip() for key, setting in settings.items()
        }


def test_user_keys_override_the_preset_key_by_key():
    wikipedia = source_preset("wikipedia")
    resolved = source(
        preset="wikipedia",
        filters={
            "characters": {"min_hiragana_fraction": 0.2},
            "repetition": {"max_top_ngram_char_fraction": {5: 0.3}},
            "sentences": {"enabled": False},
        },
        normalise={"strip_sections": ["参考文献"]},
    )
    expected = wikipedia.filters.model_dump()
    expected["characters"]["min_hiragana_fraction"] = 0.2
    # A threshold that is a mapping is merged key by key too: n = 5 joins 2, 3 and 4.
    expected["repetition"]["max_top_ngram_char_fraction"][5] = 0.3
    expected["sentences"]["enabled"] = False
    assert resolved.filters.model_dump() == expected
    # A list replaces the preset's list whole.
    assert resolved.normalise.model_dump() == {
        **wikipedia.normalise.model_dump(),
        "strip_sections": ["参考文献"],
    }
    # A source's own preset wins over its kind's: jsonl starts from web otherwise.
    assert source().filters == source_preset("web").filters
    assert source(kind="aozora", preset="web").filters == source_preset("web").filters


def test_command_line_overrides_reach_one_key(tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text("sources:\n  - {name: wiki, kind: wikipedia_ja, path: x}\n", encoding="utf-8")
    loaded = load_config(DataConfig, config, ["sources.0.filters.length.min_chars=50"])
    expected = source_preset("wikipedia").filters.model_dump()
    expected["length"]["min_chars"] = 50
    assert loaded.sources[0].filters.model_dump() == expected


def test_an_unknown_preset_is_a_one_line_config_error(tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text(
        "sources:\n  - {name: web, kind: jsonl, path: x, preset: news}\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(DataConfig, config)
    message = str(caught.value)
    assert "unknown preset 'news'" in message and "literature, web, wikipedia" in message
    assert "\n" not in message


def test_presets_are_copies_the_caller_may_change():
    changed = source_preset("web")
    changed.filters.length.min_chars = 1
    assert source_preset("web").filters.length.min_chars == 200


def _set(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    if value is _DELETE:
        del data[last]
    else:
        data[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        (
            "filters.length.min_char",
            {"value": 5, "reason": "typo"},
            "'filters.length.min_char': unknown key",
        ),
        (
            "filters.characters.min_hiragana_fraction.value",
            1.5,
            "'filters.characters.min_hiragana_fraction': Input should be less than or equal to 1 (got 1.5)",
        ),
        (
            "filters.length.max_chars.value",
            "many",
            "'filters.length.max_chars': Input should be a valid integer",
        ),
        (
            "filters.ellipsis.max_ellipsis_line_fraction.reason",
            " ",
            "'filters.ellipsis.max_ellipsis_line_fraction.reason': a reason must be one line",
        ),
        (
            "filters.ng_words.max_ng_char_fraction.reason",
            _DELETE,
            "'filters.ng_words.max_ng_char_fraction.reason': missing",
        ),
        ("filters.length.min_chars", 200, "'filters.length.min_chars': a setting needs its reason"),
        (
            "filters.sentences.max_sentence_chars",
            _DELETE,
            "'filters.sentences.max_sentence_chars': missing",
        ),
        (
            "filters.length.min_chars.value",
            10**7,
            "'filters.length': min_chars (10000000) is above max_chars",
        ),
        (
            "normalise.drop_line_patterns.value",
            ["[a-"],
            "'normalise.drop_line_patterns': drop_line_patterns: '[a-' is not a valid regular expression",
        ),
        (
            "normalise.strip_section",
            {"value": [], "reason": "typo"},
            "'normalise.strip_section': unknown key",
        ),
    ],
)
def test_a_broken_preset_file_fails_in_one_line_naming_file_and_key(
    tmp_path, dotted, value, expected
):
    written = yaml.safe_load((PRESETS_DIR / "web.yaml").read_text(encoding="utf-8"))
    _set(written, dotted, value)
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump(written, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        read_preset(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"preset {path}: ") and expected in message


def test_a_broken_shipped_preset_stops_config_loading_in_one_line(tmp_path, monkeypatch):
    import data_prep.source_presets as presets

    (tmp_path / "web.yaml").write_text("filters: {}\nnormalize: {}\n", encoding="utf-8")
    monkeypatch.setattr(presets, "PRESETS_DIR", tmp_path)
    monkeypatch.setattr(presets, "PRESET_NAMES", ("web",))
    presets._shipped_preset.cache_clear()
    try:
        with pytest.raises(ConfigError) as caught:
            source()
    finally:
        presets._shipped_preset.cache_clear()
    assert (
        str(caught.value)
        == f"preset {tmp_path / 'web.yaml'}: 'normalize': unknown key; remove it or fix its spelling"
    )


def test_preset_files_are_package_data():
    """A non-editable install ships only the data files pyproject.toml lists."""
    settings = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = settings["tool"]["setuptools"]["package-data"]["data_prep"]
    package = REPO / "data_prep"
    for path in sorted(PRESETS_DIR.iterdir()):
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
