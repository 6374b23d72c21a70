"""Offline teacher (top-k columns from `llmkd generate`) vs live teacher on the same data."""
from __future__ import annotations

import pytest
import torch

from llmkd.training.config import config_from_dict
from llmkd.generation.run import GenerationConfig, run_generation
from llmkd.training.pipeline import build_trainer


@pytest.fixture(scope="module")
def full_vocab_generation(tiny_pair, tmp_path_factory):
    """Teacher responses with the FULL vocabulary as top-k (k = V), lossless: offline must equal live."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_pair[0]).vocab_size
    out = tmp_path_factory.mktemp("gen") / "full"
    cfg = GenerationConfig(model=tiny_pair[0], backend="hf", recipe="arithmetic", num_prompts=12,
                           max_new_tokens=10, topk=vocab, cache="lossless", output_dir=str(out), shard_size=6)
    return run_generation(cfg, progress=False)


def _trainer(tiny_pair, gen_dir, tmp_path, mode: str, kind: str):
    return build_trainer(config_from_dict({
        "output_dir": str(tmp_path / mode), "use_cpu": True, "max_steps": 1, "report_to": "none",
        "model": {"teacher": tiny_pair[0], "student": tiny_pair[1], "teacher_mode": mode},
        "data": {"path": str(gen_dir), "num_train": 8, "num_eval": 4},
        "method": {"name": "token_kd", "kind": kind}}))


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
def test_offline_full_vocab_equals_live(tiny_pair, full_vocab_generation, tmp_path, kind):
    live = _trainer(tiny_pair, full_vocab_generation, tmp_path, "live", kind)
    offline = _trainer(tiny_pair, full_vocab_generation, tmp_path, "offline", kind)
    assert offline.teacher is None          # the offline trainer never loads the teacher
    rows = [live.train_dataset[i] for i in range(6)]
    batch = live.data_collator(rows)
    assert "teacher_topk_ids" in batch
    losses = []
    for tr in (live, offline):
        tr.model.zero_grad()
        loss = tr.compute_loss(tr.model, dict(batch))
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
        losses.append((loss.item(), grad))
    assert abs(losses[0][0] - losses[1][0]) < 1e-4, losses
    torch.testing.assert_close(losses[0][1], losses[1][1], atol=1e-4, rtol=1e-3)


def test_offline_training_reduces_kl(tiny_pair, tmp_path_factory, tmp_path):
    """Top-20 offline targets (no teacher at train time) still pull the student to the teacher."""
    from llmkd.eval.closeness import teacher_closeness
    from llmkd.models.student import load_causal_lm

    gen = run_generation(GenerationConfig(model=tiny_pair[0], backend="hf", recipe="arithmetic",
                                          num_prompts=64, max_new_tokens=10, topk=20,
                                          output_dir=str(tmp_path / "gen")), progress=False)
    tr = build_trainer(config_from_dict({
        "output_dir": str(tmp_path / "run"), "use_cpu": True, "max_steps": 80, "learning_rate": 3e-3,
        "per_device_train_batch_size": 8, "report_to": "none", "save_strategy": "no",
        "model": {"teacher": tiny_pair[0], "student": tiny_pair[1], "teacher_mode": "offline"},
        "data": {"path": str(gen), "num_train": 56, "num_eval": 8},
        "method": {"name": "token_kd", "kind": "fkl"}}))
    teacher = load_causal_lm(tiny_pair[0])
    before = teacher_closeness(tr.model, teacher, tr.eval_dataset, tr.data_collator)["kl"]
    tr.train()
    after = teacher_closeness(tr.model, teacher, tr.eval_dataset, tr.data_collator)["kl"]
    assert after <= 0.5 * before, (before, after)


def test_generated_rows_split_by_prompt_without_leaks():
    from datasets import Dataset

    from llmkd.training.pipeline import split_by_prompt

    ids = [f"rec-{i}-h{i}" for i in (0, 0, 1, 2, 2, 3, 5, 5, 6)]   # prompt 4 was dropped, n=2 samples
    rows = Dataset.from_dict({"id": ids, "sample": list(range(len(ids)))})
    train, held = split_by_prompt(rows, num_train=3, num_eval=2)
    assert set(train["id"]) == {"rec-0-h0", "rec-1-h1", "rec-2-h2"} and len(train) == 5
    assert set(held["id"]) == {"rec-3-h3", "rec-5-h5"} and len(held) == 3
    train, held = split_by_prompt(rows, num_train=100, num_eval=32, allow_fewer=True)   # last fifth held out
    assert set(held["id"]) == {"rec-6-h6"} and not set(train["id"]) & set(held["id"])
