"""Aozora Bunko works as documents: Shift_JIS text with ruby, notes, a header and a colophon.

An Aozora file (CP932, CRLF; a few old ones end lines with a bare CR) looks like::

    title               <- first line; a subtitle may follow
    author              <- last header line that is not a translator's ("...訳")
                        <- blank line
    -------------------------------------------------------
    【テキスト中に現れる記号について】   <- how to read the markup; dropped
    《》：ルビ ...
    -------------------------------------------------------
    body with 漢字《かんじ》 ruby, ｜ ruby starts, ［＃...］ notes and ※［＃...］ gaiji
    底本：...            <- colophon (source book, typists, licence) to the end; dropped
                           (translations start it with 翻訳の原作：)

``clean_aozora`` turns one file into plain text: ruby readings, ruby starts and layout notes
go; a gaiji note (a character Shift_JIS lacks) becomes the character itself when the note
gives its JIS X 0213 position or Unicode code point, and is dropped otherwise. ``AozoraReader``
yields one document per work from .txt files, Aozora's .zip downloads and .tar.gz bundles.
"""

from __future__ import annotations

import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import BinaryIO

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseDiskReader

ENCODING = "cp932"

# A file is taken as not being in Shift_JIS when more than this share of its characters
# could not be decoded (real Aozora files have none).
MAX_REPLACEMENT_SHARE = 0.01

_SEPARATOR = re.compile(r"-{10,}")
# How far into the file the markup explanation may reach before it is taken as body text.
_EXPLANATION_MAX_LINES = 80
_EXPLANATION_HEADINGS = ("【テキスト中に現れる記号について】", "［表記について］")
# The colophon names the source book (a translation names the original instead).
_COLOPHON_STARTS = ("底本：", "翻訳の原作：")
_TRANSLATOR = re.compile(r"訳$|^translated by|翻訳", re.IGNORECASE)

