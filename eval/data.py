"""Evaluation data: where each task's files are, splits as llm-jp-eval makes them, bad records, subsets, the pinned JGLUE download.

llm-jp-eval v1.x makes three splits: ``test`` is the dataset's test file (JGLUE's valid file);
the train file is shuffled with ``random.seed(42)`` and cut 90/10 into ``train`` (few-shot
examples are its first N) and ``dev``. A record that cannot be read or rendered is one
``path:line: reason`` line, counted and left out. ``random.Random(seed).shuffle`` is the same Mersenne Twister sequence,
so with seed 42 the few-shot examples are exactly the ones llm-jp-eval picks from the same file.
"""

from __future__ import annotations

import hashlib
import random
import re
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import KinoeError
from common.logs import get_logger
from eval.tasks.base import Sample, Task
from eval.tasks.readers import Read, Record

TRAIN_SHARE = 0.9
# An example longer than this (question, context and choices, in characters) is malformed: no
# model's context holds it, so its prompt would lose the instruction and the few-shot examples
# to truncation, and merely tokenizing a 50 MB record takes seconds and gigabytes.
MAX_EXAMPLE_CHARACTERS = 1_000_000
JGLUE_TAG = "v1.3.0"
JGLUE_BASE_URL = f"https://raw.githubusercontent.com/yahoojapan/JGLUE/{JGLUE_TAG}/datasets"
DOWNLOAD_FIRST = "run `kinoe eval download --to <folder>` and set jglue_dir=<folder>"

# file name here -> (path under datasets/ at the tag, SHA-256). Hashes were taken from the files
# in ../shared/data (JGLUE v1.3.0) and agree with an independent pin of JGLUE's commit 6f071c0;
# jnli-train's is from that pin only. jsquad-train has no known hash yet: it is accepted with a
# warning and its hash written to the download record, to be pinned here after review.
JGLUE_FILES: dict[str, tuple[str, str | None]] = {
    "jcommonsenseqa-train.json": (
        "jcommonsenseqa-v1.3/train-v1.3.json",
        "9b55fae5ecb3aedd6f8ce5bc09196c3b629864668ec6c18eee4d65c0aa48229e",
    ),
    "jcommonsenseqa-valid.json": (
        "jcommonsenseqa-v1.3/valid-v1.3.json",
        "0d8d76f3bfa0d174866939882faccdd01fbc2bcd5a76c43748ba0c40a7b3b8d4",
    ),
    "jnli-train.json": (
        "jnli-v1.3/train-v1.3.json",
        "c506354d1310807f7300cfa8ad49482c6359a84fe85eea8d5e667d90d338d1c4",
    ),
    "jnli-valid.json": (
        "jnli-v1.3/valid-v1.3.json",
        "ca0353efc7c2eebfb6de4e13f16295053c8b1ee65e7b0849190c90426fbc495f",
    ),
    "jsquad-train.json": ("jsquad-v1.3/train-v1.3.json", None),
    "jsquad-valid.json": (
        "jsquad-v1.3/valid-v1.3.json",
        "fb0a57a35281ff03bbe7f0e878cff5b577985fbe6fcb242e7e8ddb63d1c0ab11",
    ),
    "jsts-train.json": (
        "jsts-v1.3/train-v1.3.json",
        "db6bd653270ac9786759920413a48973164d322998f34dd4ae32202af5e66969",
    ),
    "jsts-valid.json": (
        "jsts-v1.3/valid-v1.3.json",
        "7c0bdcb381179f01096c635d058853d96da1e1248d23fe3f5c2beed5dc2d9b1a",
    ),
}


@dataclass(frozen=True)
class TaskSource:
    """Where a task's data is: its folder and the file name or glob pattern each split reads."""

    folder: Path
    files: dict[str, str]

    def paths(self, task: Task, split: str) -> list[Path]:
        """The files of ``split``, or a one-line error naming the file and how to get it."""
        pattern = self.files[split]
        if any(char in pattern for char in "*?["):
            paths = sorted(self.folder.glob(pattern))
        else:
            paths = [self.folder / pattern] if (self.folder / pattern).is_file() else []
        if not paths:
            hint = (
                DOWNLOAD_FIRST if task.folder == "jglue" else f"set task_files.{task.name}.{split}"
            )
            if split == "train":
                hint += f", or set task_shots.{task.name}=0"
            raise KinoeError(f"{task.name}: {self.folder / pattern} not found; {hint}")
        return paths


