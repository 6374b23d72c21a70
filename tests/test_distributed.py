"""Real 2-process runs on CPU over gloo: DDP (through launch/torchrun.sh and `llmkd distill`),
DeepSpeed ZeRO-2 with grad accumulation, ZeRO-3 (live teacher sharded by trl's
`prepare_deepspeed`), ZeRO-3 + CPU offload with a student derived from the teacher.

Every run uses the same shipped YAML (`configs/distill/zero3_example.yaml`) with `--set`
overrides, trains 3 optimizer steps with plain SGD on 4 examples (each step sees the whole
dataset, so data order cannot matter), saves, and the saved student is loaded with
`from_pretrained`. With SGD the update is the gradient itself, so a 2-process run with
per_device_train_batch_size=2 must give the same weights as 1 process with batch size 4: that
checks the trainer's token normalisation across ranks (num_items_in_batch gathered over ranks,
loss x num_processes against DDP's / DeepSpeed's gradient averaging).

The first DeepSpeed run JIT-compiles ops into TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions):
shm_comm (~1-2 min) and, for the offload test, cpu_adam (~2 min): ~6 min in all. Once cached
the file takes 1.5 minutes on 2 cores.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install llmkd[cpu] or [gpu])")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "distill" / "zero3_example.yaml"
WORKER = ROOT / "tests" / "dist_worker.py"
FIRST_RUN_TIMEOUT = 900      # includes DeepSpeed's one-time JIT builds
ATOL = 1e-5


def common_overrides(tiny_pair: tuple[str, str], out: Path, per_device_bs: int, ga: int = 1) -> list[str]:
    teacher, student = tiny_pair
    sets = {
        "output_dir": str(out), "overwrite_output_dir": "true",
        "model.teacher": teacher, "model.student": student,
        "data.num_train": 4, "data.num_eval": 4,
        "max_steps": 3, "per_device_train_batch_size": per_device_bs, "gradient_accumulation_steps": ga,
        "optim": "sgd", "learning_rate": 1.0, "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant", "warmup_steps": 0,
        "logging_steps": 1, "save_strategy": '"no"',   # YAML reads a bare no as false
        "seed": 0, "disable_tqdm": "true",
    }
    return [f"{k}={v}" for k, v in sets.items()]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, **extra)
    e.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return e


def run(cmd: list[str], timeout: int, log: Path, **extra_env: str) -> None:
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), stdout=fh, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-60:])
        pytest.fail(f"{' '.join(cmd[:8])} ... exited {proc.returncode}; log tail:\n{tail}")


def torchrun_worker(tiny_pair, out: Path, *sets: str, nproc: int = 2, per_device_bs: int = 2, ga: int = 1,
                    timeout: int = FIRST_RUN_TIMEOUT) -> dict:
    """tests/dist_worker.py on `nproc` local processes (torchrun --standalone, gloo)."""
    info = out.parent / f"{out.name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(nproc), str(WORKER), str(CONFIG), "--info", str(info)]
    for s in (*common_overrides(tiny_pair, out, per_device_bs, ga), "use_cpu=true", *sets):
        cmd += ["--set", s]
    run(cmd, timeout, out.parent / f"{out.name}.log")
    return json.loads(info.read_text())


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_trained(saved: dict, initial: dict) -> None:
    assert saved.keys() == initial.keys()
    moved = max((saved[k] - initial[k]).abs().max().item() for k in saved)
    assert moved > 1e-3, f"the saved student equals the initial one (max change {moved})"


def assert_matches(saved: dict, losses: list[float], reference: dict, atol: float = ATOL) -> None:
    """Same weights and the same logged loss per step as the 1-process run."""
    for k, ref in reference["weights"].items():
        torch.testing.assert_close(saved[k], ref, atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert losses == pytest.approx(reference["losses"], rel=1e-4), (losses, reference["losses"])


@pytest.fixture(scope="module")
def initial(tiny_pair) -> dict:
    return weights(tiny_pair[1])


@pytest.fixture(scope="module")
def reference(tiny_pair, tmp_path_factory) -> dict:
    """1 process, per_device_train_batch_size=4: the weights (and logged per-step losses) every
    2 x 2 run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    info = out.parent / "run.json"
    cmd = [sys.executable, str(WORKER), str(CONFIG), "--info", str(info)]
    for s in (*common_overrides(tiny_pair, out, 4), "use_cpu=true", "deepspeed=null"):
        cmd += ["--set", s]
    run(cmd, 300, out.parent / "run.log")
    record = json.loads(info.read_text())
    assert record["world_size"] == 1 and len(record["losses"]) == 3
    return {"weights": weights(out), "losses": record["losses"]}