_RUBY = re.compile(r"《[^》\n]*》")
# An annotation with no brackets inside: nested ones are removed innermost first. A leading
# ※ makes it a gaiji note standing for one character.
_INNERMOST_NOTE = re.compile(r"(※?)［＃([^［］\n]*)］")
_JIS_LEVEL_CODE = re.compile(r"第[34]水準([12])-(\d{1,2})-(\d{1,2})")
_JIS_CODE = re.compile(r"(?<![\d-])([12])-(\d{1,2})-(\d{1,2})(?![\d-])")
_UNICODE_CODE = re.compile(r"U\+([0-9A-Fa-f]{4,6})")
# Characters that are markup in Aozora text; a gaiji note that decodes to one is dropped, so
# that any of them left in cleaned text means markup that escaped cleaning.
_MARKUP_CHARACTERS = frozenset("《》｜")
# Horizontal text writes the two-line-high repetition mark (くの字点) as ／＼, voiced ／″＼.
_REPETITION_MARKS = (("／″＼", "〲"), ("／＼", "〱"))

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class NotAozoraText(ValueError):
    """A file that cannot be an Aozora Bunko text; ``reason`` is a short label for reports."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def clean_aozora(raw: bytes) -> tuple[str, dict]:
    """Plain text of one Aozora file, and its metadata {title, author, replacement_chars}."""
    text, replacements = _decode(raw)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    header_end = 0
    while (
        header_end < len(lines)
        and lines[header_end].strip()
        and not _SEPARATOR.fullmatch(lines[header_end].strip())
    ):
        header_end += 1
    header = [_strip_markup(line).strip() for line in lines[:header_end]]
    if len(header) < 2 or not all(header[:2]):
        raise NotAozoraText("no_header", "the first two lines must hold the title and author")
    body_start = _skip_explanation(lines, header_end)
    body_end = next(
        (i for i in range(body_start, len(lines)) if lines[i].startswith(_COLOPHON_STARTS)),
        len(lines),
    )
    body = []
    for line in lines[body_start:body_end]:
        # Rules of dashes fence the editors' notes and frame tables: layout, not text.
        if _SEPARATOR.fullmatch(line.strip()):
            continue
        cleaned = _strip_markup(line)
        # A line that held only layout notes (［＃改ページ］) goes; blank lines stay.
        if cleaned.strip() or not line.strip():
            body.append(cleaned.rstrip())
    metadata = {
        "title": header[0],
        "author": _author(header[1:]),
        "replacement_chars": replacements,
    }
    return "\n".join(body).strip("\n"), metadata


def _decode(raw: bytes) -> tuple[str, int]:
    if not raw.strip():
        raise NotAozoraText("empty_file", "no text")
    if b"\x00" in raw:
        raise NotAozoraText("binary_file", "contains NUL bytes, which Shift_JIS text never has")
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            raise NotAozoraText("utf8_not_shift_jis", "valid UTF-8; Aozora texts are Shift_JIS")
    text = raw.decode(ENCODING, errors="replace")
    replacements = text.count("\ufffd")
    if replacements > MAX_REPLACEMENT_SHARE * len(text):
        raise NotAozoraText(
            "undecodable_bytes", f"{replacements} of {len(text)} characters are not Shift_JIS"
        )
    return text, replacements


def _skip_explanation(lines: list[str], header_end: int) -> int:
    """Index of the first body line: after the markup explanation block when there is one."""
    first = header_end
    while first < len(lines) and not lines[first].strip():
        first += 1
    if first >= len(lines):
        return first
    opening = lines[first].strip()
    if _SEPARATOR.fullmatch(opening):
        search_from = first + 1
    elif opening.startswith(_EXPLANATION_HEADINGS):
        search_from = first
    else:
        return header_end
    for index in range(search_from, min(len(lines), first + _EXPLANATION_MAX_LINES)):
        if _SEPARATOR.fullmatch(lines[index].strip()):
            return index + 1
    # An opening rule with no closing one: only the rule itself is dropped.
    return first + 1 if search_from > first else header_end


def _author(lines: list[str]) -> str:
    """The author among the header lines after the title: the last one not naming a translator."""
    candidates = [line for line in lines if not _TRANSLATOR.search(line)]
    return (candidates or lines)[-1]


def _strip_markup(text: str) -> str:
    count = 1
    while count:
        text, count = _INNERMOST_NOTE.subn(_replace_note, text)
    text = _RUBY.sub("", text).replace("｜", "")
    for written, mark in _REPETITION_MARKS:
        text = text.replace(written, mark)
    return text


def _replace_note(note: re.Match[str]) -> str:
    if not note.group(1):
        return ""
    return _gaiji(note.group(2))


def _gaiji(description: str) -> str:
    """The character a gaiji note describes, if it names a JIS X 0213 or Unicode code."""
    code = _JIS_LEVEL_CODE.search(description) or _JIS_CODE.search(description)
    character = ""
    if code:
        plane, row, cell = (int(part) for part in code.groups())
        if 1 <= row <= 94 and 1 <= cell <= 94:
            # EUC-JIS-2004 encodes plane 1 as two bytes 0xA0+row, 0xA0+cell; plane 2 after 0x8F.
            encoded = bytes([0xA0 + row, 0xA0 + cell])
            if plane == 2:
                encoded = b"\x8f" + encoded
            character = encoded.decode("euc_jis_2004", errors="replace")
    elif unicode := _UNICODE_CODE.search(description):
        point = int(unicode.group(1), 16)
        if point <= 0x10FFFF and not 0xD800 <= point <= 0xDFFF:
            character = chr(point)
    if "\ufffd" in character or _MARKUP_CHARACTERS.intersection(character):
        return ""
    return character


class AozoraReader(BaseDiskReader):
    """One document per Aozora work in a folder of .txt, .zip and .tar(.gz/.bz2/.xz) files.

    Unreadable works and files become documents with empty text and ``metadata["read_error"]``,
    so the run counts them instead of losing them.
    """

    name = "aozora"

    def __init__(
        self,
        data_folder: str,
        source: str = "aozora",
        glob_pattern: str | None = None,
        limit: int = -1,
        recursive: bool = True,
    ):
        super().__init__(data_folder, limit=limit, glob_pattern=glob_pattern, recursive=recursive)
        self.source = source

    def read_file(self, filepath: str) -> DocumentsPipeline:
        lowered = filepath.lower()
        location = self.data_folder.resolve_paths(filepath)
        if lowered.endswith(".txt"):
            with self.data_folder.open(filepath, "rb") as handle:
                raw = handle.read()
            yield self._work(raw, _without_suffix(filepath, ".txt"), location)
        elif lowered.endswith(".zip"):
            yield from self._read_archive(filepath, location, _zip_members)
        elif lowered.endswith(_TAR_SUFFIXES):
            yield from self._read_archive(filepath, location, _tar_members)
        else:
            self.stat_update("unsupported_files")
            yield self._unreadable(
                filepath, location, "unsupported_file", "not .txt, .zip or .tar.gz"
            )

    def _read_archive(
        self,
        filepath: str,
        location: str,
        members: Callable[[BinaryIO], Iterator[tuple[str, bytes]]],
    ) -> DocumentsPipeline:
        archive_id = _without_suffix(filepath, ".zip", *_TAR_SUFFIXES)
        try:
            with self.data_folder.open(filepath, "rb") as handle:
                for member, raw in members(handle):
                    if not member.lower().endswith(".txt"):
                        self.stat_update("skipped_members")
                        continue
                    work_id = f"{archive_id}/{PurePosixPath(member).stem}"
                    yield self._work(raw, work_id, f"{location}/{member}")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as error:
            # What was read before the damage is kept; the rest of the archive is counted here.
            self.stat_update("corrupt_archives")
            yield self._unreadable(archive_id, location, "corrupt_archive", str(error))

    def _work(self, raw: bytes, work_id: str, location: str) -> Document:
        try:
            with self.track_time():
                text, metadata = clean_aozora(raw)
        except NotAozoraText as error:
            self.stat_update(f"read_error_{error.reason}")
            return self._unreadable(work_id, location, error.reason, str(error))
        self.stat_update("works")
        return Document(
            text=text,
            id=work_id,
            metadata={"source": self.source, **metadata, "file": location},
        )

    def _unreadable(self, work_id: str, location: str, reason: str, detail: str) -> Document:
        return Document(
            text="",
            id=work_id,
            metadata={
                "source": self.source,
                "file": location,
                "read_error": reason,
                "read_error_detail": detail[:200],
            },
        )


def _without_suffix(path: str, *suffixes: str) -> str:
    for suffix in sorted(suffixes, key=len, reverse=True):
        if path.lower().endswith(suffix):
            return path[: -len(suffix)]
    return path


def _tar_members(handle: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar stream, read in order without seeking."""
    with tarfile.open(fileobj=handle, mode="r|*") as archive:
        for member in archive:
            if member.isfile():
                yield member.name, archive.extractfile(member).read()


def _zip_members(handle: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each file in a zip archive."""
    with zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            if not info.is_dir():
                yield info.filename, archive.read(info)
