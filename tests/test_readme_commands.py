"""Every `llmkd ...` command the README shows inline parses as written (a user copies them):
e.g. each `--set` takes one KEY=VALUE, so several overrides need several `--set`."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from llmkd.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
# inline commands with arguments beyond the subcommand; --help exits by design
COMMANDS = sorted({c for c in re.findall(r"`(llmkd [^`]+)`", README.read_text())
                   if len(shlex.split(c)) > 2 and "--help" not in c})


def test_readme_has_commands_to_check():
    assert any("--set" in c for c in COMMANDS), COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as exc:   # argparse's "unrecognized arguments" and friends
        pytest.fail(f"README command does not parse: {command!r} (exit {exc.code})")
