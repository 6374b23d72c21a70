"""What the benchmark scripts share: running work in a fresh process (a spawned child or a new
interpreter), the training-run config they all start from, memory meters and a step timer.

The scripts import it as `common` (run as `python benchmarks/x.py`, their own folder is first on
sys.path); nothing here imports a model library at module level.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable


# -- fresh processes -----------------------------------------------------------------------------
def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` in a fresh spawned process (keeps vLLM's thread pinning out of this one)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def child_env() -> dict[str, str]:
    """The environment of a benchmark's child interpreter: offline, quiet, no tokenizer threads."""
    env = dict(os.environ)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false"), ("TRANSFORMERS_VERBOSITY", "error")):
        env.setdefault(key, value)
    return env


def run_subprocess(argv: list[str], script: str, timeout: float | None = None,
                   errors: list[str] | None = None) -> dict | None:
    """Run `script` with `argv` in a fresh interpreter; its last stdout line is a JSON result.
    On failure (or past ``timeout`` seconds) None, and the error's tail appended to ``errors``."""
    try:
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                              env=child_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        message = f"timed out after {timeout:.0f} s"
    else:
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        message = proc.stderr[-3000:]
    print(f"{' '.join(argv)}: failed\n{message}", flush=True)
    if errors is not None:
        errors.append(message[-1500:])
    return None


# -- the run config ------------------------------------------------------------------------------
def run_config(out: Path, *, steps: int, lr: float, batch: int, model: dict[str, Any],
               data: dict[str, Any], method: dict[str, Any], **overrides: Any) -> Any:
    """A `DistillationConfig` for a short CPU run: cosine schedule with 10 % warm-up, about six
    log lines, no checkpoints, seed 0; `overrides` replace any top-level key."""
    from llmkd.training.config import config_from_dict

    return config_from_dict({
        "output_dir": str(out), "overwrite_output_dir": True, "max_steps": steps, "learning_rate": lr,
        "per_device_train_batch_size": batch, "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, steps // 10), "logging_steps": max(1, steps // 6), "save_strategy": "no",
        "use_cpu": True, "seed": 0, "disable_tqdm": True, "report_to": "none",
        "model": model, "data": data, "method": method} | overrides)


# -- memory and time -----------------------------------------------------------------------------
def maxrss_mb() -> float:
    """This process's peak RSS since it started (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the process's peak-RSS mark (Linux clear_refs 5) and return the current RSS in MB:
    unlike `maxrss_mb`, the peak after this excludes what setup needed."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_rss() -> float:
    """Peak RSS (MB) since the last `reset_peak_rss`."""
    return _status_mb("VmHWM")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads): steadier than wall time when
    other jobs share the cores."""
    t = os.times()
    return t.user + t.system


def step_stats(wall: list[float], cpu: list[float]) -> dict[str, Any]:
    """Per-step wall/CPU seconds; the median skips step 1 (one-off allocations, lazy init)."""
    timed, timed_cpu = (wall[1:], cpu[1:]) if len(wall) > 1 else (wall, cpu)
    return {"step_s": wall, "cpu_step_s": cpu, "step1_s": wall[0],
            "median_step_s": statistics.median(timed), "median_cpu_step_s": statistics.median(timed_cpu),
            "mean_step_s": statistics.mean(wall)}


def step_timer(cuda: bool = False) -> Any:
    """A TrainerCallback stamping wall and CPU time at train begin and after every optimizer
    step; `.times` / `.cpu_times` are the per-step seconds (batch fetch and sampling included).
    `cuda`: synchronise first (kernels run asynchronously: a step ends when the GPU is done)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.cpu_stamps: list[float] = []

        def _stamp(self) -> None:
            if cuda:
                import torch

                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(cpu_seconds())

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self._stamp()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self._stamp()

        @property
        def times(self) -> list[float]:
            return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

        @property
        def cpu_times(self) -> list[float]:
            return [b - a for a, b in zip(self.cpu_stamps, self.cpu_stamps[1:])]

    return StepTimer()
