"""Small pieces several test files share: a tiny-run config, a callback that stops a run, and an
offline `llmkd distill` expected to fail with one line."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
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


def offline_distill_error(tmp_path: Path, student: str, data: Path, **data_keys: Any) -> str:
    """`llmkd distill` (a real subprocess) of `student` on the generated dir `data`: asserts it
    fails with exactly one error line, exit 2, no traceback and no output dir; returns that line."""
    cfg = {"output_dir": str(tmp_path / "out"), "use_cpu": True, "max_steps": 1, "save_strategy": "no",
           "report_to": "none", "model": {"teacher": None, "student": student, "teacher_mode": "offline"},
           "data": {"path": str(data), "num_train": 4, "num_eval": 2, **data_keys},
           "method": {"name": "token_kd", "kind": "fkl"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "llmkd.cli", "distill", str(tmp_path / "cfg.yaml")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llmkd distill: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
    return errors[0]


SERVER_START_TIMEOUT = 600     # a cold vLLM server on 2 busy cores: imports dominate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_teacher_server(config: Path, url: str, log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """`llmkd serve-teacher CONFIG` in its own process group, returned once `url` answers
    /v1/models (it fails the test with the log's tail if the server dies or takes too long)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llmkd.cli.serve", str(config)], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5) as resp:
                    if resp.status == 200:
                        return proc
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the teacher server {url} did not start in time"
            time.sleep(2)
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server's process group (API server, engine core, worker)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
