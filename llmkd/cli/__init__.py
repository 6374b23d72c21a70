"""`llmkd` command line: quickstart | distill | generate | eval | report | models prepare.

Each area registers its own subcommands (`register(subparsers)`) and imports heavy libraries
only inside its handlers, so `llmkd --help` and config errors take a fraction of a second.
User errors (a bad config value, a missing file, a broken model dir) print one line and exit 2;
anything else keeps its traceback. Library logs (vLLM, transformers) go to stderr at warning
level unless --verbose, so stdout holds llmkd's own results.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, Callable

from llmkd.fsutil import DiskFullError

COMMAND_MODULES = ("llmkd.cli.train", "llmkd.cli.generate", "llmkd.cli.eval", "llmkd.cli.serve")
# One line and exit 2 for these; LLMKD_DEBUG=1 shows their traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
               ConnectionError,   # e.g. a teacher server gone after its retries
               DiskFullError)
STDOUT_LOGGERS = ("DeepSpeed",)   # libraries whose own log handler writes to stdout
VERBOSE_HELP = "library logs (vLLM, transformers, datasets) at info level (default: warnings only)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmkd", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():   # also accepted after the subcommand
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help=VERBOSE_HELP)
    return parser


def route_library_logs(verbose: bool) -> None:
    """Library logging to stderr, warnings only unless `verbose`; explicit env settings win.
    Must run before vLLM is imported (it reads its settings once, at import)."""
    level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", level.lower())
    os.environ.setdefault("DATASETS_VERBOSITY", level.lower())
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level),
                        format="%(levelname)s %(name)s: %(message)s")
    for name in STDOUT_LOGGERS:   # a logger-level filter runs before the handler the library adds
        logging.getLogger(name).addFilter(_ToStderr())


class _ToStderr(logging.Filter):
    """Hands every record to the root (stderr) handlers instead of the logger's own ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        for handler in logging.getLogger().handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
        return False


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def run_alone(register: Callable[[Any], None], command: str, argv: list[str] | None, prog: str) -> int:
    """One subcommand as its own program (`python -m llmkd.cli.generate`, launch scripts, tests),
    without importing the other subcommands' modules."""
    parser = argparse.ArgumentParser(prog=prog)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    route_library_logs(args.verbose)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get("LLMKD_DEBUG"):
            raise
        print(f"llmkd {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:   # Ctrl-C outside training (which saves and says so itself)
        print(f"llmkd {args.command}: {one_line(err) or 'interrupted'}", file=sys.stderr)
        return getattr(err, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
