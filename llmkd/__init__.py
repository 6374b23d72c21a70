"""llmkd: knowledge distillation for LLMs on the Hugging Face stack."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["DistillationConfig", "DistillationTrainer", "build_trainer", "load_config", "shutdown_distributed"]


def __getattr__(name: str) -> Any:
    # Lazy: `import llmkd` stays cheap (the CLI imports torch/transformers only when needed).
    if name in ("DistillationConfig", "load_config"):
        from llmkd.training import config

        return getattr(config, name)
    if name == "DistillationTrainer":
        from llmkd.training.trainer import DistillationTrainer

        return DistillationTrainer
    if name in ("build_trainer", "shutdown_distributed"):
        from llmkd.training import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
