"""DistillSpec and TAID as methods, through DistillationTrainer on tiny models: learning, on-policy
draft samples, TAID's t (logged, frozen in eval, resumed exactly), LoRA, gradient accumulation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmkd.eval.closeness import teacher_closeness
from llmkd.losses import TAIDSchedule
from llmkd.training.pipeline import build_trainer

from helpers import StopAt, tiny_config


def make_cfg(tiny_pair, out: Path, method: dict[str, Any], **over: Any):
    return tiny_config(tiny_pair, out, method=method, **({"max_steps": 6, "data": {
        "recipe": "arithmetic", "num_train": 32, "num_eval": 8}} | over))


def closeness(trainer) -> dict[str, float]:
    return teacher_closeness(trainer.model, trainer.teacher, trainer.eval_dataset, trainer.data_collator)


def logged(trainer, key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in trainer.state.log_history if key in h]


# -- DistillSpec ------------------------------------------------------------------------------
def test_distillspec_defaults_are_on_policy_tvd(tiny_pair, tmp_path):
    trainer = build_trainer(make_cfg(tiny_pair, tmp_path / "run",
                                     {"name": "distillspec", "max_new_tokens": 10}, max_steps=40))
    p = trainer.method.params
    assert (p.kind, p.lmbda) == ("tvd", 1.0)
    before = closeness(trainer)
    trainer.train()
    after = closeness(trainer)
    assert after["acceptance"] > before["acceptance"] + 0.05, (before, after)
    assert all(v == 1.0 for _, v in logged(trainer, "on_policy"))       # every batch: draft samples
    acc = logged(trainer, "acceptance")
    kd = logged(trainer, "kd")
    assert acc and all(abs(a + k - 1.0) < 1e-9 for (_, a), (_, k) in zip(acc, kd))


def test_distillspec_fraction_and_divergence_configurable(tiny_pair, tmp_path):
    trainer = build_trainer(make_cfg(tiny_pair, tmp_path / "run",
                                     {"name": "distillspec", "lmbda": 0.0, "kind": "jsd", "beta": 0.5}))
    trainer.train()
    assert all(v == 0.0 for _, v in logged(trainer, "on_policy"))
    assert logged(trainer, "kd") and not logged(trainer, "acceptance")   # α = 1 - TVD only for tvd
    with pytest.raises(ValueError, match="method.lmbda"):
        make_cfg(tiny_pair, tmp_path / "bad", {"name": "distillspec", "lmbda": 1.5})


def test_acceptance_is_exact_or_named_an_upper_bound():
    """Live teacher: α = mean Σ min(p, q) exactly. Top-k teacher (offline, served): 1 - TVD on
    k + 1 bins only bounds α from above, and is logged under that name. No response token: no α."""
    from llmkd.methods.base import HeadOutput, TeacherTargets
    from llmkd.methods.distillspec import DistillSpec, DistillSpecParams

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 9, 64, generator=gen), 3 * torch.randn(2, 9, 64, generator=gen)
    labels = torch.randint(0, 64, (2, 9), generator=gen)
    labels[:, :3] = -100
    mask = labels[:, 1:] != -100
    p, q = (x[:, :-1].double().softmax(-1) for x in (teacher, student))
    alpha = float(torch.minimum(p, q).sum(-1)[mask].mean())
    method = DistillSpec(DistillSpecParams())
    _, live = method.loss(HeadOutput(logits=student), TeacherTargets(output=HeadOutput(logits=teacher)),
                          {"labels": labels}, None)
    assert live["acceptance"] == pytest.approx(alpha, abs=1e-6) and "acceptance_upper_bound" not in live
    top = teacher.log_softmax(-1).topk(8, dim=-1)
    _, sparse = method.loss(HeadOutput(logits=student), TeacherTargets(topk_ids=top.indices, topk_logprobs=top.values),
                            {"labels": labels}, None)
    assert "acceptance" not in sparse
    assert sparse["acceptance_upper_bound"] > alpha + 0.02       # the tail bucket hides differences
    _, empty = method.loss(HeadOutput(logits=student), TeacherTargets(output=HeadOutput(logits=teacher)),
                           {"labels": torch.full_like(labels, -100)}, None)
    assert not {"acceptance", "acceptance_upper_bound"} & set(empty)


# -- TAID ---------------------------------------------------------------------------------------
TAID = {"name": "taid", "alpha": 0.05, "beta": 0.9}     # a fast t: visible in a few steps


def test_taid_learns_and_logs_t_from_the_schedule(tiny_pair, tmp_path):
    trainer = build_trainer(make_cfg(tiny_pair, tmp_path / "run", TAID | {"total_steps": 30},
                                     max_steps=30, eval_strategy="steps", eval_steps=10))
    before = closeness(trainer)["kl"]
    trainer.train()
    assert closeness(trainer)["kl"] < 0.7 * before
    ts = logged(trainer, "taid_t")
    losses = [v for _, v in logged(trainer, "loss")]
    assert [s for s, _ in ts] == list(range(1, 31)) and ts[0][1] == 0.4
    # replay the schedule on the logged step losses: t at step k+1 = update after step k
    ref = TAIDSchedule(0.4, 1.0, 0.05, 0.9, total_steps=30)
    for (step, t), loss in zip(ts, losses):
        assert t == pytest.approx(ref.t, abs=1e-6)
        ref.update(loss, step)
    assert ts[-1][1] > 0.4 + 0.6 * 29 / 30 - 1e-9           # at least the linear floor
    # evaluation after step s uses, and does not move, the t that step s+1 then trains with
    evals, by_step = logged(trainer, "eval_taid_t"), dict(ts)
    assert [s for s, _ in evals] == [10, 20, 30]
    assert all(t == by_step.get(s + 1, trainer.method.t) for s, t in evals)
    state = trainer.method.state_dict()
    trainer.evaluate()
    assert trainer.method.state_dict() == state


def test_taid_resume_continues_the_same_t_trajectory(tiny_pair, tmp_path):
    over = dict(max_steps=8, save_strategy="steps", save_steps=4)
    method = TAID | {"alpha": 0.2, "total_steps": 100}     # t driven by the adaptive term
    full = build_trainer(make_cfg(tiny_pair, tmp_path / "full", method, **over))
    full.train()
    part = build_trainer(make_cfg(tiny_pair, tmp_path / "part", method, **over))
    part.add_callback(StopAt(4))
    part.train()
    saved = json.loads((tmp_path / "part" / "checkpoint-4" / "llmkd_method_state.json").read_text())
    assert saved["taid"]["t"] == dict(logged(full, "taid_t"))[5]
    resumed = build_trainer(make_cfg(tiny_pair, tmp_path / "part", method, **over,
                                     resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4")))
    resumed.train()
    ts = logged(resumed, "taid_t")    # steps 1-4 come from the checkpoint's log history
    assert [s for s, _ in ts] == list(range(1, 9)) and ts == logged(full, "taid_t")
    assert ts[-1][1] > 0.4 + 0.6 * 7 / 100 + 0.1
    assert resumed.method.state_dict() == full.method.state_dict()       # bit-identical t, m, L_prev


def test_taid_grad_accumulation_gives_the_same_t(tiny_pair, tmp_path):
    """4 x 1 and 2 x 2 see the same step losses, hence the same t trajectory."""
    states = []
    for bs, ga in [(4, 1), (2, 2)]:
        trainer = build_trainer(make_cfg(tiny_pair, tmp_path / f"run{ga}", TAID | {"total_steps": 4},
                                         max_steps=4, per_device_train_batch_size=bs,
                                         gradient_accumulation_steps=ga, optim="sgd", learning_rate=0.5,
                                         lr_scheduler_type="constant"))
        trainer.train()
        states.append(trainer.method.state_dict()["taid"])
    assert states[0]["t"] > 0.4 + 0.6 / 4
    assert states[1]["t"] == pytest.approx(states[0]["t"], abs=1e-9)
    assert states[1]["prev_loss"] == pytest.approx(states[0]["prev_loss"], rel=1e-5)
    assert states[1]["momentum"] == pytest.approx(states[0]["momentum"], rel=1e-4, abs=1e-9)


def test_taid_with_lora_and_bad_inputs(tiny_pair, tmp_path):
    cfg = make_cfg(tiny_pair, tmp_path / "run", TAID | {"total_steps": 12}, max_steps=12,
                   model={"teacher": tiny_pair[0], "student": tiny_pair[1], "lora": {"r": 8, "lora_alpha": 16}})
    trainer = build_trainer(cfg)
    base = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora" not in k}
    before = closeness(trainer)["kl"]
    trainer.train()
    assert closeness(trainer)["kl"] < before
    assert all(torch.equal(v, base[k]) for k, v in trainer.model.named_parameters() if "lora" not in k)
    assert trainer.method.t > 0.4
    for bad, match in [({"t_start": 1.2}, "method.t_start"), ({"beta": 1.0}, "method.beta"),
                       ({"alpha": -1}, "method.alpha"), ({"total_steps": -3}, "method.total_steps")]:
        with pytest.raises(ValueError, match=match):
            make_cfg(tiny_pair, tmp_path / "bad", {"name": "taid"} | bad)
    with pytest.raises(ValueError, match="teacher_mode=live"):     # p_t needs full teacher logits
        make_cfg(tiny_pair, tmp_path / "bad", {"name": "taid"},
                 model={"teacher": tiny_pair[0], "teacher_mode": "offline"})


# -- two processes ------------------------------------------------------------------------------
WORKER = '''
import json, os, sys
from llmkd.training.config import config_from_dict
from llmkd.training.pipeline import build_trainer, shutdown_distributed
raw = json.loads(sys.argv[1])
trainer = build_trainer(config_from_dict(raw))
trainer.train()
rank = trainer.args.process_index
hist = trainer.state.log_history
out = {"state": trainer.method.state_dict(), "world": trainer.args.world_size,
       "t": [h["taid_t"] for h in hist if "taid_t" in h],
       "local_ce": [h["taid_ce"] for h in hist if "taid_ce" in h]}
with open(os.path.join(raw["output_dir"], f"rank{rank}.json"), "w") as fh:
    json.dump(out, fh)
shutdown_distributed(exit_code=0)
'''


@pytest.mark.slow
@pytest.mark.parametrize("method", [TAID | {"alpha": 0.2, "total_steps": 100},
                                    {"name": "distillspec", "max_new_tokens": 8}], ids=["taid", "distillspec"])
def test_two_processes_keep_taid_t_equal_and_run_distillspec(tiny_pair, tmp_path, method):
    """DDP on 2 CPU processes (gloo): the ranks see different examples (their local losses differ),
    yet t is the same on both, bit for bit, and equals a 1-process run on the same 4-row batches."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    raw = {"output_dir": str(tmp_path / "ddp"), "max_steps": 5, "learning_rate": 3e-3,
           "per_device_train_batch_size": 2, "logging_steps": 1, "use_cpu": True, "save_strategy": "no",
           "seed": 0, "disable_tqdm": True, "report_to": "none",
           "model": {"teacher": tiny_pair[0], "student": tiny_pair[1]},
           "data": {"recipe": "arithmetic", "num_train": 16, "num_eval": 4}, "method": method}
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), json.dumps(raw)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["state"] == ranks[1]["state"]
    if method["name"] != "taid":
        return
    assert ranks[0]["t"] == ranks[1]["t"] and len(ranks[0]["t"]) == 5
    assert ranks[0]["local_ce"] != ranks[1]["local_ce"]          # different data on each rank
    one = build_trainer(make_cfg(tiny_pair, tmp_path / "one", method, max_steps=5,
                                 per_device_train_batch_size=4,
                                 data={"recipe": "arithmetic", "num_train": 16, "num_eval": 4}))
    one.train()
    assert [t for _, t in logged(one, "taid_t")] == pytest.approx(ranks[0]["t"], abs=1e-6)


