"""CLI: `llmkd generate CONFIG [--set key=value ...]` (also `python -m llmkd.cli.generate`)."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("generate", help="teacher generations (+ top-k log-probs) into parquet shards")
    p.add_argument("config", help="generation YAML, e.g. configs/generate/quickstart.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set num_prompts=8 (repeatable)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from llmkd.generation.run import load_config, run_generation
    from llmkd.generation.writer import read_manifest

    cfg = load_config(args.config, args.overrides)
    out = run_generation(cfg, progress=args.progress)
    meta = read_manifest(out)["metadata"]
    mine = meta["workers"][str(cfg.worker)] if cfg.workers > 1 else meta
    who = f" worker {cfg.worker}/{cfg.workers}:" if cfg.workers > 1 else ""
    print(f"[llmkd] {out}:{who} {meta['totals']['rows']} rows in the dir "
          f"(yield {meta['totals']['yield']}, {mine['prompts']['skipped_too_long']} prompts too long), "
          f"{mine['last_run']['tokens_per_second']} tok/s this run")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`llmkd generate` alone, independent of the other subcommands' modules (used by tests)."""
    from llmkd.cli import run_alone

    return run_alone(register, "generate", argv, "python -m llmkd.cli.generate")


if __name__ == "__main__":
    sys.exit(main())
