"""The ``kinoe`` command: one subcommand per stage.

Subcommand modules are imported only when their command runs (or for ``--help``), and they
import heavy packages (torch, deepspeed) inside their ``main``, so ``kinoe --help`` is fast.
A module provides ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

from common.errors import KinoeError
from common.logs import setup_logging

# name -> module; a command is listed here only once its stage exists.
COMMANDS: dict[str, str] = {
    "data": "data_prep.cli",
    "doctor": "launch.doctor",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand's arguments."""
    parser = argparse.ArgumentParser(
        prog="kinoe",
        description="kinoe: pretraining of Japanese Mistral and Mixtral models, from raw text to evaluation.",
        epilog="Run 'kinoe <command> --help' for a command's options. Docs: docs/architecture.md",
    )
    parser.add_argument("--version", action="version", version=f"kinoe {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kinoe`` console script."""
    args = build_parser().parse_args(argv)
    setup_logging(None)
    module = importlib.import_module(COMMANDS[args.command])
    try:
        return int(module.main(args) or 0)
    except KinoeError as error:
        for line in str(error).splitlines():
            print(f"kinoe {args.command}: error: {line}", file=sys.stderr)
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
