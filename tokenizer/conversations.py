"""Conversations for the post-training phase: checked, rendered with the chat template, read as documents.

A conversation source is a JSONL(.gz) file, or a folder of them, with one conversation a line:
``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], "id": ...}``
(``id`` optional). ``ConversationReader`` is a datatrove reader: each task reads its share of
the files, after passing on the documents of the steps before it, and yields every valid
conversation rendered with ``tokenizer.chat.CHAT_TEMPLATE`` as a document whose source is the
configured name. An invalid line is never encoded: it is counted by reason and written with
the reason to ``<accounts_dir>/<source>/<rank:05d>.rejected.jsonl``; when the task has read its
files, ``<accounts_dir>/<source>/<rank:05d>.json`` says how many lines it read, encoded and
rejected (by reason). ``conversation_summary`` adds those up once every task is done.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections import Counter
from pathlib import Path
from typing import IO, Any

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder

from common.errors import KinoeError
from tokenizer.accounts import AccountedReader, read_accounts
from tokenizer.chat import (
    CHAT_TEMPLATE,
    CONVERSATION_SUFFIXES,
    CORRUPT_FILE,
    NOT_JSON,
    rejection,
)


@functools.cache
def _template():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The environment transformers' apply_chat_template compiles templates in, so a template
    # with block tags trims whitespace the same way here.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    return environment.from_string(CHAT_TEMPLATE)


def render_conversation(messages: list[dict[str, str]]) -> str:
    """The conversation as text, as transformers' ``apply_chat_template(tokenize=False)`` gives it."""
    return _template().render(messages=messages, add_generation_prompt=False)


def conversation_files(path: str | Path) -> tuple[str, list[str]]:
    """The folder ``path`` names (itself, or a file's parent) and its conversation files, sorted."""
    location = Path(path)
    if location.is_file():
        return str(location.parent), [location.name]
    names = get_datafolder(str(location)).list_files(recursive=True)
    return str(location), [name for name in names if name.endswith(CONVERSATION_SUFFIXES)]


class ConversationReader(AccountedReader):
    """Read one conversation source's JSONL(.gz) files, yield its valid conversations as documents.

    A document's text is the rendered conversation, its ``metadata["source"]`` the source name.
    """

    name = "💬 Conversations"

    def __init__(self, path: str | Path, source: str, accounts_dir: str | Path):
        folder, files = conversation_files(path)
        super().__init__(folder, files, Path(accounts_dir) / source, add_file_path=False)
        self.source = source

    def start_task(self, rank: int) -> None:
        folder = Path(self.accounts_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self._rejected_path = folder / f"{rank:05d}.rejected.jsonl"
        self._rejected: IO[str] | None = None
        self._counts: Counter[str] = Counter()

    def abandon_task(self) -> None:
        if self._rejected is not None:
            self._rejected.close()
            Path(f"{self._rejected_path}.tmp").unlink(missing_ok=True)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        number = 0
        try:
            with self.data_folder.open(filepath, "rb", compression="infer") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    with self.track_time():
                        document = self._conversation(line, filepath, number)
                    if document is not None:
                        yield document
        except (OSError, EOFError, zlib.error) as error:
            # A truncated or corrupt .gz: the conversations before the damage are kept, the
            # rest of the file is one rejected line, and the other files are still read.
            self._counts["read"] += 1
            self._reject(CORRUPT_FILE, str(error), filepath, number + 1, {})

    def _conversation(self, line: bytes, filepath: str, number: int) -> Document | None:
        self._counts["read"] += 1
        self.stat_update("conversations_read")
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            raw = line.decode("utf-8", errors="replace").rstrip("\n")
            self._reject(NOT_JSON, str(error), filepath, number, {"raw": raw})
            return None
        problem = rejection(record)
        if problem is not None:
            self._reject(*problem, filepath, number, {"record": record})
            return None
        given_id = record.get("id")
        return Document(
            text=render_conversation(record["messages"]),
            id=str(given_id) if given_id is not None else f"{self.source}/{filepath}:{number}",
            metadata={"source": self.source},
        )

    def _reject(self, reason: str, detail: str, filepath: str, number: int, what: dict) -> None:
        self._counts[f"rejected.{reason}"] += 1
        self.stat_update(f"rejected_{reason}")
        if self._rejected is None:
            self._rejected = open(f"{self._rejected_path}.tmp", "w", encoding="utf-8")  # noqa: SIM115
        entry = {"reason": reason, "detail": detail, "file": filepath, "line": number, **what}
        self._rejected.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def finish_task(self, files: int, documents: int) -> dict[str, Any]:
        """Put this task's rejected lines in place (a rerun overwrites them); its account."""
        if self._rejected is not None:
            self._rejected.close()
            Path(f"{self._rejected_path}.tmp").replace(self._rejected_path)
        else:
            self._rejected_path.unlink(missing_ok=True)
        rejected = {
            key.removeprefix("rejected."): count
            for key, count in sorted(self._counts.items())
            if key.startswith("rejected.")
        }
        return {"read": self._counts["read"], "encoded": documents, "rejected": rejected}


def conversation_summary(
    accounts_dir: Path, chat: dict[str, Path], shard_sets: dict[str, dict]
) -> dict[str, dict]:
    """Lines read, encoded and rejected (by reason) per conversation source, from the tasks' accounts.

    KinoeError when a source yielded no conversation, or when its shard set holds more
    documents than it encoded (a data_prep source of the same name went into it too).
    """
    summary: dict[str, dict] = {}
    for source, path in chat.items():
        folder = Path(accounts_dir) / source
        total = {"read": 0, "encoded": 0, "rejected": Counter()}
        for account in read_accounts(folder):
            total["read"] += account["read"]
            total["encoded"] += account["encoded"]
            total["rejected"].update(account["rejected"])
        rejected = dict(total["rejected"].most_common())
        if total["encoded"] == 0:
            reasons = ", ".join(f"{reason} {count}" for reason, count in rejected.items())
            raise KinoeError(
                f"encode.chat.{source}: none of the {total['read']} lines of {path} is a valid "
                f"conversation ({reasons or 'no lines'}); see {folder}/*.rejected.jsonl and "
                "docs/tokenizer.md for the format"
            )
        in_shards = shard_sets.get(source, {}).get("documents", 0)
        if in_shards > total["encoded"]:
            raise KinoeError(
                f"encode.chat.{source}: its shard set holds {in_shards} documents but only "
                f"{total['encoded']} conversations were encoded; documents of a data_prep source "
                f"named {source!r} went into it too, so rename encode.chat.{source}"
            )
        if in_shards < total["encoded"]:
            raise RuntimeError(
                f"{source}: {total['encoded']} conversations encoded, {in_shards} in its shards"
            )
        summary[source] = {
            "read": total["read"],
            "encoded": total["encoded"],
            "rejected": rejected,
        }
    return summary