def test_ddp_two_processes_match_one_process(tiny_pair, tmp_path, initial, reference):
    """launch/torchrun.sh + `llmkd distill` (the user's path), DDP over gloo, no DeepSpeed."""
    out = tmp_path / "ddp"
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(CONFIG)]
    for s in (*common_overrides(tiny_pair, out, 2), "deepspeed=null"):
        cmd += ["--set", s]
    run(cmd, 300, tmp_path / "ddp.log", NPROC="2", DEVICE="cpu", PYTHON=sys.executable)
    log = (tmp_path / "ddp.log").read_text()
    assert "--nproc_per_node 2" in log and "use_cpu=true" in log
    saved = weights(out)
    assert_trained(saved, initial)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert_matches(saved, [h["loss"] for h in history if "loss" in h], reference)
    assert (out / "training_args.json").exists() and not (out / "training_args.bin").exists()


@needs_deepspeed
def test_zero2_two_processes_grad_accumulation(tiny_pair, tmp_path, initial, reference):
    """2 processes x batch 1 x 2 accumulation steps = the same 4 examples per optimizer step."""
    info = torchrun_worker(tiny_pair, tmp_path / "z2", "deepspeed=configs/deepspeed/zero2.json",
                           per_device_bs=1, ga=2)
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert info["deepspeed"] and info["zero_stage"] == 2
    assert not info["teacher_sharded"] and not info["teacher_requires_grad"]   # replicated, frozen
    assert info["teacher_local_numel"] == info["teacher_full_numel"]
    assert info["global_step"] == 3
    saved = weights(tmp_path / "z2")
    assert_trained(saved, initial)
    assert_matches(saved, info["losses"], reference)


@needs_deepspeed
def test_zero2_bf16_casts_the_frozen_teacher(tiny_pair, tmp_path, initial):
    """DeepSpeed has no autocast: under `bf16: true` a float32 teacher would keep its forward and
    the loss's lm_head matmuls in float32 beside the bf16 student."""
    info = torchrun_worker(tiny_pair, tmp_path / "z2bf16", "deepspeed=configs/deepspeed/zero2.json",
                           "bf16=true", nproc=1, per_device_bs=2, ga=1)
    assert info["zero_stage"] == 2 and info["teacher_dtype"] == "torch.bfloat16"
    assert all(math.isfinite(x) for x in info["losses"])
    assert_trained(weights(tmp_path / "z2bf16"), initial)


@needs_deepspeed
def test_zero3_live_teacher_sharded(tiny_pair, tmp_path, initial, reference):
    """The YAML's own deepspeed: configs/deepspeed/zero3.json; the teacher goes through trl's
    prepare_deepspeed and holds only its shard of the parameters on each rank."""
    info = torchrun_worker(tiny_pair, tmp_path / "z3")
    assert info["world_size"] == 2 and info["deepspeed"] and info["zero_stage"] == 3
    assert info["teacher_type"] == "DeepSpeedEngine" and info["teacher_is_method_teacher"]
    assert info["teacher_sharded"] and not info["teacher_requires_grad"]
    # each rank holds about half of the teacher (shards are padded to equal sizes)
    assert info["teacher_local_numel"] <= info["teacher_full_numel"] // 2 + 1024
    assert info["global_step"] == 3
    saved = weights(tmp_path / "z3")      # one consolidated safetensors file
    assert_trained(saved, initial)
    assert_matches(saved, info["losses"], reference)


@needs_deepspeed
def test_zero3_cpu_offload_derived_student(tiny_pair, tmp_path):
    """ZeRO-3 with optimizer and parameters offloaded (DeepSpeed's own AdamW: cpu_adam), and the
    student derived from the teacher (model.student unset), which must gather the teacher's
    ZeRO-3 partitions to copy its layers."""
    from llmkd.models.student import derive_student

    info = torchrun_worker(tiny_pair, tmp_path / "z3o", "deepspeed=configs/deepspeed/zero3_offload.json",
                           "model.student=null", "model.student_layers=1",
                           "optim=adamw_torch", "learning_rate=1e-2")
    assert info["world_size"] == 2 and info["zero_stage"] == 3 and info["teacher_sharded"]
    assert info["global_step"] == 3 and all(loss == loss for loss in info["losses"])   # no NaN
    derived = derive_student(AutoModelForCausalLM.from_pretrained(tiny_pair[0]), 1)
    initial = {k: v.detach().clone() for k, v in derived.state_dict().items()}
    saved = weights(tmp_path / "z3o")
    assert_trained(saved, initial)


@needs_deepspeed
def test_zero3_on_policy_sampling(tiny_pair, tmp_path, initial):
    """On-policy KD under ZeRO-3: the student's partitioned parameters are gathered for
    generate, and both ranks draw the same response source each micro-batch (a disagreement
    would deadlock the collective gather)."""
    info = torchrun_worker(tiny_pair, tmp_path / "z3op", "method.lmbda=1.0", "method.max_new_tokens=6",
                           "optim=adamw_torch", "learning_rate=1e-3", timeout=600)
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    assert info["global_step"] == 3 and all(loss == loss for loss in info["losses"])
    assert info["on_policy"] and all(v == 1.0 for v in info["on_policy"])
    assert_trained(weights(tmp_path / "z3op"), initial)
