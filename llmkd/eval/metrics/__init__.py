"""`evaluate` metric modules shipped with llmkd, loaded by local path (no hub access needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str, **kwargs: Any) -> Any:
    """`evaluate.load` on the module directory `llmkd/eval/metrics/<name>/`."""
    import evaluate

    if name not in available_metrics():
        raise ValueError(f"metric {name!r} is not shipped with llmkd; available: {available_metrics()}")
    return evaluate.load(str(METRICS_DIR / name), **kwargs)
