"""Aozora Bunko files as documents: real works lose their markup, header and colophon; bad files are counted."""

from __future__ import annotations

import functools
import io
import os
import random
import re
import tarfile
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath

import pytest
from datatrove.data import Document

from data_prep.aozora import AozoraReader, clean_aozora

BUNDLE = "card000081.tar.gz"  # Miyazawa Kenji
MARKUP_LEFTOVERS = ("《", "》", "［＃", "｜", "底本：", "【テキスト中に現れる記号について】")


@functools.cache
def works_in(bundle: Path) -> dict[str, bytes]:
    """The raw bytes of every .txt in a tar bundle, by member name."""
    with tarfile.open(bundle) as archive:
        return {
            member.name: archive.extractfile(member).read()
            for member in archive.getmembers()
            if member.name.endswith(".txt")
        }


@functools.cache
def documents_of(folder: Path, glob: str) -> dict[str, Document]:
    """What the reader yields for the matching files, by document id."""
    documents = list(AozoraReader(str(folder), glob_pattern=glob).run(None, 0, 1))
    by_id = {document.id: document for document in documents}
    assert len(by_id) == len(documents), "document ids repeat"
    return by_id


@pytest.fixture
def bundle(shared_data) -> Path:
    return shared_data / "corpus" / "aozora" / BUNDLE


@pytest.fixture
def documents(bundle) -> dict[str, Document]:
    return documents_of(bundle.parent, BUNDLE)


def work_id(member: str) -> str:
    return f"card000081/{PurePosixPath(member).stem}"


def lines_of(raw: bytes) -> list[str]:
    return raw.decode("cp932").splitlines()


def without_ruby(line: str) -> str:
    return re.sub(r"《[^》]*》", "", line).replace("｜", "")


def raw_body(raw: bytes) -> str:
    """The raw text, markup intact, before the colophon, without the header's markup examples."""
    text = raw.decode("cp932").replace("\r\n", "\n").replace("\r", "\n")
    lines = text[: text.index("\n底本：")].split("\n")
    return "\n".join(line for line in lines if not line.startswith("（例）"))


def test_every_work_in_the_bundle_is_read_without_markup(bundle, documents):
    works = works_in(bundle)
    assert len(works) > 250
    assert set(documents) == {work_id(member) for member in works}
    for member, raw in works.items():
        document = documents[work_id(member)]
        assert "read_error" not in document.metadata, (member, document.metadata)
        assert document.metadata["source"] == "aozora"
        assert document.metadata["file"].endswith(f"{BUNDLE}/{member}")
        assert document.metadata["replacement_chars"] == 0
        assert len(document.text) > 100 or len(raw) < 4000, member
        for leftover in MARKUP_LEFTOVERS:
            assert leftover not in document.text, (member, leftover)
        assert "\r" not in document.text and "青空文庫作成ファイル" not in document.text


def test_title_and_author_come_from_the_header(bundle, documents):
    two_line_headers = 0
    for member, raw in works_in(bundle).items():
        lines = lines_of(raw)
        metadata = documents[work_id(member)].metadata
        if "［＃" not in lines[0]:
            assert metadata["title"] == without_ruby(lines[0]).strip()
        if not lines[2].strip():
            two_line_headers += 1
            assert metadata["author"] == lines[1].strip()
        else:  # a subtitle sits between title and author
            assert metadata["author"] == lines[2].strip()
            assert metadata["author"] != lines[1].strip()
    assert two_line_headers > 250


def test_ruby_is_removed_and_its_base_text_kept(bundle, documents):
    other_markup = ("［＃", "※", "／")  # notes, gaiji and repetition marks, checked elsewhere
    checked = 0
    for member, raw in works_in(bundle).items():
        text = documents[work_id(member)].text
        for line in raw_body(raw).split("\n")[3:]:
            if "《" in line and "｜" in line and not any(mark in line for mark in other_markup):
                assert without_ruby(line).rstrip() in text, (member, line)
                checked += 1
    assert checked > 100


def test_the_body_ends_where_the_colophon_begins(bundle, documents):
    checked = 0
    for member, raw in works_in(bundle).items():
        lines = lines_of(raw)
        colophon = next(i for i, line in enumerate(lines) if line.startswith("底本："))
        last = next(line for line in reversed(lines[:colophon]) if line.strip())
        if any(mark in last for mark in ("［＃", "※", "／")) or set(last.strip()) == {"-"}:
            continue
        assert documents[work_id(member)].text.endswith(without_ruby(last).rstrip()), member
        checked += 1
    assert checked > 200


