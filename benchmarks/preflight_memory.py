"""Memory of `kinoe preflight`: its estimate against the peak it measures, config by config.

Writes two synthetic token shard sets (tokenizer.indexed; a long-document "web" source and a
short-document "chat" one, random ids) and a pretrain config per case, then runs
``python -m launch.cli preflight -c <config> [options]`` for each case as users do (under
``torchrun --standalone --nproc_per_node N`` when the case needs N ranks) and reads the
case's report.json. Prints one table row per case: the memory estimate without the runtime
already resident (the CUDA context), the peak allocated by tensors
(``torch.cuda.max_memory_allocated``; on CPU the peak RSS), the peak the verdict uses (the
allocator's peak reservation plus memory outside it) and the verdict. The NO-GO reasons follow
the table. docs/preflight.md ("The estimate against measurement") shows the GPU figures.

    python benchmarks/preflight_memory.py                          # the default cases, one GPU
    python benchmarks/preflight_memory.py --cases mixtral          # a group, or case names
    python benchmarks/preflight_memory.py --cases two-rank         # two GPUs (torchrun)
    python benchmarks/preflight_memory.py --cases cpu              # tiny preset: checks the script
    python benchmarks/preflight_memory.py --list                   # cases and groups
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GiB = 2**30
EOS = 2
# source -> (tokens per document, documents)
SOURCES = {"web": (6000, 60), "chat": (200, 200)}


@dataclass(frozen=True)
class Case:
    """One pretrain config and the preflight options it is checked with."""

    preset: str
    micro_batch: int
    family: str = "mistral"
    seq_len: int = 4096
    global_batch: int = 256
    zero_stage: int = 2
    compile: bool = False
    attention: str = "sdpa"
    document_masking: bool = True
    checkpointing: bool = False
    ranks: int = 1
    options: tuple[str, ...] = ()
    vocab: int = 32000  # the shards' vocabulary: at most the model's

    def describe(self) -> str:
        attention = {"sdpa": "SDPA"}.get(self.attention, self.attention)
        parts = [
            self.preset,
            f"{self.micro_batch} x {self.seq_len:,}",
            f"ZeRO-{self.zero_stage}",
            f"compile + {attention}" if self.compile else f"eager {attention}",
        ]
        if self.document_masking:
            parts.append("document masks")
        if self.checkpointing:
            parts.append("checkpointing")
        if self.options:
            parts.append(f"`{' '.join(self.options)}`")
        return ", ".join(parts)


_7B = dict(preset="mistral_7b", micro_batch=1, compile=True, attention="flex", checkpointing=True)
_MIXTRAL = dict(family="mixtral", preset="mixtral_1b_active", micro_batch=4)
_TINY = dict(preset="tiny", micro_batch=2, seq_len=128, global_batch=8, vocab=2048)

CASES = {
    "1b_eager_sdpa": Case("mistral_1b", 4, document_masking=False),
    "1b_compile_flex": Case("mistral_1b", 4, compile=True, attention="flex",
                            options=("--nodes", "4", "--gpus-per-node", "8")),
    "1b_eager_capped": Case("mistral_1b", 4, document_masking=False, options=("--memory-gb", "55")),
    "1b_micro16": Case("mistral_1b", 16, document_masking=False),
    "7b": Case(**_7B),
    "mix_eager": Case(**_MIXTRAL, document_masking=False),
    "mix_compile_flex": Case(**_MIXTRAL, compile=True, attention="flex"),
    "1b_zero3": Case("mistral_1b", 2, zero_stage=3, document_masking=False, ranks=2),
    "7b_zero3": Case(**_7B, zero_stage=3, ranks=2,
                     options=("--nodes", "8", "--gpus-per-node", "8")),
    "tiny": Case(**_TINY),
    "tiny_capped": Case(**_TINY, options=("--memory-gb", "0.3")),
}  # fmt: skip
GROUPS = {
    "default": ["1b_eager_sdpa", "1b_compile_flex", "1b_eager_capped", "1b_micro16", "7b"],
    "mixtral": ["mix_eager", "mix_compile_flex"],
    "two-rank": ["1b_zero3", "7b_zero3"],
    "cpu": ["tiny", "tiny_capped"],
}


def write_shards(root: Path, vocab: int) -> tuple[Path, dict[str, str]]:
    """A stand-in tokenizer file (preflight only hashes it) and the synthetic shard sets."""
    from tokenizer.indexed import IndexedDatasetWriter, tokenizer_sha256, write_shard_set_metadata

    tokenizer = root / "tokenizer.model"
    tokenizer.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.write_bytes(b"stand-in tokenizer: preflight hashes it, never loads it")
    sources = {}
    for name, (length, documents) in SOURCES.items():
        directory = root / f"vocab{vocab}" / name
        rng = np.random.default_rng(1)
        with IndexedDatasetWriter(directory / f"{name}_00", vocab) as writer:
            for _ in range(documents):
                writer.add_document(np.append(rng.integers(3, vocab, size=length - 1), EOS))
        shard = {"prefix": f"{name}_00", "documents": writer.documents, "tokens": writer.tokens}
        write_shard_set_metadata(
            directory,
            source=name,
            tokenizer_sha256=tokenizer_sha256(tokenizer),
            vocab_size=vocab,
            eos_id=EOS,
            shards=[shard],
        )
        sources[name] = str(directory)
    return tokenizer, sources


def write_config(name: str, case: Case, out: Path) -> Path:
    tokenizer, sources = write_shards(out / "shards", case.vocab)
    overrides = {} if case.attention == "sdpa" else {"attention": case.attention}
    config = {
        "run": {"root": str(out / "runs"), "name": name},
        "model": {"family": case.family, "preset": case.preset, "overrides": overrides},
        "data": {
            "tokenizer": str(tokenizer),
            "sources": sources,
            "seq_len": case.seq_len,
            "document_masking": case.document_masking,
            "phases": [
                {"name": "pretrain", "start": 0.0, "mixture": {"web": 1.0}},
                {"name": "post_training_mix", "start": 0.8, "mixture": {"web": 1.0, "chat": 1.0}},
            ],
        },
        "train": {
            "steps": 20000,
            "global_batch_size": case.global_batch,
            "micro_batch_size": case.micro_batch,
        },
        "engine": {
            "zero_stage": case.zero_stage,
            "compile": case.compile,
            "activation_checkpointing": case.checkpointing,
        },
        "checkpoint": {"interval": 1000, "keep_last": 2},
    }
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def run_case(name: str, case: Case, ranks: int, out: Path, timeout: float) -> dict | None:
    """Run preflight for one case; its report.json, or None when it wrote none."""
    config = write_config(name, case, out)
    report_path = out / "runs" / "preflight" / name / "report.json"
    report_path.unlink(missing_ok=True)  # never read an earlier run's report
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [*launcher, "-m", "launch.cli", "preflight", "-c", str(config), *case.options]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: stopped after {timeout:.0f} s", file=sys.stderr)
        return None
    seconds = time.perf_counter() - started
    print(f"{name}: exit {result.returncode}, {seconds:.0f} s", file=sys.stderr)
    if not report_path.is_file():
        print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(report_path.read_text())


def verdict(report: dict) -> str:
    """GO; NO-GO (estimate) or (measured) when memory fails; GO on memory (NO-GO: disk) else."""
    if report["verdict"] == "GO":
        return "GO"
    kinds = list(dict.fromkeys(reason.split(":", 1)[0] for reason in report["reasons"]))
    if not {"memory", "host memory"} & set(kinds):
        return f"GO on memory (NO-GO: {', '.join(kinds)})"
    measured = "measured" if report["memory"]["built"] else "estimate"
    return f"NO-GO ({'; '.join(measured if kind == 'memory' else kind for kind in kinds)})"


def gib(value: float) -> str:
    """GiB to one decimal, as docs/preflight.md shows; small (CPU) figures to three."""
    return f"{value / GiB:.1f}" if value >= GiB else f"{value / GiB:.3f}"


def row(case: Case, ranks: int, report: dict | None) -> str:
    if report is None:
        return f"| {case.describe()} | {ranks} | | failed | | no report.json (output on stderr) |"
    memory = report["memory"]
    estimate = memory["estimate"]
    floor = estimate["total_bytes"] - estimate["parts_bytes"].get("runtime", 0)
    if memory["out_of_memory"]:
        allocated, peak = "out of memory", ""
    elif not memory["built"]:
        allocated, peak = "not built", ""
    else:
        allocated, peak = gib(memory["peak_allocated_bytes"]), gib(memory["peak_bytes"])
    return (
        f"| {case.describe()} | {report['world']['ranks']} | {gib(floor)} | {allocated} | "
        f"{peak} | {verdict(report)} |"
    )


def selected(names: str) -> list[str]:
    chosen = []
    for name in names.split(","):
        if name not in GROUPS and name not in CASES:
            sys.exit(f"unknown case or group {name!r}; --list shows them")
        chosen += GROUPS.get(name, [name])
    return list(dict.fromkeys(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        default="default",
        help=f"comma-separated case names or groups ({', '.join(GROUPS)}); default: default",
    )
    parser.add_argument(
        "--nproc", type=int, help="ranks for every selected case (default: each case's own)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/preflight"))
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case")
    parser.add_argument("--list", action="store_true", help="print the cases and groups, then exit")
    args = parser.parse_args()
    if args.list:
        for group, names in GROUPS.items():
            print(f"{group}:")
            for name in names:
                print(f"  {name:<18} {CASES[name].ranks} rank(s)  {CASES[name].describe()}")
        return

    args.out = args.out.resolve()
    results = []
    for name in selected(args.cases):
        case = CASES[name]
        ranks = args.nproc or case.ranks
        results.append((name, case, ranks, run_case(name, case, ranks, args.out, args.timeout)))

    devices = {r["world"]["device_name"] for *_, r in results if r}
    versions = ", ".join(
        f"{package} {importlib.metadata.version(package)}" for package in ("torch", "deepspeed")
    )
    print(f"\nkinoe preflight, {', '.join(sorted(devices)) or '?'}, {versions}")
    print("| config | ranks | estimate GiB | allocated GiB | device peak GiB | verdict |")
    print("|---|---:|---:|---:|---:|---|")
    for _, case, ranks, report in results:
        print(row(case, ranks, report))
    for name, _, _, report in results:
        for reason in report["reasons"] if report else []:
            print(f"- {name}: {reason}")


if __name__ == "__main__":
    main()
