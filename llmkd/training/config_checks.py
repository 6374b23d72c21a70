"""Config checks that used to fail only after the weights loaded (or never): non-finite numbers,
seeds, LoRA values, student layers beyond the teacher's depth, DeepSpeed without a launcher.
Called from `llmkd.training.config.check_config`; nothing here imports a model library."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

SEED_MAX = 2**32 - 1            # numpy's seed range; the Trainer seeds numpy with args.seed
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")   # set by torchrun / accelerate / deepspeed


def check_finite(where: str, value: Any) -> None:
    """Every float anywhere in a config section is finite: an infinite learning rate trains to
    NaN weights and exits 0 (YAML reads .inf / .nan, and "inf" / "nan" become floats on coercion)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config: {where}={value} is not a finite number; give a real value")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(f"{where}.{key}" if where else str(key), item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite(f"{where}[{i}]", item)


def check_seeds(top: dict[str, Any], data_seed: Any) -> None:
    for key, value in (("seed", top.get("seed")), ("data_seed", top.get("data_seed")), ("data.seed", data_seed)):
        if value is not None and not 0 <= value <= SEED_MAX:
            raise ValueError(f"config: {key}={value} is outside [0, 2**32 - 1]; e.g. {key}=42")


def check_lora_values(lora: dict[str, Any]) -> None:
    """The LoraConfig values peft would reject (or misread) only after the student loads."""
    r = lora.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"config: model.lora.r={r!r} must be a whole number >= 1, e.g. model.lora.r=16")
    alpha = lora.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"config: model.lora.lora_alpha={alpha!r} must be a number > 0, e.g. 32")
    dropout = lora.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"config: model.lora.lora_dropout={dropout!r} must be in [0, 1)")
    targets = lora.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))):
        raise ValueError(f"config: model.lora.target_modules={targets!r}; give module names such as "
                         "[q_proj, v_proj], a regex string, or all-linear")


def check_lora_targets(lora: dict[str, Any], module_names: list[str]) -> None:
    """target_modules name modules that exist (peft's rule: a list entry matches a module name or
    its last dotted parts; a string is a regex on the full name)."""
    import re

    targets = lora.get("target_modules")
    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in module_names):
            raise ValueError(f"config: model.lora.target_modules={targets!r} matches no module of the student")
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names if n and not n.split(".")[-1].isdigit()})
        raise ValueError(f"config: model.lora.target_modules has {missing} which the student lacks; "
                         f"its modules include: {', '.join(leaves[:20])}")


def teacher_depth(teacher: str | None) -> int | None:
    """num_hidden_layers from a local teacher's config.json (None when unknown)."""
    if not teacher or not (Path(teacher).expanduser() / "config.json").is_file():
        return None
    try:
        cfg = json.loads((Path(teacher).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (cfg, cfg.get("text_config") or {}) if isinstance(cfg, dict) else ():
        if isinstance(section.get("num_hidden_layers"), int):
            return section["num_hidden_layers"]
    return None


def check_student_layers(layers: Any, teacher: str | None) -> None:
    """A derived student's layers exist in the teacher (known from its config.json)."""
    depth = teacher_depth(teacher)
    if depth is None:
        return
    if isinstance(layers, int) and layers > depth:
        raise ValueError(f"config: model.student_layers={layers} but the teacher has {depth} layers; "
                         f"give at most {depth}")
    if isinstance(layers, list):
        bad = [i for i in layers if i >= depth]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"config: model.student_layers={layers}: "
                             + (f"{bad} are not layers of the teacher (it has {depth}: 0..{depth - 1})"
                                if bad else "an index appears twice") + "; e.g. [0, 2, 4]")


def check_launcher(top: dict[str, Any]) -> None:
    """DeepSpeed initialises torch.distributed from the launcher's environment; started by plain
    `llmkd distill` it fails after the models load (looking for MPI)."""
    if top.get("deepspeed") and not all(os.environ.get(k) for k in LAUNCHER_ENV):
        raise ValueError(f"config: deepspeed={top['deepspeed']!r} needs a distributed launcher, even for "
                         "one process: NPROC=1 launch/torchrun.sh CONFIG (or torchrun --nproc_per_node 1 "
                         "-m llmkd.cli distill CONFIG, launch/accelerate.sh, launch/deepspeed.sh)")


def check_output(top: dict[str, Any], resume: Any) -> None:
    from llmkd.training.checkpoint import checkpoint_problem, describe_skipped, find_checkpoint
    from llmkd.training.outdir import OutputDirBusy, busy_message, check_overwrite, foreign_entries, holder_of
    from llmkd.preflight import check_output_dir

    out = Path(top["output_dir"]).expanduser()
    check_output_dir(top["output_dir"])
    overwrite = top.get("overwrite_output_dir", False)
    if resume not in (None, False) and overwrite:
        raise ValueError("config: resume_from_checkpoint and overwrite_output_dir=true contradict each "
                         "other: resume continues the run in output_dir, overwrite starts it over; set one")
    if resume is True:
        found, skipped = find_checkpoint(out)
        if found is None and (holder := holder_of(out)):    # its first checkpoint is not written yet
            raise OutputDirBusy(busy_message(out, holder))
        if found is None:
            raise FileNotFoundError(
                f"config: resume_from_checkpoint=true but output_dir={str(out)!r} has no complete "
                "checkpoint" + (f" ({describe_skipped(skipped)})" if skipped else "")
                + "; drop resume_from_checkpoint to start a new run")
    elif resume not in (None, False):
        if not Path(str(resume)).is_dir():
            raise FileNotFoundError(f"config: resume_from_checkpoint={resume!r} is not a checkpoint "
                                    "directory; give checkpoint-N under output_dir, or true for the last one")
        problem = checkpoint_problem(resume)
        if problem:
            raise ValueError(f"config: resume_from_checkpoint={resume!r} is not a complete checkpoint "
                             f"({problem}); give another checkpoint-N, or true for the newest complete one")
    elif overwrite:
        check_overwrite(out)
    elif foreign_entries(out):
        has_ckpt = find_checkpoint(out)[0] is not None
        raise FileExistsError(
            f"config: output_dir={str(out)!r} exists and is not empty"
            + ("; to continue its run: --set resume_from_checkpoint=true" if has_ckpt else "")
            + "; to start over (its checkpoints are deleted): --set overwrite_output_dir=true; "
            "or choose another output_dir (nothing was written)")
