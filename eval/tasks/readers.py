"""Reading the evaluation datasets' file formats into records that remember where they came from.

Every record carries its origin (``path:line``) so that a malformed one is reported in one
line naming the file, the line and the reason, counted, and skipped; the task runs on the rest.
A reader never raises on bad content: what it cannot parse becomes a ``malformed`` line.
Formats: JSON lines (JGLUE), SQuAD JSON (JSQuAD), a JSON array of objects (JEMHopQA,
MAWPS-ja), CSV without a header (JMMLU), TSV with a header (JSICK, JaNLI, Jamp), and XML with
one element per record (NIILC, JSeM).
"""

from __future__ import annotations

import bisect
import codecs
import csv
import json
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Record:
    """One raw record of a dataset file and where it starts (``path:line``)."""

    origin: str
    fields: dict[str, Any]


@dataclass
class Read:
    """What a file gave: its records, and one ``path:line: reason`` per record that could not be read."""

    records: list[Record] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    excluded: int = 0  # well-formed records that are not part of the task (e.g. JSeM acceptability)

    def extend(self, other: Read) -> None:
        self.records += other.records
        self.malformed += other.malformed
        self.excluded += other.excluded


Reader = Callable[[Path], Read]


def _text(path: Path, read: Read) -> str | None:
    """The whole file as text, for formats that cannot be read line by line."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        hint = encoding_hint(path.read_bytes())
        read.malformed.append(f"{path}: not UTF-8 (byte {error.start}){hint}; the file was skipped")
        return None


def _lines(path: Path, read: Read) -> list[tuple[int, str]]:
    """The file's lines numbered from 1, each decoded on its own: a line that is not UTF-8 is one
    malformed record, and the lines around it are still read."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    lines = []
    # bytes.splitlines breaks only at \n and \r: a U+2028 inside a JSON string stays in its line.
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as error:
            hint = encoding_hint(raw)
            read.malformed.append(f"{path}:{number}: not UTF-8 (byte {error.start}){hint}")
    return lines


def encoding_hint(data: bytes) -> str:
    """What undecodable bytes probably are: Japanese files that are not UTF-8 are Shift_JIS."""
    try:
        data.decode("cp932")
    except UnicodeDecodeError:
        return ""
    return " but reads as Shift_JIS: convert the file (iconv -f cp932 -t utf-8)"


def read_json_lines(path: Path) -> Read:
    """One JSON object per line (JGLUE's format for all but JSQuAD)."""
    read = Read()
    for number, line in _lines(path, read):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            read.malformed.append(f"{path}:{number}: not JSON ({error.msg})")
            continue
        except RecursionError:
            read.malformed.append(f"{path}:{number}: not JSON (nested too deeply)")
            continue
        if not isinstance(value, dict):
            read.malformed.append(f"{path}:{number}: not a JSON object")
            continue
        read.records.append(Record(f"{path}:{number}", value))
    return read


def read_json_array(path: Path) -> Read:
    """A JSON array of objects; each record's origin is the line its object starts on."""
    read = Read()
    text = _text(path, read)
    if text is None:
        return read
    decoder = json.JSONDecoder()
    line_of = _line_numbers(text)
    start = text.find("[")
    if start < 0:
        read.malformed.append(f"{path}:1: not a JSON array")
        return read
    position = start + 1
    while True:
        position = _skip(text, position, " \t\r\n,")
        if position >= len(text) or text[position] == "]":
            break
        line = line_of(position)
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            # Nothing after a syntax error can be located reliably: the rest of the file is lost.
            read.malformed.append(
                f"{path}:{error.lineno}: not JSON ({error.msg}); rest of file skipped"
            )
            break
        if isinstance(value, dict):
            read.records.append(Record(f"{path}:{line}", value))
        else:
            read.malformed.append(f"{path}:{line}: not a JSON object")
    return read


