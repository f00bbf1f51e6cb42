"""kinoe tokenizer on real Japanese text: sampling, training, export, report, shards, errors."""

from __future__ import annotations

import gzip
import json
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import yaml

from common.errors import ConfigError, KinoeError
from common.manifest import read_manifest
from common.run import load_stage_config, run_stage
from data_prep.aozora import clean_aozora
from data_prep.normalise import normalise_text
from data_prep.source_presets import source_preset
from tokenizer.chat import CHAT_TOKENS
from tokenizer.cli import STEPS, hf_path, model_path, shards_path, step_dir
from tokenizer.config import SampleConfig, TokenizerConfig
from tokenizer.indexed import open_shard_set, tokenizer_sha256
from tokenizer.sample import is_held_out, training_lines, write_sample

from conftest import SHARED_DATA, error_lines

MISTRAL = SHARED_DATA / "tokenizers" / "mistral-7b-v0.1.model"
LLM_JP = SHARED_DATA / "tokenizers" / "llm-jp-v2.2-50k.model"


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    """Real corpora as data_prep documents (normalised, documents contract), one file per source."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/SOURCES.md)")
    folder = tmp_path_factory.mktemp("documents")
    corpus = SHARED_DATA / "corpus"

    def write(name: str, preset: str, records: list[tuple[str, str]]) -> None:
        with gzip.open(folder / f"{name}.jsonl.gz", "wt", encoding="utf-8") as handle:
            for doc_id, text in records:
                text = normalise_text(text, source_preset(preset).normalise)
                if text:
                    record = {"id": doc_id, "text": text, "source": name, "metadata": {}}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    with gzip.open(corpus / "wikipedia_ja_leads.jsonl.gz", "rt", encoding="utf-8") as handle:
        write("wikipedia", "wikipedia", [(d["id"], d["text"]) for d in map(json.loads, handle)])
    with gzip.open(corpus / "fineweb2_ja_web.jsonl.gz", "rt", encoding="utf-8") as handle:
        write("web", "web", [(d["id"], d["text"]) for d in map(json.loads, handle)])
    works = []
    for bundle in ("card000081.tar.gz", "card000035.tar.gz"):
        with tarfile.open(corpus / "aozora" / bundle) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".txt"):
                    works.append((member.name, clean_aozora(archive.extractfile(member).read())[0]))
    write("aozora", "literature", works)
    return folder


@pytest.fixture(scope="module")
def trained(documents, tmp_path_factory) -> TokenizerConfig:
    """Train, export, report and encode once, as the commands do."""
    runs = tmp_path_factory.mktemp("runs")
    config = TokenizerConfig.model_validate(
        {
            "run": {"root": str(runs), "name": "real"},
            "sample": {
                "documents": str(documents),
                "weights": {"wikipedia": 1.0, "web": 1.0, "aozora": 3.0},
                "character_budget": 2_000_000,
                "held_out_fraction": 0.1,
                "held_out_max_documents": 400,
            },
            "trainer": {"vocab_size": 16_000, "num_threads": 2},
            "report": {"references": {"mistral-7b-v0.1": str(MISTRAL), "llm-jp-v2.2": str(LLM_JP)}},
            "executor": {"tasks": 2, "workers": 2},
        }
    )
    for step in ("train", "export", "report", "encode"):
        assert run_stage(STEPS[step], config).status == "complete", step
    return config


@pytest.fixture(scope="module")
def processor(trained) -> spm.SentencePieceProcessor:
    """The trained tokenizer's SentencePiece model."""
    return spm.SentencePieceProcessor(model_file=str(model_path(trained)))


def held_out(config: TokenizerConfig) -> list[dict]:
    with (step_dir(config, "train") / "held_out.jsonl").open() as handle:
        return [json.loads(line) for line in handle]


