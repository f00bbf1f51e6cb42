"""The ``kinoe`` command: one subcommand per stage.

Only the module of the command being run is imported (stage modules pull in datatrove, torch
and more), so ``kinoe --help`` stays fast. A command module provides ``add_arguments(parser)``
and ``main(args) -> int``; its one-line help lives in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from common.errors import KinoeError
from common.logs import setup_logging
from common.secrets import forget_declared_secret_variables, redact

# name -> (module, one-line help); a command is listed here only once its stage exists.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": (
        "data_prep.cli",
        "filter and deduplicate Japanese text (mC4, Wikipedia, local files, Aozora) with datatrove",
    ),
    "tokenizer": (
        "tokenizer.cli",
        "train a Japanese SentencePiece tokenizer, export it to Hugging Face, report, encode shards",
    ),
    "pretrain": (
        "pretrain.cli",
        "pretrain Mistral under DeepSpeed ZeRO with phased data mixtures (resumes from latest)",
    ),
    "convert": (
        "convert.cli",
        "convert DeepSpeed checkpoints to verified Hugging Face models, and Hugging Face models back in",
    ),
    "finetune": (
        "finetune.cli",
        "fine-tune a Hugging Face model: jaster instruction data, SFT (full or LoRA) and DPO under DeepSpeed",
    ),
    "eval": (
        "eval.cli",
        "evaluate a Hugging Face model: JGLUE (log-likelihood or llm-jp-eval generation), bits per character, JA MT-Bench",
    ),
    "pipeline": (
        "launch.pipeline",
        "run every stage in order here, or submit them as dependent SLURM jobs; complete steps are skipped",
    ),
    "preflight": (
        "launch.preflight",
        "GO or NO-GO for a pretrain config on this hardware: memory, step time, projected time, disk, placement",
    ),
    "doctor": (
        "launch.doctor",
        "check Python, torch/CUDA/NCCL, GPUs, DeepSpeed ops, packages, W&B login and disk",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; ``command``'s own arguments are added when it is given."""
    parser = argparse.ArgumentParser(
        prog="kinoe",
        description="kinoe: pretraining of Japanese Mistral and Mixtral models, from raw text to evaluation.",
        epilog="Run 'kinoe <command> --help' for a command's options. Docs: docs/architecture.md",
    )
    parser.add_argument("--version", action="version", version=f"kinoe {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (module_name, help_line) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_line, description=help_line)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


# A folder where this process leaves its exit code: torchrun turns every non-zero exit of its
# trainers into its own exit 1, so launch/slurm/torchrun.sh sets this and reads the codes back
# to exit 75 when every trainer stopped at a checkpoint (docs/cluster.md, "Exit codes").
EXIT_CODE_DIR = "KINOE_EXIT_CODE_DIR"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kinoe`` console script."""
    code = _run(argv)
    folder = os.environ.get(EXIT_CODE_DIR)
    if folder:
        # Advisory: without the record the script exits with torchrun's own code.
        with contextlib.suppress(OSError):
            Path(folder, f"rank{os.environ.get('RANK', '0')}").write_text(f"{code}\n")
    return code


def _run(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    # Each command redacts what its own configs declare (main may run many times in a process).
    forget_declared_secret_variables()
    setup_logging(None)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except KinoeError as error:
        # The same redaction as the log file: a secret can sit inside a path or a URL.
        lines = redact(str(error)).splitlines()
        # One write for the whole message (print makes two, text then newline): every rank of
        # a distributed run says the same thing into one pipe, and two-part writes interleave.
        sys.stderr.write("".join(f"kinoe {args.command}: error: {line}\n" for line in lines))
        sys.stderr.flush()
        return error.exit_code
    except KeyboardInterrupt:
        print(f"kinoe {args.command}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    try:
        return importlib.metadata.version("kinoe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