def _line_numbers(text: str) -> Callable[[int], int]:
    """Character offset -> 1-based line number, in O(log lines) per call."""
    starts = [match.end() for match in re.finditer("\n", text)]
    return lambda offset: bisect.bisect_right(starts, offset) + 1


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


def read_squad(path: Path) -> Read:
    """SQuAD JSON flattened to one record per question, with its paragraph's context."""
    read = Read()
    text = _text(path, read)
    if text is None:
        return read
    try:
        data = json.loads(text)
        paragraphs = [p for article in data["data"] for p in article["paragraphs"]]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        read.malformed.append(f"{path}: not SQuAD JSON ({error}); the file was skipped")
        return read
    # A question's line is where its id first appears after the previous question's.
    line_of, cursor = _line_numbers(text), 0
    for paragraph in paragraphs:
        for question in paragraph.get("qas", []):
            at = text.find(f'"{question.get("id")}"', cursor)
            cursor = max(cursor, at)
            origin = f"{path}:{line_of(at) if at >= 0 else '?'}"
            read.records.append(
                Record(
                    origin,
                    {"id": question.get("id"), "context": paragraph.get("context"), **question},
                )
            )
    return read


def csv_reader(columns: Sequence[str]) -> Reader:
    """CSV without a header whose columns are ``columns``; quoted fields may span lines."""

    def read_csv(path: Path) -> Read:
        read = Read()
        text = _text(path, read)
        rows = csv.reader((text or "").splitlines(keepends=True))
        start = 1
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error as error:
                read.malformed.append(f"{path}:{start}: not CSV ({error})")
                start = rows.line_num + 1
                continue
            origin, start = f"{path}:{start}", rows.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                read.malformed.append(f"{origin}: {len(row)} columns, expected {len(columns)}")
                continue
            read.records.append(Record(origin, dict(zip(columns, row, strict=True))))
        return read

    return read_csv


def read_tsv(path: Path) -> Read:
    """Tab-separated values with a header row; fields are taken as written (no quoting)."""
    read = Read()
    lines = _lines(path, read)
    if not lines or lines[0][0] != 1:  # no header, or a header that is not UTF-8
        if lines:
            read.malformed.append(f"{path}: no readable header row; the file was skipped")
        return read
    header = lines[0][1].split("\t")
    for number, line in lines[1:]:
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            read.malformed.append(
                f"{path}:{number}: {len(cells)} columns, the header has {len(header)}"
            )
            continue
        read.records.append(Record(f"{path}:{number}", dict(zip(header, cells, strict=True))))
    return read


def xml_reader(tag: str, convert: Callable[[ElementTree.Element], dict[str, Any] | None]) -> Reader:
    """XML whose ``tag`` elements are records, each turned into fields by ``convert`` (None: not part of the task)."""
    opening = re.compile(rf"<{tag}[\s>/]")

    def read_xml(path: Path) -> Read:
        read = Read()
        text = _text(path, read)
        if text is None:
            return read
        try:
            root = ElementTree.fromstring(text.encode("utf-8"))
        except ElementTree.ParseError as error:
            line = error.position[0] if error.position else 1
            read.malformed.append(f"{path}:{line}: not XML ({error}); the file was skipped")
            return read
        # ElementTree keeps no line numbers: the n-th element starts at the n-th opening tag.
        line_of = _line_numbers(text)
        lines = [line_of(match.start()) for match in opening.finditer(text)]
        for index, element in enumerate(root.iter(tag)):
            origin = f"{path}:{lines[index] if index < len(lines) else '?'}"
            try:
                fields = convert(element)
            except (KeyError, ValueError, AttributeError) as error:
                read.malformed.append(f"{origin}: {error}")
                continue
            if fields is None:
                read.excluded += 1
            else:
                read.records.append(Record(origin, fields))
        return read

    return read_xml


def element_text(element: ElementTree.Element | None) -> str:
    """All the text inside ``element`` with surrounding whitespace removed; '' for None."""
    return "".join(element.itertext()).strip() if element is not None else ""
