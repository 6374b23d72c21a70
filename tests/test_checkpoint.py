"""Checkpoints survive kills, and interrupts save: real `kill -9` during a save, real SIGINT and
SIGTERM to `llmkd distill`, each followed by `resume_from_checkpoint=true` that must end with the
same weights as an uninterrupted run."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from llmkd.training.checkpoint import STAGING, checkpoint_problem, find_checkpoint
from llmkd.training.config import config_from_dict
from llmkd.training.outdir import MARKER
from llmkd.training.pipeline import build_trainer

MAX_STEPS = 8


def run_config(tiny_pair, out: Path, **over) -> dict:
    """16 rows, batch 4: 4 steps per epoch, so a resume at step 2-6 skips into an epoch."""
    return {"output_dir": str(out), "use_cpu": True, "max_steps": MAX_STEPS, "learning_rate": 1e-3,
            "per_device_train_batch_size": 4, "save_strategy": "steps", "save_steps": 2, "seed": 0,
            "logging_steps": 1, "disable_tqdm": True,
            "model": {"teacher": tiny_pair[0], "student": tiny_pair[1]},
            "data": {"recipe": "arithmetic", "num_train": 16, "num_eval": 4},
            "method": {"name": "token_kd", "kind": "fkl"}, **over}


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def reference(tiny_pair, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of the same run, never interrupted."""
    trainer = build_trainer(config_from_dict(run_config(tiny_pair, tmp_path_factory.mktemp("ref") / "run")))
    trainer.train()
    return weights(trainer)


def resume(tiny_pair, out: Path, **over) -> dict[str, torch.Tensor]:
    trainer = build_trainer(config_from_dict(run_config(tiny_pair, out, resume_from_checkpoint=True, **over)))
    trainer.train()
    return weights(trainer)