# -- CLI: the shipped YAMLs, LoRA, gradient accumulation, then the draft measured ---------------
REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--set", "max_steps=3", "--set", "gradient_accumulation_steps=2",
            "--set", "per_device_train_batch_size=2", "--set", "data.num_train=16", "--set", "data.num_eval=4",
            "--set", "save_strategy='no'", "--set", "disable_tqdm=true", "--set", "logging_steps=1"]


def test_cli_taid_with_lora_and_distillspec_then_speculative_eval(tiny_pair, tmp_path):
    from llmkd.cli import main

    teacher = tiny_pair[0]
    taid = tmp_path / "taid"
    assert main(["distill", str(REPO / "configs/distill/taid.yaml"), "--set", f"model.teacher={teacher}",
                 "--set", "model.lora.r=4", "--set", "method.total_steps=3", "--set", f"output_dir={taid}",
                 *TINY_RUN]) == 0
    assert (taid / "adapter_model.safetensors").exists()
    results = json.loads((taid / "eval_results.json").read_text())
    state = json.loads((taid / "trainer_state.json").read_text())
    ts = [h["taid_t"] for h in state["log_history"] if "taid_t" in h]
    assert len(ts) == 3 and ts[0] == 0.4 and results["eval_taid_t"] == 1.0   # floor reaches t_end

    spec = tmp_path / "distillspec"
    assert main(["distill", str(REPO / "configs/distill/distillspec.yaml"), "--set", f"model.teacher={teacher}",
                 "--set", "method.max_new_tokens=8", "--set", f"output_dir={spec}", *TINY_RUN]) == 0
    state = json.loads((spec / "trainer_state.json").read_text())
    assert [h["on_policy"] for h in state["log_history"] if "on_policy" in h] == [1.0, 1.0, 1.0]
    assert main(["eval", "--model", teacher, "--recipes", "arithmetic", "--speculative", str(spec),
                 "--num-examples", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "teacher+distillspec" / "arithmetic" / "metrics.json").read_text())
    assert m["identical_outputs"] == 2 and m["gamma"] == 4


def test_taid_chunked_path_equals_full_logits(tiny_pair, tmp_path):
    """One SGD step (lr 1: the update is the gradient) through the chunked head and through full
    logits gives the same weights; the chunked run never asks the model for full logits."""
    weights = []
    for chunk in (4, 0):
        trainer = build_trainer(make_cfg(tiny_pair, tmp_path / f"c{chunk}", TAID | {"chunk_size": chunk,
                                         "total_steps": 5}, max_steps=1, optim="sgd", learning_rate=1.0,
                                         max_grad_norm=0.0, lr_scheduler_type="constant"))
        assert trainer.method.wants_hidden() == (chunk > 0)
        trainer.train()
        weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=1e-5, rtol=1e-4)
