"""`llmkd` command line: quickstart | distill | generate | eval | report | models prepare.

Each area registers its own subcommands (`register(subparsers)`) and imports heavy libraries
only inside its handlers, so `llmkd --help` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("llmkd.train_cli", "llmkd.generation.cli", "llmkd.eval.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmkd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # User errors: one clear line, no traceback (set LLMKD_DEBUG=1 to see it).
        import os

        if os.environ.get("LLMKD_DEBUG"):
            raise
        print(f"llmkd {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
