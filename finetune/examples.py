"""Fine-tuning examples: read JSONL records, check them, and turn them into tokens with a label mask.

Record shapes (one JSON object a line, ``.jsonl`` or ``.jsonl.gz``, or a folder of them):

- SFT chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``,
  rendered with the model directory's chat template (the project template, the one the
  pretraining post-training phase used); every assistant turn's content and its end-of-turn
  token are trained, nothing else.
- SFT text: ``{"prompt": "...", "completion": "..."}``: the two texts joined as they are (no
  template, as llm-jp-eval prompts are evaluated); the completion and EOS are trained.
- DPO: ``{"prompt": ..., "chosen": ..., "rejected": ...}``. A prompt that is a list of messages
  is a conversation and each answer (a string, or a one-message assistant list) becomes its
  final assistant turn; a string prompt is text, each answer a completion.

A record that cannot be used is never trained on: it is counted by reason and written with the
reason to ``rejected.jsonl`` in the run directory. That includes lines that cannot be read: not
UTF-8 (``invalid_utf8``, e.g. a Shift_JIS file), not JSON (``not_json``), and the rest of a
damaged ``.gz`` (``corrupt_file``, once; the records before the damage are used). Every token
sequence starts with BOS, as the pretraining shards do.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import KinoeError
from eval.data import MAX_EXAMPLE_CHARACTERS
from eval.tasks.readers import encoding_hint
from tokenizer.chat import CONVERSATION_SUFFIXES, NOT_JSON, rejection

INVALID_UTF8 = "invalid_utf8"
CORRUPT_FILE = "corrupt_file"
UNKNOWN_SHAPE = "unknown_shape"
EMPTY_TEXT = "empty_text"
CHAT_TOKEN_IN_TEXT = "chat_token_in_text"
TOO_LONG = "too_long"
NO_TRAINED_TOKENS = "no_trained_tokens"
_SENTINEL = "\ue000kinoe-content\ue001"


@dataclass(frozen=True)
class Segment:
    """One token sequence: ids (BOS first) and, per id, whether it is a training target."""

    ids: list[int]
    trained: list[bool]

    @property
    def length(self) -> int:
        """Positions it occupies in a packed sequence: one fewer than its ids (inputs)."""
        return len(self.ids) - 1

    @property
    def targets(self) -> int:
        return sum(self.trained[1:])


@dataclass(frozen=True)
class Unit:
    """What is packed and batched as one: an SFT example (one segment) or a DPO pair (chosen, rejected)."""

    segments: tuple[Segment, ...]
    origin: str  # file:line

    @property
    def length(self) -> int:
        return sum(segment.length for segment in self.segments)


@dataclass
class Account:
    """Records read, kept and rejected (by reason) from the input files."""

    read: int = 0
    kept: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    first_rejected: str | None = None  # "file:line: detail" of the first record rejected

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "kept": self.kept,
            "rejected": dict(self.rejected),
            "first_rejected": self.first_rejected,
        }


class Rejected(Exception):
    """A record that cannot be trained on, with the reason and a detail for the user."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def input_files(paths: list[Path], key: str) -> list[Path]:
    """The JSONL(.gz) files named by ``paths`` (files, or folders searched recursively), sorted."""
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                sorted(p for p in path.rglob("*") if p.name.endswith(CONVERSATION_SUFFIXES))
            )
        else:
            raise KinoeError(f"{key}: {path} does not exist; point it at JSONL files or a folder")
    if not files:
        raise KinoeError(f"{key}: no .jsonl or .jsonl.gz files in {', '.join(map(str, paths))}")
    return files


