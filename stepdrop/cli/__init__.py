"""The ``stepdrop`` command line: ``stepdrop train``, ``export``, ``sample``, ``compare``, ``optimize``,
``search-widths`` and ``diagnose``, one module per command (each with ``add_parser`` and ``run``)."""

from __future__ import annotations

import argparse
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the command as typed, for reports
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError) as exc:
        print(f"stepdrop {args.command}: error: {exc}", file=sys.stderr)
        return 2