def task_source(
    task: Task,
    data_dir: Path | None,
    jglue_dir: Path | None = None,
    files: dict[str, str] | None = None,
) -> TaskSource:
    """The folder and files of ``task``: ``jglue_dir`` for JGLUE, else ``<data_dir>/<task.folder>``; ``files`` override."""
    if task.folder == "jglue" and jglue_dir is not None:
        folder = Path(jglue_dir)
    elif data_dir is not None:
        folder = Path(data_dir) / task.folder
    else:
        key = "jglue_dir" if task.folder == "jglue" else "data_dir"
        raise KinoeError(
            f"{key} is not set; set {key}=<folder> holding {task.name}'s files "
            "(e.g. ../shared/data/eval" + ("/jglue)" if task.folder == "jglue" else ")")
        )
    unknown = set(files or {}) - set(task.files)
    if unknown:
        raise KinoeError(
            f"task_files.{task.name}: {task.name} has no {sorted(unknown)[0]} split; "
            f"its splits: {', '.join(task.files)}"
        )
    return TaskSource(folder, {**task.files, **(files or {})})


@dataclass(frozen=True)
class TaskData:
    """What one task evaluates on, under one prompt format: the examples, the few-shot examples, what was dropped."""

    examples: list[Sample]
    shots: list[Sample]
    split: str  # e.g. "test (jnli-valid.json)"
    malformed: list[str] = field(default_factory=list)  # "path:line: reason", one per record
    excluded: int = 0


def read_split(task: Task, source: TaskSource, split: str) -> Read:
    """Every record of ``split``'s files; a file serving both splits keeps the rows its ``split`` column gives this one."""
    read = Read()
    for path in source.paths(task, split):
        read.extend(task.read(path))
    shared = "train" in source.files and source.files["train"] == source.files["test"]
    if shared and any("split" in record.fields for record in read.records):
        read.records = [r for r in read.records if r.fields.get("split") == split]
    return read


def render_records(
    task: Task, records: list[Record], render: Callable[[dict], Sample]
) -> tuple[list[Sample], list[str]]:
    """Each record as a ``Sample``; a record that cannot be one is a ``path:line: reason`` line instead."""
    samples, malformed = [], []
    for record in records:
        try:
            sample = render(record.fields)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
            reason = f"no field {error}" if isinstance(error, KeyError) else str(error)
            malformed.append(f"{record.origin}: {reason}")
            continue
        size = len(sample.input) + len(sample.output) + sum(map(len, sample.choices))
        if size > MAX_EXAMPLE_CHARACTERS:
            malformed.append(
                f"{record.origin}: {size:,} characters, more than an example may have "
                f"({MAX_EXAMPLE_CHARACTERS:,}: no model's context holds it)"
            )
        elif not sample.output:
            malformed.append(f"{record.origin}: empty gold answer")
        elif sample.choices and sample.output not in sample.choices:
            malformed.append(
                f"{record.origin}: label {sample.output!r} is not one of {', '.join(sample.choices)}"
            )
        else:
            samples.append(sample)
    return samples, malformed


def _file_order(line: str) -> tuple[str, int]:
    """Sort key of a ``path:line: reason`` line: by file, then line."""
    found = re.match(r"(.*?):(\d+): ", line)
    return (found[1], int(found[2])) if found else (line, 0)


def llm_jp_eval_train_dev(task: Task, data_dir: Path, seed: int) -> tuple[list[dict], list[dict]]:
    """The train file's well-formed records shuffled with ``seed`` and cut into (train, dev), as llm-jp-eval does."""
    source = TaskSource(Path(data_dir), dict(task.files))
    read = read_split(task, source, "train")
    formats = [task.generation, *([task.loglik] if task.loglik else [])]
    records = [
        r for r in read.records if all(render_records(task, [r], f.render)[0] for f in formats)
    ]
    fields = [r.fields for r in records]
    random.Random(seed).shuffle(fields)
    cut = int(len(fields) * (1 - task.dev_share))  # llm-jp-eval's int(), not round()
    return fields[:cut], fields[cut:]