def read_records(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """(``file:line``, parsed record or the ``Rejected`` of a line that cannot be read) per non-empty line."""
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        number = 0
        try:
            with opener(path, "rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    if number == 1:
                        raw = raw.removeprefix(codecs.BOM_UTF8)
                    if raw.strip():
                        yield f"{path}:{number}", _parsed(raw)
        except (OSError, EOFError, zlib.error) as error:
            # A truncated or corrupt .gz: the records before the damage are kept, the rest is
            # one rejection, since the lines after the damage cannot be counted.
            yield (
                f"{path}:{number + 1}",
                Rejected(CORRUPT_FILE, f"the file cannot be read from this line on ({error})"),
            )


def _parsed(raw: bytes) -> Any:
    """The JSON value of one line, or the ``Rejected`` saying why it has none."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Rejected(INVALID_UTF8, f"not UTF-8 (byte {error.start}){encoding_hint(raw)}")
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return Rejected(NOT_JSON, f"not JSON ({error.msg})")
    except RecursionError:
        return Rejected(NOT_JSON, "not JSON (nested too deeply)")


def _characters(record: Any) -> int:
    """Characters in every string of ``record`` (keys included), however deeply nested."""
    total, stack = 0, [record]
    while stack:  # a loop, not recursion: a record may nest as deep as JSON allows
        value = stack.pop()
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return total


def _not_oversized(record: Any) -> None:
    """Reject a record too large for any context before it is rendered and tokenized (a 50 MB
    record would take the tokenizer seconds to measure)."""
    size = _characters(record)
    if size > MAX_EXAMPLE_CHARACTERS:
        raise Rejected(
            TOO_LONG,
            f"{size:,} characters, more than an example may have "
            f"({MAX_EXAMPLE_CHARACTERS:,}: no model's context holds it)",
        )


class Encoder:
    """Turns records into segments with the model directory's tokenizer and chat template."""

    def __init__(self, tokenizer_dir: Path, max_length: int):
        from transformers import AutoTokenizer

        from convert.hf_write import turn_end_token

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if not getattr(self.tokenizer, "is_fast", False):
            raise KinoeError(
                f"{tokenizer_dir}: the tokenizer is not a fast (tokenizers) tokenizer; export it "
                "with `kinoe tokenizer export`, which writes tokenizer.json"
            )
        self.max_length = max_length
        self.bos = self.tokenizer.bos_token_id
        self.eos = self.tokenizer.eos_token_id
        if self.eos is None:
            raise KinoeError(f"{tokenizer_dir}: the tokenizer has no EOS token")
        self.turn_end = turn_end_token(self.tokenizer)
        self.special_texts = tuple(
            token for token in self.tokenizer.all_special_tokens if token and len(token) > 1
        ) + tuple(getattr(self.tokenizer, "additional_special_tokens", ()) or ())
        self.has_template = bool(self.tokenizer.chat_template)
        self.tokenizer_dir = tokenizer_dir

    # -- records -> segments --------------------------------------------------------------

    def sft(self, record: Any, origin: str = "") -> Unit:
        """One SFT record (from ``origin``, file:line) as a one-segment unit, or ``Rejected``."""
        if isinstance(record, Rejected):
            raise record
        _not_oversized(record)
        if isinstance(record, dict) and "messages" in record:
            return Unit((self._conversation(record["messages"], last_turn_only=False),), origin)
        if isinstance(record, dict) and "prompt" in record and "completion" in record:
            return Unit((self._text(record["prompt"], record["completion"]),), origin)
        raise Rejected(
            UNKNOWN_SHAPE, "expected {'messages': [...]} or {'prompt': ..., 'completion': ...}"
        )

    def preference(self, record: Any, origin: str = "") -> Unit:
        """One DPO record (from ``origin``) as a (chosen, rejected) unit, or ``Rejected``."""
        if isinstance(record, Rejected):
            raise record
        _not_oversized(record)
        if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= record.keys():
            raise Rejected(
                UNKNOWN_SHAPE, "expected {'prompt': ..., 'chosen': ..., 'rejected': ...}"
            )
        prompt = record["prompt"]
        segments = []
        for key in ("chosen", "rejected"):
            answer = _answer_text(record[key], key)
            if isinstance(prompt, list):
                messages = [*prompt, {"role": "assistant", "content": answer}]
                segments.append(self._conversation(messages, last_turn_only=True))
            else:
                segments.append(self._text(prompt, answer))
        unit = Unit(tuple(segments), origin)
        if unit.length > self.max_length:
            raise Rejected(
                TOO_LONG,
                f"chosen and rejected together are {unit.length} tokens; data.max_length is "
                f"{self.max_length} (a pair is packed into one sequence)",
            )
        return unit

    # -- encoding --------------------------------------------------------------------------

    def _text(self, prompt: Any, completion: Any) -> Segment:
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise Rejected(UNKNOWN_SHAPE, f"{name} is a {type(value).__name__}, not text")
            if not value.strip():
                raise Rejected(EMPTY_TEXT, f"{name} is empty")
        self._no_special_tokens(prompt + completion)
        text = prompt + completion
        return self._segment(text, [(len(prompt), len(text))], train_eos=True)

    def _conversation(self, messages: Any, last_turn_only: bool) -> Segment:
        if not self.has_template:
            raise KinoeError(
                f"{self.tokenizer_dir}: the tokenizer has no chat template, so chat records cannot "
                "be rendered; convert the model with the tokenizer from `kinoe tokenizer export`"
            )
        problem = rejection({"messages": messages})
        if problem is not None:
            raise Rejected(*problem)
        text = self._render(messages)
        regions = []
        rendered_before = ""
        for index, message in enumerate(messages):
            rendered = self._render(messages[: index + 1])
            if not rendered.startswith(rendered_before):
                raise KinoeError(
                    f"{self.tokenizer_dir}: the chat template renders a conversation differently "
                    "once a turn is added, so assistant turns cannot be located; use the project "
                    "chat template (docs/finetune.md)"
                )
            if message["role"] == "assistant" and (
                not last_turn_only or index == len(messages) - 1
            ):
                regions.append(
                    self._content_region(messages[:index], len(rendered_before), message)
                )
            rendered_before = rendered
        return self._segment(text, regions, train_eos=False)

    def _content_region(self, before: list[dict], offset: int, message: dict) -> tuple[int, int]:
        """Characters of ``message``'s content and the end-of-turn token after it, in the full text."""
        probe = self._render([*before, {"role": "assistant", "content": _SENTINEL}])
        turn = probe[offset:]
        start = offset + turn.index(_SENTINEL)
        end = start + len(message["content"])
        after = turn[turn.index(_SENTINEL) + len(_SENTINEL) :]
        if self.turn_end and after.startswith(self.turn_end):
            end += len(self.turn_end)
        return start, end

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False
        )

    def _no_special_tokens(self, text: str) -> None:
        for token in self.special_texts:
            if token in text:
                raise Rejected(CHAT_TOKEN_IN_TEXT, f"the text contains the special token {token}")

    def _segment(self, text: str, regions: list[tuple[int, int]], train_eos: bool) -> Segment:
        """BOS + the text's tokens (+ EOS); a token is trained when its characters lie in a region."""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = [] if self.bos is None else [self.bos]
        trained: list[bool] = [False] * len(ids)
        for token, (start, end) in zip(
            encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            ids.append(token)
            # A token straddling a region's edge is not trained: it holds prompt characters.
            trained.append(end > start and any(a <= start and end <= b for a, b in regions))
        ids.append(self.eos)
        trained.append(train_eos)
        segment = Segment(ids, trained)
        if segment.length > self.max_length:
            raise Rejected(
                TOO_LONG, f"{segment.length} tokens; data.max_length is {self.max_length}"
            )
        if segment.targets == 0:
            raise Rejected(NO_TRAINED_TOKENS, "no token to train on after tokenization")
        return segment


def _answer_text(answer: Any, key: str) -> str:
    """A DPO answer as text: a string, or a list holding one assistant message."""
    if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict):
        if answer[0].get("role") != "assistant":
            raise Rejected(UNKNOWN_SHAPE, f"{key} must be an assistant message")
        answer = answer[0].get("content")
    if not isinstance(answer, str):
        raise Rejected(UNKNOWN_SHAPE, f"{key} is a {type(answer).__name__}, not text")
    if not answer.strip():
        raise Rejected(EMPTY_TEXT, f"{key} is empty")
    return answer


# rejected.jsonl keeps a rejected record whole up to this many characters of JSON, else its
# start: a 50 MB record is not worth copying, and its origin says where the whole one is.
KEPT_RECORD_CHARACTERS = 64 * 1024


def _kept_record(record: Any) -> dict[str, Any]:
    """What rejected.jsonl holds of ``record``: itself, or the start of its JSON and its size."""
    text = json.dumps(record, ensure_ascii=False)
    if len(text) <= KEPT_RECORD_CHARACTERS:
        return {"record": record}
    return {"record_start": text[:KEPT_RECORD_CHARACTERS], "record_characters": len(text)}


def load_units(
    encoder: Encoder,
    paths: list[Path],
    key: str,
    kind: str,
    rejected_path: Path | None,
) -> tuple[list[Unit], Account]:
    """Every usable record of ``paths`` as a unit (``kind`` sft or dpo); the rest counted and written aside."""
    encode = encoder.sft if kind == "sft" else encoder.preference
    account = Account()
    units: list[Unit] = []
    out = None
    try:
        for origin, record in read_records(input_files(paths, key)):
            account.read += 1
            try:
                unit = encode(record, origin)
            except Rejected as problem:
                account.rejected[problem.reason] += 1
                if account.first_rejected is None:
                    account.first_rejected = f"{origin}: {problem}"
                if rejected_path is not None:
                    if out is None:
                        rejected_path.parent.mkdir(parents=True, exist_ok=True)
                        out = rejected_path.open("a", encoding="utf-8")
                    entry = {"origin": origin, "reason": problem.reason, "detail": str(problem)}
                    if not isinstance(record, Rejected):
                        entry |= _kept_record(record)
                    out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                continue
            units.append(unit)
            account.kept += 1
    finally:
        if out is not None:
            out.close()
    if not account.read:
        raise KinoeError(
            f"{key}: no record in {', '.join(map(str, paths))} (the files are empty); see "
            "docs/finetune.md for the format"
        )
    if not units:
        reasons = ", ".join(f"{r} {n}" for r, n in account.rejected.most_common()) or "no lines"
        raise KinoeError(
            f"{key}: none of the {account.read} records is usable for {kind} ({reasons}), the "
            f"first {account.first_rejected}; see {rejected_path or 'the rejected records'} and "
            "docs/finetune.md for the format"
        )
    return units, account
