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
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmkd.fsutil import existing_parent, no_space
from llmkd.training.outdir import mark_output_dir
from llmkd.preflight import weights_problem

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"             # checkpoints being written; never resumed from
TRAINER_STATE = "trainer_state.json"
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")   # torch zip archives the Trainer loads


class RunFailed(RuntimeError):
    """Training stopped on a failure it explains in one line (disk full, a non-finite loss); the
    newest complete checkpoint is untouched. The CLI prints the line and exits 1."""


def checkpoint_problem(path: str | Path) -> str | None:
    """None if `path` looks like a checkpoint the Trainer can resume from (file headers only);
    else what is wrong, naming the file."""
    p = Path(path)
    if not p.is_dir():
        return "not a directory"
    try:
        state = json.loads((p / TRAINER_STATE).read_text())
    except FileNotFoundError:
        if (p / "config.json").is_file() and weights_problem(p) is None:
            return (f"no {TRAINER_STATE}: {p} is a model directory, not a training checkpoint; to start "
                    "from its weights, set model.student to it")
        return f"no {TRAINER_STATE}"
    except (OSError, ValueError):
        return f"{p / TRAINER_STATE} is unreadable (not JSON)"
    if not isinstance(state, dict) or not isinstance(state.get("global_step", 0), int):
        return f"{p / TRAINER_STATE} is not a Trainer state (no JSON object with an integer global_step)"
    if (p / "latest").is_file():   # DeepSpeed: weights and optimizer live in its global_step* dir
        return None
    for name in TORCH_FILES:
        if (p / name).exists() and not _zip_ok(p / name):
            return f"{p / name} is damaged (not a complete torch archive)"
    return weights_problem(p)


def _zip_ok(path: Path) -> bool:
    """torch.save writes a zip archive: its central directory must parse and hold data.pkl."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def load_problem(path: str | Path, model: Any) -> str | None:
    """What the Trainer would fail on when resuming `model` from `path` (None: nothing): its
    trainer state, weights of another model (names or shapes differ), an optimizer, scheduler or
    RNG file torch cannot load. Reads headers and maps the torch files (no full load)."""
    import torch
    from transformers import TrainerState

    p = Path(path)
    try:
        TrainerState.load_from_json(str(p / TRAINER_STATE))
    except (TypeError, ValueError, OSError) as err:
        return f"{p / TRAINER_STATE} is not a Trainer state ({' '.join(str(err).split())[:80]})"
    if (p / "latest").is_file():
        return None
    problem = _weights_mismatch(p, model)
    if problem:
        return problem
    for name in TORCH_FILES[:2]:      # rng_state.pth needs numpy globals: its zip check must do
        if (p / name).exists():
            try:
                torch.load(p / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:   # noqa: BLE001  (torch raises many types on a bad archive)
                return f"{p / name} cannot be loaded ({' '.join(str(err).split())[:80]})"
    return None


def _weights_mismatch(p: Path, model: Any) -> str | None:
    """The checkpoint's tensors (safetensors headers) against the model's: another model's
    checkpoint shares no names, or shares names with other shapes."""
    from llmkd.preflight import SAFE_INDEX

    files = [p / n for n in ("model.safetensors", "adapter_model.safetensors") if (p / n).exists()]
    if (p / SAFE_INDEX).exists():
        files = [p / n for n in sorted(set(json.loads((p / SAFE_INDEX).read_text())["weight_map"].values()))]
    ours = {k.replace(".default", ""): tuple(v.shape) for k, v in model.state_dict().items()}
    shared = 0
    for f in files:
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name not in ours:
                return f"{f} holds {name}, which the student lacks: the checkpoint belongs to another model"
            shared += 1
            if tuple(info.get("shape", ())) != ours[name]:
                return (f"{f} holds {name} of shape {tuple(info['shape'])} but the student's is "
                        f"{ours[name]}: the checkpoint belongs to another model")
    if files and not shared:
        return f"{files[0]} shares no tensor name with the student: the checkpoint belongs to another model"
    return None


def find_checkpoint(output_dir: str | Path, problem: Callable[[Path], str | None] = checkpoint_problem
                    ) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest complete checkpoint-N under `output_dir` or None, [(incomplete dir, why)]) where
    the incomplete ones are interrupted staged saves and damaged checkpoint dirs newer than it.
    `problem` decides what counts as complete (default: from file headers)."""
    out = Path(output_dir)
    skipped: list[tuple[Path, str]] = []
    staging = out / STAGING
    if staging.is_dir():
        skipped += [(d, "its save was interrupted") for d in sorted(staging.iterdir())]
    found = sorted(((int(m[1]), d) for d in (out.iterdir() if out.is_dir() else ())
                    if (m := CHECKPOINT.match(d.name)) and d.is_dir()), reverse=True)
    for _, d in found:
        why = problem(d)
        if why is None:
            return d, skipped
        skipped.append((d, why))
    return None, skipped


def describe_skipped(skipped: list[tuple[Path, str]]) -> str:
    return "; ".join(f"skipped incomplete {d} ({why})" for d, why in skipped)


