"""Failures during a run end with one line and keep the newest good checkpoint: a full disk (a
real, tiny tmpfs), a loss that turns non-finite, SIGTERM while the models load, damaged or
foreign checkpoints on resume, and a resume whose training config changed."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmkd.training.checkpoint import STAGING, RunFailed, checkpoint_problem, find_checkpoint
from llmkd.cli import main
from llmkd.training.config import config_from_dict
from llmkd.training.pipeline import build_trainer


def run_config(tiny_pair, out: Path, **over) -> dict:
    return {"output_dir": str(out), "use_cpu": True, "max_steps": 4, "learning_rate": 1e-3,
            "per_device_train_batch_size": 4, "save_strategy": "steps", "save_steps": 2, "seed": 0,
            "logging_steps": 1, "disable_tqdm": True, "report_to": "none",
            "model": {"teacher": tiny_pair[0], "student": tiny_pair[1]},
            "data": {"recipe": "arithmetic", "num_train": 16, "num_eval": 4},
            "method": {"name": "token_kd", "kind": "fkl"}, **over}


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def distill_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("llmkd distill: ")]


# -- disk full -------------------------------------------------------------------------------------
def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -r -m and tmpfs (user namespaces)")
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tiny_pair, tmp_path):
    """A real full file system: a 1.4 MB tmpfs holds checkpoint-2 (~0.95 MB) but not checkpoint-4."""
    disk = tmp_path / "disk"
    disk.mkdir()
    cfg = write_config(tmp_path / "cfg.yaml", run_config(tiny_pair, disk / "run"))
    copy = tmp_path / "after"
    script = (f"mount -t tmpfs -o size=1400k tmpfs {disk} && "
              f"{sys.executable} -m llmkd.cli distill {cfg}; rc=$?; cp -a {disk}/run {copy}; exit $rc")
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True,
                          timeout=600, env=child_env())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = distill_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert f"disk full while saving checkpoint-4 in {disk / 'run'}" in lines[0], lines[0]
    assert "MB are free" in lines[0] and f"still {disk / 'run' / 'checkpoint-2'}" in lines[0], lines[0]
    found, skipped = find_checkpoint(copy)
    assert found == copy / "checkpoint-2" and skipped == [] and not (copy / STAGING).exists()


# -- non-finite loss ---------------------------------------------------------------------------------
def test_a_loss_turning_non_finite_stops_with_one_line_keeping_the_good_checkpoint(tiny_pair, tmp_path, capsys):
    """lr 1e36 is finite (config accepts it): step 1's update sends the weights to ~1e37 (saved:
    still finite), step 2's forward overflows. The run stops at step 2, saving nothing of it."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run_config(tiny_pair, out, learning_rate=1e36, save_steps=1,
                                                         max_grad_norm=0.0, lr_scheduler_type="constant"))
    assert main(["distill", str(cfg)]) == 1
    lines = distill_lines(capsys.readouterr().err)
    assert len(lines) == 1 and re.match(r"llmkd distill: error: step 2: the (loss|gradient norm) is nan; "
                                        "training stopped without saving this step", lines[0]), lines
    assert f"the newest good checkpoint is {out / 'checkpoint-1'}" in lines[0]
    assert sorted(d.name for d in out.iterdir() if d.name.startswith("checkpoint-")) == ["checkpoint-1"]
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-1" / "model.safetensors").values())
    assert not (out / "model.safetensors").exists()


def test_weights_overflowing_in_an_update_are_never_saved(tiny_pair, tmp_path):
    """lr 1e39 overflows float32 in step 1's update: its loss and gradient are finite, the weights
    are not; the save of step 1 is refused."""
    out = tmp_path / "run"
    trainer = build_trainer(config_from_dict(run_config(tiny_pair, out, learning_rate=1e39, save_steps=1,
                                                        lr_scheduler_type="constant")))
    with pytest.raises(RunFailed, match=r"step 1: the updated weights are not finite; training stopped "
                                        r"without saving this step; no checkpoint was saved"):
        trainer.train()
    assert find_checkpoint(out)[0] is None