def test_gaiji_notes_become_the_characters_they_describe(bundle, documents):
    works = works_in(bundle)
    # JIS X 0213 plane 1 row 15 cell 19 is 噉 (口＋敢); 1-2-54 is ⦅; the repetition mark ／＼ is 〱.
    for note, character in (("「口＋敢」、第3水準1-15-19", "噉"), ("始め二重括弧、1-2-54", "⦅")):
        holders = [m for m, raw in works.items() if note in raw.decode("cp932")]
        assert holders, note
        for member in holders:
            body = raw_body(works[member])
            assert documents[work_id(member)].text.count(character) == body.count(note)
    repeated = [m for m, raw in works.items() if "／＼" in raw_body(raw)]
    assert repeated
    for member in repeated:
        assert "〱" in documents[work_id(member)].text
    # A note naming no code (a character described in words only) is dropped with its ※.
    indra = next(m for m in works if m.endswith("/460_ruby.txt"))
    assert "于※［＃もんがまえに真の正字。読みは「タン」］大寺" in raw_body(works[indra])
    assert "于大寺" in documents[work_id(indra)].text


def test_undecodable_bytes_are_replaced_and_counted(bundle):
    raw = next(iter(works_in(bundle).values()))
    colophon = "底本：".encode("cp932")
    # 0x81 starts a two-byte character, and a space cannot end one.
    damaged = raw.replace(colophon, b"\x81 \x81 \r\n" + colophon, 1)
    text, metadata = clean_aozora(raw)
    damaged_text, damaged_metadata = clean_aozora(damaged)
    assert metadata["replacement_chars"] == 0
    assert damaged_metadata["replacement_chars"] == 2
    assert damaged_text.startswith(text) and damaged_text.endswith("\n\ufffd \ufffd")
    assert (damaged_metadata["title"], damaged_metadata["author"]) == (
        metadata["title"],
        metadata["author"],
    )


def test_bad_files_are_counted_not_fatal(tmp_path, bundle):
    works = works_in(bundle)
    names = sorted(works)
    good, other = works[names[0]], works[names[1]]
    folder = tmp_path / "aozora"
    folder.mkdir()
    noise = random.Random(0).randbytes(4000)
    header_only = "題名\r\n作者\r\n\r\n底本：「全集」\r\n".encode("cp932")
    members = {
        "cards/1/files/good/good.txt": good,
        "cards/1/files/binary/binary.txt": b"\x00" + noise,
        "cards/1/files/noise/noise.txt": noise.replace(b"\x00", b""),
        "cards/1/files/utf8/utf8.txt": good.decode("cp932").encode("utf-8"),
        "cards/1/files/empty/empty.txt": b"",
        "cards/1/files/headless/headless.txt": b"\r\n" + good,
        "cards/1/files/header_only/header_only.txt": header_only,
        "cards/1/files/good/illustration.png": b"\x89PNG\r\n",
    }
    with tarfile.open(folder / "bundle.tar.gz", "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(folder / "1047_ruby_20129.zip", "w") as archive:
        archive.writestr("ginga.txt", other)
        archive.writestr("fig1.png", b"\x89PNG\r\n")
    (folder / "single.txt").write_bytes(good)
    (folder / "broken.zip").write_bytes(b"PK\x03\x04" + os.urandom(200))
    whole = bundle.read_bytes()
    (folder / "truncated.tar.gz").write_bytes(whole[: len(whole) // 3])
    (folder / "README.md").write_text("Aozora Bunko texts\n", encoding="utf-8")

    reader = AozoraReader(str(folder), source="literature")
    documents = list(reader.run(None, 0, 1))

    errors = Counter(d.metadata.get("read_error") for d in documents if "read_error" in d.metadata)
    assert errors == {
        "binary_file": 1,
        "undecodable_bytes": 1,
        "utf8_not_shift_jis": 1,
        "empty_file": 1,
        "no_header": 1,
        "corrupt_archive": 2,
        "unsupported_file": 1,
    }
    for document in documents:
        assert document.metadata["source"] == "literature"
        if "read_error" in document.metadata:
            assert document.text == ""
    by_id = {d.id: d for d in documents}
    assert by_id["bundle/good"].text == by_id["single"].text == clean_aozora(good)[0]
    assert by_id["1047_ruby_20129/ginga"].text == clean_aozora(other)[0]
    assert by_id["bundle/header_only"].text == ""  # a work with no body is passed on, not skipped
    assert "read_error" not in by_id["bundle/header_only"].metadata
    assert by_id["truncated"].metadata["read_error"] == "corrupt_archive"
    read_before_damage = [d for d in documents if d.id.startswith("truncated/")]
    assert 0 < len(read_before_damage) < len(works)
    assert reader.stats["skipped_members"].total == 2
