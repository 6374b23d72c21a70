"""DistillationTrainer on tiny models: learning, grad accumulation, resume, on-policy."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmkd.eval.closeness import teacher_closeness
from llmkd.training.pipeline import build_trainer

from helpers import StopAt, tiny_config


def make_cfg(tiny_pair, out: Path, **over):
    method = {"name": "token_kd", **over.pop("method", {})}
    return tiny_config(tiny_pair, out, method=method, **({"max_steps": 120, "per_device_train_batch_size": 8,
                                                          "logging_steps": 1000,
                                                          "data": {"recipe": "arithmetic", "num_train": 128,
                                                                   "num_eval": 32}} | over))


def held_out_kl(trainer) -> float:
    return teacher_closeness(trainer.model, trainer.teacher, trainer.eval_dataset, trainer.data_collator)["kl"]


@pytest.mark.parametrize("method", [
    {"kind": "fkl"}, {"kind": "rkl"}, {"kind": "jsd", "beta": 0.5}, {"kind": "tvd"},
    {"kind": "fkl", "chunk_size": 0},
    {"kind": "jsd", "lmbda": 1.0, "max_new_tokens": 12},
    {"kind": "fkl", "seq_kd": True, "max_new_tokens": 12},
], ids=["fkl", "rkl", "jsd", "tvd", "fkl-full-logits", "on-policy", "seq-kd"])
def test_token_kd_halves_held_out_kl(tiny_pair, tmp_path, method):
    trainer = build_trainer(make_cfg(tiny_pair, tmp_path / "run", method=method))
    before = held_out_kl(trainer)
    trainer.train()
    after = held_out_kl(trainer)
    assert after <= 0.5 * before, (before, after)
    if method.get("lmbda"):
        on_policy = [h["on_policy"] for h in trainer.state.log_history if "on_policy" in h]
        assert on_policy and all(v == 1.0 for v in on_policy)
        sample_s = [h["sample_s"] for h in trainer.state.log_history if "on_policy" in h]
        assert len(sample_s) == len(on_policy) and all(0 < v < 60 for v in sample_s)


def _one_step_weights(tiny_pair, out: Path, bs: int, ga: int, **over) -> dict[str, torch.Tensor]:
    cfg = make_cfg(tiny_pair, out, max_steps=1, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                   optim="sgd", learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant",
                   data={"recipe": "arithmetic", "num_train": 8, "num_eval": 4}, **over)
    trainer = build_trainer(cfg)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer


@pytest.mark.parametrize("chunk", [0, 1024])
def test_grad_accumulation_matches_one_big_batch(tiny_pair, tmp_path, chunk):
    """1 x 8 and 4 x 2 give the same update (SGD lr=1: the update *is* the gradient)."""
    w1, t1 = _one_step_weights(tiny_pair, tmp_path / "a", 8, 1, method={"chunk_size": chunk})
    w2, t2 = _one_step_weights(tiny_pair, tmp_path / "b", 2, 4, method={"chunk_size": chunk})
    from llmkd.models.student import load_causal_lm

    w0 = load_causal_lm(tiny_pair[1]).state_dict()
    moved = False
    for k in w1:
        torch.testing.assert_close(w1[k] - w0[k], w2[k] - w0[k], atol=1e-5, rtol=1e-4)
        moved |= bool((w1[k] - w0[k]).abs().max() > 1e-4)
    assert moved
    l1 = t1.state.log_history[-1]["train_loss"]
    l2 = t2.state.log_history[-1]["train_loss"]
    assert abs(l1 - l2) < 1e-5


@pytest.mark.parametrize("method", [{"kind": "fkl"}, {"kind": "jsd", "lmbda": 0.5, "max_new_tokens": 8}],
                         ids=["off-policy", "on-policy"])
def test_resume_gives_same_final_weights(tiny_pair, tmp_path, method):
    over = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-3,
                per_device_train_batch_size=4, data={"recipe": "arithmetic", "num_train": 16, "num_eval": 4},
                method=method)
    full = build_trainer(make_cfg(tiny_pair, tmp_path / "full", **over))
    full.train()
    ref = {k: v.clone() for k, v in full.model.state_dict().items()}
    # a second run that stops at step 3 (interrupted), then resumes from its checkpoint
    part = build_trainer(make_cfg(tiny_pair, tmp_path / "part", **over))
    part.add_callback(StopAt(3))
    part.train()
    assert (tmp_path / "part" / "checkpoint-3" / "llmkd_method_state.json").exists()
    resumed = build_trainer(make_cfg(tiny_pair, tmp_path / "part", **over,
                                     resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3")))
    resumed.train()
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=1e-5)


def test_saved_student_is_safetensors_and_reloads(tiny_pair, tmp_path):
    trainer = build_trainer(make_cfg(tiny_pair, tmp_path / "run", max_steps=2))
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert weights and not list((tmp_path / "run").glob("*.bin"))


def test_lora_student_trains_adapter_only(tiny_pair, tmp_path):
    cfg = make_cfg(tiny_pair, tmp_path / "run", max_steps=30,
                   model={"teacher": tiny_pair[0], "student": tiny_pair[1], "lora": {"r": 8, "lora_alpha": 16}})
    trainer = build_trainer(cfg)
    base = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora" not in k}
    before = held_out_kl(trainer)
    trainer.train()
    assert held_out_kl(trainer) < before
    for k, v in trainer.model.named_parameters():
        if "lora" not in k:
            assert torch.equal(v, base[k]), k
    trainer.save_model(str(tmp_path / "run"))
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_bf16_mixed_precision_runs_the_teacher_in_bf16_too(tiny_pair, tmp_path):
    """`bf16: true` autocasts the student's forward (accelerate) and must reach the teacher's too,
    or a GPU run pays a float32 teacher beside a bf16 student."""
    cfg = make_cfg(tiny_pair, tmp_path / "run", max_steps=1, bf16=True,
                   data={"recipe": "arithmetic", "num_train": 8, "num_eval": 4})
    trainer = build_trainer(cfg)
    seen = {}
    for name, model in (("teacher", trainer.teacher), ("student", trainer.model)):
        proj = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
        proj.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, out.dtype) and None)
    trainer.train()
    assert seen == {"teacher": torch.bfloat16, "student": torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.teacher.parameters())   # weights untouched