def test_compression_beats_the_references_on_held_out_wikipedia(trained):
    report = json.loads((step_dir(trained, "report") / "report.json").read_text())
    ours = report["tokenizers"]["kinoe"]["by_source"]["wikipedia"]
    mistral = report["tokenizers"]["mistral-7b-v0.1"]["by_source"]["wikipedia"]
    assert ours["documents"] >= 100
    assert ours["characters_per_token"] >= 1.5
    assert mistral["characters_per_token"] < 1.0  # about 0.9, see ../shared/data/SOURCES.md
    assert report["tokenizers"]["kinoe"]["by_source"]["all"]["round_trip_exact"] == 1.0
    assert report["tokenizers"]["kinoe"]["by_source"]["all"]["unknown_rate"] == 0.0
    assert report["hf_sentencepiece_id_mismatches"] == 0
    assert "| kinoe |" in (step_dir(trained, "report") / "report.md").read_text()


def test_held_out_documents_never_reach_the_sample(tmp_path):
    """Each real lead gets a unique marker sentence; held-out markers never reach the sample."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    with gzip.open(
        SHARED_DATA / "corpus" / "wikipedia_ja_leads.jsonl.gz", "rt", encoding="utf-8"
    ) as handle:
        leads = [json.loads(line) for line in handle]
    folder = tmp_path / "documents"
    folder.mkdir()
    with gzip.open(folder / "00000.jsonl.gz", "wt", encoding="utf-8") as handle:
        for lead in leads:
            text = f"{lead['text']}\n整理番号{lead['id']}番。"
            handle.write(
                json.dumps(
                    {"id": lead["id"], "text": text, "source": "wikipedia"}, ensure_ascii=False
                )
                + "\n"
            )
    sample_config = SampleConfig(
        documents=folder, character_budget=10_000_000, held_out_fraction=0.2
    )
    stats = write_sample(sample_config, 4192, tmp_path / "sample.txt", tmp_path / "held_out.jsonl")
    lines = set((tmp_path / "sample.txt").read_text(encoding="utf-8").splitlines())
    held = [
        json.loads(line)["id"] for line in (tmp_path / "held_out.jsonl").read_text().splitlines()
    ]
    assert 320 < len(held) < 490 and stats.held_out == {"wikipedia": len(held)}
    assert not [i for i in held if f"整理番号{i}番。" in lines]
    assert all(
        f"整理番号{lead['id']}番。" in lines for lead in leads if lead["id"] not in set(held)
    )


def test_sample_follows_the_weights(trained):
    stats = json.loads((step_dir(trained, "train") / "sample_stats.json").read_text())["sample"]
    assert stats["budgets"] == {"wikipedia": 400_000, "web": 400_000, "aozora": 1_200_000}
    # Wikipedia and web hold less text than their budgets; Aozora fills its share.
    assert stats["characters"]["aozora"] >= 1_200_000
    assert set(stats["shortfalls"]) == {"wikipedia", "web"}


def test_every_special_and_chat_token_is_one_piece(processor):
    assert processor.get_piece_size() == 16_000
    assert [processor.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    for token in ("\n", *CHAT_TOKENS):
        assert len(processor.encode(token)) == 1, token


def test_hf_directory_loads_and_matches_sentencepiece(trained, processor):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_path(trained))
    assert tokenizer.is_fast and (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    ) == (1, 2, 3)
    for document in held_out(trained)[:100]:
        ids = tokenizer(document["text"], add_special_tokens=False).input_ids
        assert ids == processor.encode(document["text"])
        assert tokenizer.decode(ids) == document["text"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "日本の首都は？"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\n日本の首都は？<|im_end|>\n<|im_start|>assistant\n"


def test_shards_round_trip_to_the_documents(trained, processor, documents):
    sha = tokenizer_sha256(model_path(trained))
    for source in ("wikipedia", "web", "aozora"):
        datasets = open_shard_set(shards_path(trained) / source, sha)
        decoded = []
        for dataset in datasets:
            assert dataset.dtype == np.uint16  # 16,000 pieces fit
            for index in range(len(dataset)):
                ids = dataset[index].tolist()
                assert ids[-1] == processor.eos_id()
                decoded.append(processor.decode(ids[:-1]))
        with gzip.open(documents / f"{source}.jsonl.gz", "rt", encoding="utf-8") as handle:
            expected = [json.loads(line)["text"] for line in handle]
        assert sorted(decoded) == sorted(expected)


def test_shards_refuse_another_tokenizer(trained):
    with pytest.raises(KinoeError) as caught:
        open_shard_set(shards_path(trained) / "wikipedia", tokenizer_sha256(MISTRAL))
    message = str(caught.value)
    assert "\n" not in message and "kinoe tokenizer encode" in message
    assert (
        tokenizer_sha256(MISTRAL)[:12] in message
        and tokenizer_sha256(model_path(trained))[:12] in message
    )


def test_rerun_is_skipped_and_steps_keep_their_own_fingerprints(trained):
    assert run_stage(STEPS["train"], trained).status == "skipped"
    # A report setting does not redo encoding; a trainer setting would redo training.
    changed = trained.model_copy(
        update={"report": trained.report.model_copy(update={"references": {}})}
    )
    assert run_stage(STEPS["encode"], changed).status == "skipped"
    retrained = trained.model_copy(deep=True)
    retrained.trainer.vocab_size = 16_128
    with pytest.raises(KinoeError, match=r"changed: trainer.vocab_size"):
        run_stage(STEPS["train"], retrained)


def test_training_lines_respect_the_byte_limit():
    text = "とても長い一文" * 2000 + "。次の文です。\n改行の後。"
    lines = list(training_lines(text, 4192))
    assert all(len(line.encode("utf-8")) <= 4192 for line in lines)
    assert "".join(lines) == text.replace("\n", "")
    assert lines[-2:] == ["次の文です。", "改行の後。"]


def test_held_out_choice_is_stable_and_proportional():
    chosen = [is_held_out(str(i), 7, 0.1) for i in range(20_000)]
    assert chosen == [is_held_out(str(i), 7, 0.1) for i in range(20_000)]
    assert 0.09 < sum(chosen) / len(chosen) < 0.11


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "trainer.vocab_size=65000",
            "vocab_size 65000 is not a multiple of 128; use 64896 or 65024",
        ),
        ("trainer.model_type=wordpiece", "'trainer.model_type'"),
        ("sample.weights.web=0", "weights must be positive; fix web"),
        ("encode.rehydrate.copies.1=20", "copies must be 1 to 16 per document; fix 1: 20"),
        ("encode.rehydrate.copies={2: 2}", "copies needs the key 1 (unique documents)"),
        ("encode.rehydrate.sources=[chat]", "rehydrate.sources names chat source(s) chat"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path, override, expected):
    path = tmp_path / "t.yaml"
    chat = tmp_path / "chat.jsonl"
    path.write_text(
        yaml.safe_dump(
            {"sample": {"documents": str(tmp_path)}, "encode": {"chat": {"chat": str(chat)}}}
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_stage_config(TokenizerConfig, path, [override])
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_missing_earlier_step_says_what_to_run(tmp_path):
    config = TokenizerConfig.model_validate(
        {"run": {"root": str(tmp_path)}, "sample": {"documents": str(tmp_path)}}
    )
    with pytest.raises(KinoeError, match="run `kinoe tokenizer train` with this config first"):
        run_stage(STEPS["export"], config)


def test_quickstart_commands_chain(kinoe, tmp_path):
    runs = f"run.root={tmp_path}"
    documents = f"sample.documents={tmp_path}/data/quickstart/documents"
    assert kinoe("data", "-c", "configs/data/quickstart.yaml", runs).returncode == 0
    for step in ("train", "export", "report", "encode"):
        result = kinoe(
            "tokenizer", step, "-c", "configs/tokenizer/quickstart.yaml", runs, documents
        )
        assert result.returncode == 0, result.stderr[-1500:]
    shards = tmp_path / "tokenizer" / "quickstart" / "encode" / "shards"
    assert {p.name for p in shards.iterdir()} == {"web", "wikipedia", "instructions"}
    manifest = json.loads((shards.parent / "manifest.json").read_text())
    assert manifest["status"] == "complete" and sum(manifest["summary"]["tokens"].values()) > 10_000
    # The bundled conversations are all valid: every line becomes a sequence.
    instructions = manifest["summary"]["conversations"]["instructions"]
    assert instructions["read"] == instructions["encoded"] == 43 and not instructions["rejected"]


# ---------------------------------------------------------------- bad input: what the user sees
#
# One row per kind of bad input (docs/reliability.md, "Bad input"): the command either ends
# with one `error:` line and a non-zero exit code, or finishes and counts what it left out by
# reason, keeping every good record. tests/test_eval.py has the same matrix for `kinoe eval`.

GOOD = 1000  # real Wikipedia leads, about 61,000 characters: all fit the budget below


@pytest.fixture(scope="module")
def leads() -> list[dict]:
    """The first Wikipedia leads as data_prep documents (source wikipedia)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/SOURCES.md)")
    with gzip.open(SHARED_DATA / "corpus" / "wikipedia_ja_leads.jsonl.gz", "rt") as handle:
        records = [json.loads(line) for _, line in zip(range(GOOD), handle, strict=False)]
    return [
        {"id": r["id"], "text": r["text"], "source": "wikipedia", "metadata": {}} for r in records
    ]


