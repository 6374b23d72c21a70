"""Checkpoints that are complete or absent, and finding the newest complete one.

transformers' Trainer writes `output_dir/checkpoint-N` file by file, so a process killed during a
save leaves a directory that looks like a checkpoint but lacks its trainer state or has cut-off
weights, and `resume_from_checkpoint=true` then fails on it. Here a checkpoint is written under
`output_dir/.staging/checkpoint-N` (every rank writes its part there, the method's state
included) and renamed to `checkpoint-N` only when all of it is on disk: a rename is atomic, so a
`checkpoint-N` directory is always complete. Resuming takes the newest complete checkpoint and
says which incomplete ones (an interrupted staging dir, a damaged older-style dir) it skipped.

No model library is imported at module level: the config validation uses the discovery part.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmkd.preflight import weights_problem

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"             # checkpoints being written; never resumed from
TRAINER_STATE = "trainer_state.json"


def checkpoint_problem(path: str | Path) -> str | None:
    """None if `path` is a checkpoint the Trainer can resume from; else what is missing."""
    p = Path(path)
    if not p.is_dir():
        return "not a directory"
    try:
        json.loads((p / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE}"
    except (OSError, ValueError):
        return f"{TRAINER_STATE} is unreadable"
    if (p / "latest").is_file():   # DeepSpeed: weights and optimizer live in its global_step* dir
        return None
    return weights_problem(p)


def find_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest complete checkpoint-N under `output_dir` or None, [(incomplete dir, why)]) where
    the incomplete ones are interrupted staged saves and damaged checkpoint dirs newer than it."""
    out = Path(output_dir)
    skipped: list[tuple[Path, str]] = []
    staging = out / STAGING
    if staging.is_dir():
        skipped += [(d, "its save was interrupted") for d in sorted(staging.iterdir())]
    found = sorted(((int(m[1]), d) for d in (out.iterdir() if out.is_dir() else ())
                    if (m := CHECKPOINT.match(d.name)) and d.is_dir()), reverse=True)
    for _, d in found:
        problem = checkpoint_problem(d)
        if problem is None:
            return d, skipped
        skipped.append((d, problem))
    return None, skipped


def describe_skipped(skipped: list[tuple[Path, str]]) -> str:
    return "; ".join(f"skipped incomplete {d} ({why})" for d, why in skipped)


def resolve_resume(args: TrainingArguments, resume: str | bool | None) -> str | None:
    """The checkpoint to resume from: `true` -> the newest complete one (naming any incomplete
    ones it skipped, on stderr), a path -> that checkpoint if complete. Starting fresh with
    overwrite_output_dir clears the old run's checkpoints, so a later `resume=true` can never
    pick one of them. Stale staging dirs of killed saves are removed either way."""
    out = Path(args.output_dir)
    main = args.should_save
    if resume is True:
        found, skipped = find_checkpoint(out)
        if found is None:
            raise ValueError(f"resume_from_checkpoint=true but output_dir={str(out)!r} has no complete "
                             "checkpoint" + (f" ({describe_skipped(skipped)})" if skipped else "")
                             + "; drop resume_from_checkpoint to start a new run")
        if skipped and main:
            print(f"llmkd: {describe_skipped(skipped)}; resuming from {found}", file=sys.stderr)
        resume = str(found)
    elif resume:
        problem = checkpoint_problem(resume)
        if problem:
            raise ValueError(f"resume_from_checkpoint={str(resume)!r} is not a complete checkpoint "
                             f"({problem}); give another checkpoint-N, or true for the newest complete one")
    elif main and getattr(args, "overwrite_output_dir", False) and out.is_dir():
        for d in out.iterdir():
            if CHECKPOINT.match(d.name) and d.is_dir():
                shutil.rmtree(d)
    if main:
        shutil.rmtree(out / STAGING, ignore_errors=True)
    return resume or None


def save_checkpoint(trainer: Trainer, model: Any, trial: Any, save: Callable[[Any, Any], None],
                    extra_files: dict[str, str]) -> Path:
    """Run the Trainer's own `_save_checkpoint` (`save`) into a staging dir, add `extra_files`
    (e.g. the method state), and rename it to `checkpoint-N` once every rank has written its
    part. Rotation (save_total_limit) and best-model tracking then act on the real directory."""
    from transformers.trainer_utils import rotate_checkpoints

    run_dir = Path(trainer._get_output_dir(trial=trial))
    name = f"checkpoint-{trainer.state.global_step}"
    staging_root = run_dir / STAGING
    staged, final = staging_root / name, run_dir / name
    main = trainer.args.should_save
    if main:
        shutil.rmtree(staged, ignore_errors=True)      # left by a save killed at this step
    trainer.accelerator.wait_for_everyone()
    # The Trainer writes to _get_output_dir()/checkpoint-N: point it at the staging root.
    trainer._get_output_dir = lambda trial=None: str(staging_root)
    try:
        save(model, trial)
    finally:
        del trainer._get_output_dir
    state = trainer.state
    if main:
        for filename, text in extra_files.items():
            (staged / filename).write_text(text)
        if state.best_model_checkpoint == str(staged):   # recorded while saving: use the real path
            state.best_model_checkpoint = str(final)
            state.save_to_json(str(staged / TRAINER_STATE))
    trainer.accelerator.wait_for_everyone()             # every rank's files are in `staged`
    if main:
        if final.exists():                              # the same step saved twice (epoch end)
            shutil.rmtree(final)
        os.replace(staged, final)
        shutil.rmtree(staging_root, ignore_errors=True)
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=trainer.args.save_total_limit,
                           best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)
    trainer.accelerator.wait_for_everyone()
    return final
