"""What encode's readers share: files dealt out to datatrove tasks, and each task's account.

An account, ``<accounts_dir>/<rank:05d>.json``, says what one task read and what it left out;
how a line becomes a document and what its account holds is each reader's own
(``tokenizer.encode.DocumentReader``, ``tokenizer.conversations.ConversationReader``).
"""

from __future__ import annotations

import json
import re
from abc import abstractmethod
from pathlib import Path
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.readers.base import BaseDiskReader

# <rank:05d>.json: one task's account.
TASK_ACCOUNT = re.compile(r"^\d+\.json$")


class AccountedReader(BaseDiskReader):
    """A datatrove reader over ``files`` (relative to ``folder``) whose every task leaves an account.

    File ``i`` goes to task ``i % world_size``, as datatrove deals files, and the documents of the
    steps before pass through first, so readers chain. The account is put in place once the task
    has read all its files (a rerun overwrites it). A subclass reads one file (``read_file``), sets
    up a task's counts (``start_task``), says what its account holds (``finish_task``) and may
    clean up after a failed task (``abandon_task``).
    """

    def __init__(
        self, folder: str, files: list[str], accounts_dir: str | Path, **options: Any
    ) -> None:
        super().__init__(folder, **options)
        # Listed here, on the machine that builds the pipeline, so every task shards one list.
        self.files = files
        self.accounts_dir = str(accounts_dir)

    def run(
        self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1
    ) -> DocumentsPipeline:
        if data:
            yield from data
        shard = self.files[rank::world_size]
        if not shard:
            return
        self.start_task(rank)
        documents = 0
        try:
            for document in self.read_files_shard(shard):
                documents += 1
                self.update_doc_stats(document)
                yield document
        except BaseException:
            self.abandon_task()
            raise
        account = self.finish_task(len(shard), documents)
        account_path = Path(self.accounts_dir) / f"{rank:05d}.json"
        account_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = account_path.with_name(f".{account_path.name}.tmp")
        temporary.write_text(json.dumps(account, ensure_ascii=False) + "\n")
        temporary.replace(account_path)

    @abstractmethod
    def start_task(self, rank: int) -> None:
        """Set up this task's counts, before it reads its first file."""

    @abstractmethod
    def finish_task(self, files: int, documents: int) -> dict[str, Any]:
        """This task's account, once it has read its ``files`` and yielded ``documents``."""

    def abandon_task(self) -> None:
        """Clean up after this task failed or was stopped before the end of its files."""


def read_accounts(accounts_dir: str | Path) -> list[dict[str, Any]]:
    """The accounts the tasks left in ``accounts_dir``, in task order (none if it is absent)."""
    folder = Path(accounts_dir)
    found = folder.iterdir() if folder.is_dir() else ()
    paths = sorted(path for path in found if TASK_ACCOUNT.match(path.name))
    return [json.loads(path.read_text(encoding="utf-8")) for path in paths]