def resolve_resume(args: TrainingArguments, resume: str | bool | None, model: Any = None) -> str | None:
    """The checkpoint to resume from: `true` -> the newest one that loads into `model` (naming
    any it skipped, on stderr), a path -> that checkpoint if it loads. Starting fresh with
    overwrite_output_dir clears the old run's checkpoints, so a later `resume=true` can never
    pick one of them. Stale staging dirs of killed saves are removed either way."""
    out = Path(args.output_dir)
    main = args.should_save

    def problem(d: Path) -> str | None:
        return checkpoint_problem(d) or (load_problem(d, model) if model is not None else None)

    if resume is True:
        found, skipped = find_checkpoint(out, problem)
        if found is None:
            raise ValueError(f"resume_from_checkpoint=true but output_dir={str(out)!r} has no complete "
                             "checkpoint" + (f" ({describe_skipped(skipped)})" if skipped else "")
                             + "; drop resume_from_checkpoint to start a new run")
        if skipped and main:
            print(f"llmkd: {describe_skipped(skipped)}; resuming from {found}", file=sys.stderr)
        resume = str(found)
    elif resume:
        why = problem(Path(resume))
        if why:
            raise ValueError(f"resume_from_checkpoint={str(resume)!r} cannot be resumed from ({why}); "
                             "give another checkpoint-N, or true for the newest one that loads")
    elif main and getattr(args, "overwrite_output_dir", False) and out.is_dir():
        for d in out.iterdir():
            if CHECKPOINT.match(d.name) and d.is_dir():
                shutil.rmtree(d)
    if main:
        shutil.rmtree(out / STAGING, ignore_errors=True)
        mark_output_dir(out)          # also for runs started from Python (the quickstart)
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
        if main:
            for filename, text in extra_files.items():
                (staged / filename).write_text(text)
    except Exception as err:
        if not no_space(err, staging_root):
            raise
        needed = _tree_size(staged)
        shutil.rmtree(staging_root, ignore_errors=True)       # frees what the failed save wrote
        raise RunFailed(_disk_full_message(run_dir, name, needed)) from None
    finally:
        del trainer._get_output_dir
    state = trainer.state
    if main:
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


# -- disk full ---------------------------------------------------------------------------------
def _tree_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def _disk_full_message(run_dir: Path, name: str, written: int) -> str:
    """One line: where, how much is free, about how much a checkpoint needs, what is intact."""
    previous, _ = find_checkpoint(run_dir)
    need = max(_tree_size(previous) if previous else 0, written)
    free = shutil.disk_usage(existing_parent(run_dir)).free
    mb = 2**20
    kept = (f"the newest complete checkpoint is still {previous}; resume with --set "
            "resume_from_checkpoint=true" if previous else "no checkpoint was saved")
    return (f"disk full while saving {name} in {run_dir}: a checkpoint needs about {need / mb:.1f} MB "
            f"(at least {written / mb:.1f} MB were written before the failure), {free / mb:.1f} MB are free; "
            f"free space there (or lower save_total_limit); {kept}")


# -- a resume with another training config -----------------------------------------------------
TRAINING_FIELDS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
                   "weight_decay", "max_grad_norm", "optim", "optim_args", "adam_beta1", "adam_beta2",
                   "adam_epsilon", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
                   "label_smoothing_factor", "bf16", "fp16", "model", "data", "method")
ARGS_FILE = "training_args.json"


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'field: old -> new' for the fields that decide what the run computes (the logging,
    saving and length of a run may change freely on resume)."""
    fields = [k for k in TRAINING_FIELDS if k in saved]      # an older checkpoint may lack some
    old, new = _flat({k: saved[k] for k in fields}), _flat({k: now.get(k) for k in fields})
    keys = list(old) + [k for k in new if k not in old]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'method': {'params': {'kind': 'fkl'}}} -> {'method.params.kind': 'fkl'}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(cfg: Any) -> None:
    """Resuming continues the checkpoint's run: a changed learning rate, method, data... would
    silently train something else. List the differences; go on only with allow_config_change."""
    resume = getattr(cfg, "resume_from_checkpoint", None)
    if not resume:
        return
    ckpt = find_checkpoint(cfg.output_dir)[0] if resume is True else Path(resume)
    args_file = ckpt / ARGS_FILE if ckpt else None
    if args_file is None or not args_file.is_file():
        return          # nothing recorded (an older checkpoint): nothing to compare
    try:
        saved = json.loads(args_file.read_text())
    except (OSError, ValueError):
        return
    changes = config_changes(saved, json.loads(cfg.to_json_string()))
    if not changes:
        return
    listed = "; ".join(changes)
    if not cfg.allow_config_change:
        raise ValueError(f"config: resuming from {ckpt} with a changed training config ({listed}); "
                         "restore those values, or set allow_config_change=true to continue with the new ones")
    if cfg.should_save:
        print(f"llmkd: resuming from {ckpt} with a changed training config: {listed}", file=sys.stderr)


def optimizer_settings(optimizer: Any) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (no params), as the config set them before a resume."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def reapply_settings(optimizer: Any, scheduler: Any, fresh: list[dict[str, Any]]) -> None:
    """After a checkpoint's optimizer and scheduler state are loaded: the config's own weight
    decay, betas, eps... and base learning rate (the state holds the old run's; a resume with
    allow_config_change must train with the new ones), and each group's learning rate set from the
    schedule at the resumed step (a changed max_steps changes the schedule too)."""
    from torch.optim.lr_scheduler import LambdaLR

    if len(fresh) != len(optimizer.param_groups):
        return
    for group, new in zip(optimizer.param_groups, fresh):
        group.update({k: v for k, v in new.items() if k not in ("lr", "initial_lr")})
        group["initial_lr"] = new.get("initial_lr", new["lr"])
    if isinstance(scheduler, LambdaLR):
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
