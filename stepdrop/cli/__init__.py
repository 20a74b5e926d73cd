"""The ``stepdrop`` command line: ``stepdrop train``, ``export``, ``sample``, ``compare``, ``optimize``,
``search-widths`` and ``diagnose``, one module per command (each with ``add_parser`` and ``run``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from stepdrop.cli import compare, diagnose, export, optimize, sample, search_widths, train

__all__ = ["build_parser", "main"]

COMMANDS = (train, export, sample, compare, optimize, search_widths, diagnose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepdrop",
        description="Fast sampling for tiny diffusion models: step policies, fused kernels, counted costs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def dist_world() -> int:
    """The torchrun world size of this process (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the command as typed, for reports
    try:
        code = args.func(args)
        if dist_world() > 1:  # under torchrun: every rank passed the final barrier; skip the C++ teardown
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError) as exc:
        print(f"stepdrop {args.command}: error: {exc}", file=sys.stderr)
        return 2