# -- SIGTERM while the models load -------------------------------------------------------------------
STARTUP_RUNNER = r"""
import sys, time
import llmkd.training.pipeline as pipeline
load = pipeline._load_teacher          # the first weights that load
def slow(*args, **kwargs):
    open(sys.argv[1], "w").close()
    time.sleep(600)
    return load(*args, **kwargs)
pipeline._load_teacher = slow
from llmkd.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_while_models_load_is_one_line_and_exit_143(tiny_pair, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run_config(tiny_pair, out))
    marker = tmp_path / "loading"
    child = subprocess.Popen([sys.executable, "-c", STARTUP_RUNNER, str(marker), "distill", str(cfg)],
                             stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        err = child.communicate(timeout=120)[1]
    finally:
        child.kill()
    assert child.returncode == 143 and "Traceback" not in err, err
    assert distill_lines(err) == [f"llmkd distill: interrupted by SIGTERM before training started; "
                                  f"nothing to resume in {out}"], err
    assert not out.exists()      # it created output_dir and saved nothing: removed


# -- damaged / foreign checkpoints, changed config ----------------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(tiny_pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpts") / "run"
    build_trainer(config_from_dict(run_config(tiny_pair, out))).train()
    assert find_checkpoint(out)[0] == out / "checkpoint-4"
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_resume_true_falls_back_past_a_checkpoint_that_does_not_load(tiny_pair, two_checkpoints, tmp_path, capsys):
    out = _copy(two_checkpoints, tmp_path / "run")
    with zipfile.ZipFile(out / "checkpoint-4" / "optimizer.pt", "w") as z:   # a zip torch cannot read
        z.writestr("archive/data.pkl", b"not a pickle")
    assert checkpoint_problem(out / "checkpoint-4") is None                 # headers alone look fine
    trainer = build_trainer(config_from_dict(run_config(tiny_pair, out, max_steps=5, resume_from_checkpoint=True)))
    trainer.train()
    err = capsys.readouterr().err
    assert f"skipped incomplete {out / 'checkpoint-4'} ({out / 'checkpoint-4' / 'optimizer.pt'} cannot be loaded" in err
    assert f"resuming from {out / 'checkpoint-2'}" in err and trainer.state.global_step == 5


def test_a_checkpoint_of_another_model_is_named(tiny_pair, two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path / "run")
    ckpt = out / "checkpoint-4"
    shutil.copy(Path(tiny_pair[0]) / "model.safetensors", ckpt / "model.safetensors")   # the teacher's
    trainer = build_trainer(config_from_dict(run_config(tiny_pair, out, max_steps=5, resume_from_checkpoint=str(ckpt))))
    with pytest.raises(ValueError, match=rf"{ckpt / 'model.safetensors'} holds .*: the checkpoint belongs to another model"):
        trainer.train()


def test_resume_with_a_changed_config_needs_allow_config_change(tiny_pair, two_checkpoints, tmp_path, capsys):
    out = _copy(two_checkpoints, tmp_path / "run")
    changed = run_config(tiny_pair, out, max_steps=5, resume_from_checkpoint=True, learning_rate=2e-3,
                         method={"name": "token_kd", "kind": "rkl"})
    with pytest.raises(ValueError, match=r"changed training config \(learning_rate: 0.001 -> 0.002; "
                                         r"method.params.kind: 'fkl' -> 'rkl'\).*allow_config_change=true"):
        config_from_dict(changed)
    config_from_dict({**changed, "allow_config_change": True})
    assert "with a changed training config: learning_rate: 0.001 -> 0.002; method.params.kind" in capsys.readouterr().err
    config_from_dict(run_config(tiny_pair, out, max_steps=8, save_steps=4, resume_from_checkpoint=True))  # length, saving: free



def test_overwrite_accepts_an_earlier_runs_output_from_python_too(tiny_pair, two_checkpoints, tmp_path):
    """A run started from Python (as the quickstart does) marks its output_dir as well, so a rerun
    with overwrite_output_dir works; the same directory plus a foreign file still does not."""
    from llmkd.training.outdir import MARKER

    assert (two_checkpoints / MARKER).is_file()
    out = _copy(two_checkpoints, tmp_path / "run")
    assert config_from_dict(run_config(tiny_pair, out, overwrite_output_dir=True)).overwrite_output_dir
    (out / MARKER).unlink()
    with pytest.raises(FileExistsError, match="holds files no llmkd run wrote"):
        config_from_dict(run_config(tiny_pair, out, overwrite_output_dir=True))


def test_allowed_config_change_trains_with_the_new_learning_rate_and_weight_decay(tiny_pair, two_checkpoints,
                                                                                 tmp_path):
    """The checkpoint's optimizer and scheduler state carry the old learning rate and weight decay;
    with allow_config_change the resumed steps use the new ones, on the schedule at its step."""
    from transformers import TrainerCallback

    class Seen(TrainerCallback):
        groups: list[tuple[int, float, float]] = []

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            g = optimizer.param_groups[0]
            self.groups.append((state.global_step, g["lr"], g["weight_decay"]))

    out = _copy(two_checkpoints, tmp_path / "run")
    shutil.rmtree(out / "checkpoint-4")
    trainer = build_trainer(config_from_dict(run_config(
        tiny_pair, out, resume_from_checkpoint=True, allow_config_change=True, learning_rate=5e-3,
        weight_decay=0.1)))
    trainer.add_callback(Seen())
    trainer.train()
    # linear decay over 4 steps from the new 5e-3: 2.5e-3 before step 3, 1.25e-3 before step 4
    assert [(s, round(lr, 9), wd) for s, lr, wd in Seen.groups] == [(2, 2.5e-3, 0.1), (3, 1.25e-3, 0.1)]
