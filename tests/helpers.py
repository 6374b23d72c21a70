"""Small pieces several test files share: a tiny-run config and a callback that stops a run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from llmkd.training.config import config_from_dict


def tiny_config(pair: tuple[str, str], out: Path, *, method: dict[str, Any], **over: Any):
    """A CPU distill config on a (teacher, student) dir pair; `over` replaces top-level keys."""
    teacher, student = pair
    raw = {"output_dir": str(out), "max_steps": 4, "learning_rate": 3e-3, "per_device_train_batch_size": 4,
           "logging_steps": 1, "use_cpu": True, "save_strategy": "no", "seed": 0, "disable_tqdm": True,
           "model": {"teacher": teacher, "student": student},
           "data": {"recipe": "arithmetic", "num_train": 16, "num_eval": 4}, "method": method} | over
    return config_from_dict(raw)


class StopAt(TrainerCallback):
    """Interrupt training after `step` optimizer steps, as a crash would (after the save)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control