def jsonl(records: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def write_documents(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """``tmp_path/documents`` holding ``files`` (name -> bytes)."""
    documents = tmp_path / "documents"
    documents.mkdir()
    for name, data in files.items():
        (documents / name).write_bytes(data)
    return documents


def refused(outcome, expected: tuple[int, str] | dict) -> bool:
    """True when ``expected`` is (exit code, the error's words) and the command ended so, in one
    error line; False when the command succeeded, without one."""
    if isinstance(expected, tuple):
        code, words = expected
        assert outcome.returncode == code and len(error_lines(outcome)) == 1, outcome.stderr
        assert words in error_lines(outcome)[0], error_lines(outcome)[0]
        return True
    assert outcome.returncode == 0 and not error_lines(outcome), outcome.stderr
    return False


def with_bad_lines(leads: list[dict], *bad: bytes) -> dict[str, bytes]:
    """The good file with ``bad`` lines in its middle."""
    good = jsonl(leads).splitlines(keepends=True)
    return {"good.jsonl": b"".join(good[: GOOD // 2] + list(bad) + good[GOOD // 2 :])}


def truncated_gz(leads: list[dict]) -> dict[str, bytes]:
    other = [{**lead, "id": f"other-{lead['id']}", "source": "other"} for lead in leads[:300]]
    packed = gzip.compress(jsonl(other))
    return {"good.jsonl": jsonl(leads), "other.jsonl.gz": packed[: len(packed) // 2]}


def huge_document(leads: list[dict]) -> dict:
    """One 50 MB document of real Japanese (source other)."""
    text = "".join(lead["text"] for lead in leads)
    text *= 50 * 2**20 // len(text.encode()) + 1
    return {"id": "huge", "text": text, "source": "other", "metadata": {}}


def fifty_mb_record(leads: list[dict]) -> dict[str, bytes]:
    # Not held out (held-out documents are kept whole for the report): this row is about the sample.
    assert not is_held_out("huge", 1234, 0.01)
    return {"good.jsonl": jsonl(leads), "huge.jsonl": jsonl([huge_document(leads)])}


def shift_jis(leads: list[dict]) -> dict[str, bytes]:
    others = [{**lead, "source": "other"} for lead in leads[:3]]
    return {
        "good.jsonl": jsonl(leads),
        "sjis.jsonl": jsonl(others).decode().encode("cp932", "replace"),
    }


# JSON allows "\ud800" unpaired, but such a text is not Unicode: it cannot be written as UTF-8
# (the sample) nor encoded (SentencePiece raises TypeError).
EMPTY_AND_SURROGATE_TEXTS = (
    b'{"id": "e", "text": "", "source": "wikipedia"}\n',
    b'{"id": "s", "text": "\\ud800\xe3\x81\x82", "source": "wikipedia"}\n',
)

# name -> (files of the documents folder, config changes, expected: exit code and the error's
# words, or the records left out by reason)
TOKENIZER_MATRIX = {
    "empty file": (
        lambda leads: {"empty.jsonl": b""},
        {},
        (1, "no text for sources other, wikipedia under"),
    ),
    "invalid UTF-8": (
        lambda leads: with_bad_lines(
            leads, b'{"id": "x", "text": "caf\xe9", "source": "wikipedia"}\n'
        ),
        {},
        {"invalid_utf8": 1},
    ),
    "Shift_JIS file": (shift_jis, {}, {"invalid_utf8": 3}),
    "truncated .gz": (truncated_gz, {}, {"corrupt_file": 1}),
    "malformed record": (
        lambda leads: with_bad_lines(leads, '{"id": "cut", "text": "途中で切れ\n'.encode()),
        {},
        {"malformed_json": 1},
    ),
    "wrong field type": (
        lambda leads: with_bad_lines(
            leads, b'{"id": "n", "text": 42, "source": "wikipedia"}\n', b"[1, 2]\n"
        ),
        {},
        {"text_not_a_string": 1, "not_an_object": 1},
    ),
    "empty or unpaired-surrogate text": (
        lambda leads: with_bad_lines(leads, *EMPTY_AND_SURROGATE_TEXTS),
        {},
        {"empty_text": 1, "unpaired_surrogate": 1},
    ),
    "50 MB record": (fifty_mb_record, {}, {}),
    "missing file": (lambda leads: {}, {"documents": "nowhere"}, (1, "input sample.documents = ")),
    "number as a string": (
        lambda leads: {"good.jsonl": jsonl(leads)},
        {"character_budget": "130000"},
        (
            2,
            "'sample.character_budget': character_budget must be an integer, not the string '130000'",
        ),
    ),
}


@pytest.mark.parametrize("case", list(TOKENIZER_MATRIX))
def test_bad_input_to_tokenizer_train(case, leads, tmp_path, kinoe):
    files, sample_changes, expected = TOKENIZER_MATRIX[case]
    documents = write_documents(tmp_path, files(leads))
    sample = {
        "documents": str(documents),
        "weights": {"wikipedia": 1.0, "other": 1.0},
        "character_budget": 130_000,  # 65,000 per source: every good lead, and a cap on the rest
        "held_out_max_documents": 10,
    }
    sample.update(
        {k: (str(tmp_path / v) if k == "documents" else v) for k, v in sample_changes.items()}
    )
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"root": str(tmp_path / "runs")},
                "sample": sample,
                "trainer": {"vocab_size": 1536, "character_coverage": 0.98, "num_threads": 1},
            }
        )
    )
    outcome = kinoe("tokenizer", "train", "-c", config)
    manifest = read_manifest(tmp_path / "runs" / "tokenizer" / "bad" / "train")
    if refused(outcome, expected):
        return
    summary = manifest.summary["sample"]
    assert summary["rejected"] == expected
    for reason in expected:
        assert f"records left out of the sample ({reason})" in outcome.stderr
    # Every good record is in the sample or held out: nothing accepted was lost.
    assert summary["documents"]["wikipedia"] + summary["held_out"].get("wikipedia", 0) == GOOD
    if case == "truncated .gz":  # what was read before the damage is kept
        assert summary["documents"]["other"] + summary["held_out"].get("other", 0) > 0
    if case == "50 MB record":  # one document, read only as far as its source's budget
        assert summary["documents"]["other"] == 1
        assert 65_000 <= summary["characters"]["other"] < 65_000 + 4192


# `kinoe tokenizer encode` reads the same documents the same way (tokenizer.encode.DocumentReader):
# the rows above, with encode's own outcome where it differs. Its tokenizer is llm-jp's (real
# Japanese pieces, encoding 50 MB in about 2 s), put where `kinoe tokenizer train` would.
ENCODE_MATRIX = {
    **{
        case: TOKENIZER_MATRIX[case]
        for case in (
            "invalid UTF-8",
            "Shift_JIS file",
            "truncated .gz",
            "malformed record",
            "wrong field type",
            "empty or unpaired-surrogate text",
        )
    },
    "empty file": (
        lambda leads: {"empty.jsonl": b""},
        {},
        (1, "no document to encode in the 1 file(s) under"),
    ),
    "50 MB record": (
        lambda leads: {"good.jsonl": jsonl(leads), "huge.jsonl": jsonl([huge_document(leads)])},
        {},
        {},
    ),
    "missing file": (lambda leads: {}, {"documents": "nowhere"}, (1, "input encode.documents = ")),
    "number as a string": (
        lambda leads: {"good.jsonl": jsonl(leads)},
        {"batch_size": "256"},
        (2, "'encode.batch_size': batch_size must be an integer, not the string '256'"),
    ),
}


def readable_records(files: dict[str, bytes]) -> list[dict]:
    """The good records of the other source: whole lines of valid JSON before any damage."""
    records = []
    for name, data in files.items():
        if name.endswith(".gz"):  # a truncated stream: the lines that decompress whole
            data = zlib.decompressobj(wbits=31).decompress(data)
            data = data[: data.rfind(b"\n") + 1]
        for line in data.splitlines():
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(record, dict) and record.get("source") == "other":
                records.append(record)
    return records


@pytest.fixture(scope="module")
def llm_jp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(LLM_JP))


@pytest.mark.parametrize("case", list(ENCODE_MATRIX))
def test_bad_input_to_tokenizer_encode(case, leads, llm_jp, tmp_path, kinoe):
    build, encode_changes, expected = ENCODE_MATRIX[case]
    files = build(leads)
    documents = write_documents(tmp_path, files)
    encode = {k: (str(tmp_path / v) if k == "documents" else v) for k, v in encode_changes.items()}
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"root": str(tmp_path / "runs")},
                "sample": {"documents": str(documents)},
                "encode": encode,
                # Two tasks in this process: one file each, their accounts added up.
                "executor": {"tasks": 2, "workers": 1},
            }
        )
    )
    train = tmp_path / "runs" / "tokenizer" / "bad" / "train"
    train.mkdir(parents=True)
    shutil.copy(LLM_JP, train / "tokenizer.model")
    outcome = kinoe("tokenizer", "encode", "-c", config)
    if refused(outcome, expected):
        return
    # Every good record is encoded, whole: documents and tokens as encoding each one gives.
    shards = train.parent / "encode" / "shards"
    others = readable_records({n: d for n, d in files.items() if n != "good.jsonl"})
    for source, records in (("wikipedia", leads), ("other", others)):
        if not records:
            assert not (shards / source).exists()
            continue
        meta = json.loads((shards / source / "shards.json").read_text())
        assert meta["documents"] == len(records), source
        if case != "50 MB record":  # encoding it again here would cost seconds; checked below
            tokens = sum(len(ids) + 1 for ids in llm_jp.encode([r["text"] for r in records]))
            assert meta["tokens"] == tokens, source
    if case == "50 MB record":  # a real document: encoded whole, not cut
        (dataset,) = open_shard_set(shards / "other", tokenizer_sha256(LLM_JP))
        ids, text = dataset[0], others[0]["text"]
        assert ids[-1] == llm_jp.eos_id() and len(ids) > 10_000_000
        assert text.startswith(llm_jp.decode(ids[:50].tolist()))
        assert text.endswith(llm_jp.decode(ids[-51:-1].tolist()))
    summary = read_manifest(train.parent / "encode").summary
    assert summary["read"]["documents"] == GOOD + len(others)
    assert summary["read"]["rejected"] == expected
    for reason in expected:
        first = summary["read"]["first_rejected"][reason]
        assert first.startswith(str(documents)), first
        assert f"left out of the documents ({reason}), the first at {first}" in outcome.stderr
    if case == "truncated .gz":  # the records before the damage are encoded
        assert 0 < len(others) < 300