def load_task(
    task: Task,
    scoring: str,
    source: TaskSource | Path,
    split: str,
    shots: int,
    seed: int,
    reads: dict | None = None,
) -> TaskData:
    """The evaluation examples of ``split`` and the first ``shots`` examples of the few-shot pool.

    ``source`` is where the files are; a folder stands for the task's upstream file names in it.
    ``reads`` keeps the files read, so a task's second scoring mode does not parse them again.
    """
    if not isinstance(source, TaskSource):
        source = TaskSource(Path(source), dict(task.files))
    render = task.prompt_format(scoring).render
    malformed: list[str] = []
    excluded = 0

    def samples_of(part: str) -> list[Sample]:
        nonlocal excluded
        key = (task.name, part, tuple(source.paths(task, part)))
        read = reads.get(key) if reads is not None else None
        if read is None:
            read = read_split(task, source, part)
            if reads is not None:
                reads[key] = read
        samples, bad = render_records(task, read.records, render)
        malformed.extend(sorted(read.malformed + bad, key=_file_order))
        excluded += read.excluded
        return samples

    train_file = source.files.get("train")
    if split == "dev" and (train_file is None or task.dev_share == 0):
        raise KinoeError(
            f"{task.name} has no dev split (no train file to cut one from); use split=test"
        )
    pool: list[Sample] = []
    if train_file is None:
        examples = samples_of("test")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        taken = set(order[: task.train_from_test])
        pool = [examples[i] for i in order[: task.train_from_test]]
        examples = [sample for i, sample in enumerate(examples) if i not in taken]
        described = (
            f"test ({source.files['test']} less {len(pool)} few-shot candidates, seed {seed})"
        )
    else:
        if shots > 0 or split == "dev":
            train = samples_of("train")
            random.Random(seed).shuffle(train)
            cut = int(len(train) * (1 - task.dev_share))
            pool, dev = train[:cut], train[cut:]
        if split == "dev":
            examples = dev
            described = f"dev (last {task.dev_share:.0%} of {train_file}, seed {seed})"
        else:
            examples = samples_of("test")
            described = f"test ({source.files['test']})"
    if shots > len(pool):
        raise KinoeError(
            f"{task.name}: {shots} shots asked, the few-shot pool has {len(pool)}; "
            f"set task_shots.{task.name}={len(pool)}"
        )
    return TaskData(examples, pool[:shots], described, malformed, excluded)


def subset(count: int, limit: int | None, fraction: float | None, seed: int) -> list[int]:
    """Indices of the examples to evaluate, in file order: all, the first ``limit``, or a seeded ``fraction``."""
    if limit is not None:
        return list(range(min(limit, count)))
    if fraction is not None:
        keep = max(1, round(count * fraction))
        return sorted(random.Random(seed).sample(range(count), keep))
    return list(range(count))


def download_jglue(
    target: Path, names: list[str] | None = None, base_url: str = JGLUE_BASE_URL
) -> dict[str, dict[str, str | bool]]:
    """Fetch JGLUE files at the pinned tag into ``target``; verify each SHA-256 before it is kept.

    Files already present with the pinned hash are not fetched again. Returns, per file, its
    URL, SHA-256 and whether that hash is pinned.
    """
    logger = get_logger("eval")
    target.mkdir(parents=True, exist_ok=True)
    record: dict[str, dict[str, str | bool]] = {}
    for name in names or list(JGLUE_FILES):
        if name not in JGLUE_FILES:
            raise KinoeError(f"unknown JGLUE file {name}; known: {', '.join(JGLUE_FILES)}")
        upstream, pinned = JGLUE_FILES[name]
        url = f"{base_url}/{upstream}"
        path = target / name
        if path.is_file() and pinned and _sha256(path.read_bytes()) == pinned:
            record[name] = {"url": url, "sha256": pinned, "pinned": True}
            continue
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                data = response.read()
        except OSError as error:
            raise KinoeError(
                f"cannot download {url} ({error}); check the network or proxy"
            ) from None
        digest = _sha256(data)
        if pinned and digest != pinned:
            raise KinoeError(
                f"{url} has SHA-256 {digest}, not the pinned {pinned}; the file was not kept"
            )
        if not pinned:
            logger.warning("%s has no pinned hash; kept with SHA-256 %s (pin it)", name, digest)
        temporary = path.with_name(f".{name}.part")
        temporary.write_bytes(data)
        temporary.replace(path)
        record[name] = {"url": url, "sha256": digest, "pinned": bool(pinned)}
        logger.info("downloaded %s (%s bytes, SHA-256 %s)", name, f"{len(data):,}", digest[:12])
    return record


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