def write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# -- newest complete checkpoint ---------------------------------------------------------------
def test_newest_complete_checkpoint_skips_incomplete_ones(tiny_pair, tmp_path):
    weights_file = Path(tiny_pair[1]) / "model.safetensors"
    for step in (2, 4, 6):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        shutil.copy(weights_file, d / "model.safetensors")
        (d / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()                 # killed before the state
    data = (tmp_path / "checkpoint-6" / "model.safetensors").read_bytes()        # cut-off weights
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(data[: len(data) // 3])
    (tmp_path / STAGING / "checkpoint-8").mkdir(parents=True)                    # a save in progress
    found, skipped = find_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint-2"
    reasons = {d.name: why for d, why in skipped}
    assert reasons["checkpoint-8"] == "its save was interrupted"
    assert "truncated" in reasons["checkpoint-6"] and reasons["checkpoint-4"] == "no trainer_state.json"


def test_saves_are_staged_then_renamed_with_rotation_and_best_model(tiny_pair, tmp_path):
    out = tmp_path / "run"
    trainer = build_trainer(config_from_dict(run_config(
        tiny_pair, out, eval_strategy="steps", eval_steps=2, save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss")))
    trainer.train()
    kept = sorted(d.name for d in out.iterdir() if d.name.startswith("checkpoint-"))
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == out and best.is_dir() and best.name in kept and len(kept) <= 3
    assert f"checkpoint-{MAX_STEPS}" in kept and not (out / STAGING).exists()
    for name in kept:
        assert checkpoint_problem(out / name) is None
        assert (out / name / "llmkd_method_state.json").exists()
        recorded = json.loads((out / name / "trainer_state.json").read_text())["best_model_checkpoint"]
        assert recorded is None or STAGING not in recorded


def test_overwrite_output_dir_starts_over(tiny_pair, tmp_path):
    out = tmp_path / "run"
    old = out / "checkpoint-99"
    old.mkdir(parents=True)
    (out / MARKER).write_text("{}")          # an earlier llmkd run's output_dir
    (old / "trainer_state.json").write_text("{}")
    shutil.copy(Path(tiny_pair[1]) / "model.safetensors", old)
    trainer = build_trainer(config_from_dict(run_config(tiny_pair, out, max_steps=2, overwrite_output_dir=True)))
    trainer.train()
    assert sorted(d.name for d in out.iterdir() if d.name.startswith("checkpoint-")) == ["checkpoint-2"]


# -- kill -9 during a save ---------------------------------------------------------------------
# The child pauses inside the save of checkpoint-4 (and says so in a marker file) so the test
# can kill it at that exact point: after the weights but before the optimizer state, after
# everything but the trainer state (the case that broke resume before), or after the rename.
KILL_RUNNER = r"""
import os, sys, time
point, marker = sys.argv[1], sys.argv[2]

def pause(where):
    with open(marker, "w") as f:
        f.write(str(where))
    time.sleep(600)

import torch
from transformers import trainer_callback, trainer_utils

if point == "optimizer":
    save = torch.save
    def patched(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            pause(f)
        return save(obj, f, *args, **kwargs)
    torch.save = patched
elif point == "trainer_state":
    save_to_json = trainer_callback.TrainerState.save_to_json
    def patched(self, path):
        if os.path.join("checkpoint-4", "trainer_state.json") in str(path):
            pause(path)
        return save_to_json(self, path)
    trainer_callback.TrainerState.save_to_json = patched
elif point == "after_rename":
    rotate = trainer_utils.rotate_checkpoints
    def patched(output_dir, *args, **kwargs):
        if os.path.isdir(os.path.join(output_dir, "checkpoint-4")) and not output_dir.endswith(".staging"):
            pause(output_dir)   # the real dir (the Trainer also rotates inside the staging dir)
        return rotate(output_dir, *args, **kwargs)
    trainer_utils.rotate_checkpoints = patched

from llmkd.cli import main
sys.exit(main(sys.argv[3:]))
"""


def wait_for(path: Path, child: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert child.poll() is None, f"the child exited ({child.returncode}) before the save"
        assert time.monotonic() < deadline, "the child never reached the save"
        time.sleep(0.05)


@pytest.mark.parametrize("point", ["optimizer", "trainer_state", "after_rename"])
def test_kill_9_during_a_save_then_resume_gives_the_same_weights(point, tiny_pair, tmp_path, reference, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, run_config(tiny_pair, out))
    marker = tmp_path / "paused"
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-c", KILL_RUNNER, point, str(marker), "distill", str(cfg)],
                                 stdout=log, stderr=subprocess.STDOUT, env=child_env())
        try:
            wait_for(marker, child)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    staged = out / STAGING / "checkpoint-4"
    found, skipped = find_checkpoint(out)
    if point == "after_rename":
        assert found == out / "checkpoint-4" and not staged.exists()
    else:
        assert staged.is_dir() and (staged / "model.safetensors").exists() and not (out / "checkpoint-4").exists()
        assert found == out / "checkpoint-2" and (staged, "its save was interrupted") in skipped
    assert_same_weights(resume(tiny_pair, out), reference)
    if point != "after_rename":
        assert f"skipped incomplete {staged} (its save was interrupted); resuming from {found}" in capsys.readouterr().err


# -- SIGINT / SIGTERM ------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_saves_and_resumes_exactly(sig, tiny_pair, tmp_path, reference):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, run_config(tiny_pair, out, save_strategy="no"))   # saves anyway
    with open(tmp_path / "stderr.log", "w") as err_log:
        child = subprocess.Popen([sys.executable, "-m", "llmkd.cli", "distill", str(cfg)], stdout=subprocess.PIPE,
                                 stderr=err_log, text=True, env=child_env())
        try:
            logged = 0
            for line in child.stdout:            # one log line per optimizer step (logging_steps=1)
                logged += "'loss'" in line
                if logged == 3:
                    child.send_signal(sig)
                    break
            child.stdout.read()
            child.wait(timeout=600)
        finally:
            child.kill()
    stderr = (tmp_path / "stderr.log").read_text()
    assert child.returncode == 128 + sig and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("llmkd distill: ")]
    assert len(lines) == 1, stderr
    m = re.fullmatch(rf"llmkd distill: interrupted by {sig.name} at step (\d+); checkpoint: (\S+); "
                     rf"resume: llmkd distill {re.escape(str(cfg))} --set resume_from_checkpoint=true", lines[0])
    assert m, lines[0]
    step = int(m[1])
    assert 3 <= step < MAX_STEPS and m[2] == str(out / f"checkpoint-{step}")
    assert checkpoint_problem(m[2]) is None and not (out / "model.safetensors").exists()
    assert_same_weights(resume(tiny_pair, out, save_strategy="no"), reference)


def test_a_second_signal_stops_at_once():
    from llmkd.training.interrupt import StopOnSignal, TrainingInterrupted

    before = signal.getsignal(signal.SIGINT)
    stop = StopOnSignal()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)    # the first: only recorded (training would save)
        time.sleep(0.01)
        assert stop.signum == signal.SIGINT
        with pytest.raises(TrainingInterrupted, match="stopped at once by a second SIGINT") as err:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert err.value.exit_code == 130 and err.value.checkpoint is None
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before
