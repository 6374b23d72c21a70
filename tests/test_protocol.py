"""The method protocol and the trainer's side of it: a toy method written here trains through
DistillationTrainer with no trainer edit; regressions for sampling, padded vocabularies, metric
scaling, sampled-length limits and exact token normalisation of sampled windows."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationConfig

from llmkd import methods
from llmkd.methods.base import HeadOutput, Method, MethodParams
from llmkd.models.head import run_head
from llmkd.training.pipeline import build_trainer, load_tokenizer
from llmkd.generation.sampling import HFSampler
from llmkd.generation.spec import SamplingSpec

from helpers import tiny_config


def make_cfg(tiny_pair, out: Path, **over: Any):
    return tiny_config(tiny_pair, out, **({"learning_rate": 1e-3, "method": {"name": "token_kd"}} | over))


# -- a toy method: its own features, batch key, targets, state ------------------------------------
@dataclass
class ArgmaxParams(MethodParams):
    weight_long: float = 2.0        # rows with a longer prompt count this much more


@dataclass
class ArgmaxTargets:
    ids: torch.Tensor               # the teacher's argmax next token per position


class ArgmaxKD(Method):
    """CE of the student on the teacher's greedy next token, rows weighted by a feature."""

    name = "argmax_kd"
    Params = ArgmaxParams

    def __init__(self, params: ArgmaxParams) -> None:
        super().__init__(params)
        self.steps: list[tuple[int, float]] = []

    def features(self, rows, *, response, max_length):
        feats = super().features(rows, response=response, max_length=max_length)
        median = sorted(feats["prompt_len"])[len(feats) // 2]
        return feats.map(lambda r: {"row_weight": self.params.weight_long if r["prompt_len"] > median else 1.0})

    def collate(self, rows):
        batch = super().collate(rows)
        batch["row_weight"] = torch.tensor([r["row_weight"] for r in rows])
        return batch

    def teacher_targets(self, batch):
        return ArgmaxTargets(ids=run_head(self.teacher, batch, hidden=False, vocab=self.vocab_size).logits.argmax(-1))

    def count_items(self, batch):
        mask = batch["labels"][:, 1:] != -100
        return float((mask * batch["row_weight"][:, None]).sum())

    def loss(self, student: HeadOutput, targets: ArgmaxTargets, batch, num_items):
        mask = (batch["labels"][:, 1:] != -100).float() * batch["row_weight"][:, None]
        ce = F.cross_entropy(student.logits[:, :-1].flatten(0, 1), targets.ids[:, :-1].flatten(),
                             reduction="none").view_as(mask)
        total = (ce * mask).sum()
        denom = num_items if num_items is not None else mask.sum()
        return total / denom, {"argmax_ce": float(total / mask.sum())}

    def on_step_end(self, step, step_loss):
        self.steps.append((step, step_loss))

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = [tuple(s) for s in state["steps"]]


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "argmax_kd", f"{__name__}:ArgmaxKD")
    monkeypatch.setitem(methods.PARAMS, "argmax_kd", f"{__name__}:ArgmaxParams")


def test_toy_method_trains_without_trainer_edits(tiny_pair, tmp_path, toy_method):
    cfg = make_cfg(tiny_pair, tmp_path / "run", max_steps=12, learning_rate=3e-3, gradient_accumulation_steps=2,
                   per_device_train_batch_size=2, method={"name": "argmax_kd", "weight_long": 3.0},
                   save_strategy="steps", save_steps=6)
    trainer = build_trainer(cfg)
    assert set(trainer.train_dataset["row_weight"]) == {1.0, 3.0}
    trainer.train()
    m = trainer.method
    # on_step_end after each optimizer step, with the step's loss = the Trainer's logged loss
    assert [s for s, _ in m.steps] == list(range(1, 13))
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([v for _, v in m.steps], abs=2e-4)
    ce = [h["argmax_ce"] for h in trainer.state.log_history if "argmax_ce" in h]
    assert ce[-1] < 0.8 * ce[0]
    # method state travels with the checkpoint
    resumed = build_trainer(make_cfg(tiny_pair, tmp_path / "run", max_steps=12, learning_rate=3e-3,
                                     gradient_accumulation_steps=2, per_device_train_batch_size=2,
                                     method={"name": "argmax_kd", "weight_long": 3.0}, save_strategy="steps",
                                     save_steps=6,
                                     resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6")))
    resumed.train()
    assert [s for s, _ in resumed.method.steps] == list(range(1, 13))
    assert [v for _, v in resumed.method.steps[:6]] == pytest.approx([v for _, v in m.steps[:6]])


# -- bug regressions ------------------------------------------------------------------------------
def test_sampler_ignores_the_checkpoint_generation_config(tiny_pair):
    """A checkpoint that ships top_k=1 (greedy-like) and a repetition penalty must not narrow
    on-policy samples: first tokens follow the student's own softmax."""
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[1]).eval()
    with torch.no_grad():                 # a peaked next-token distribution (support ~ tens of tokens)
        model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config = GenerationConfig(top_k=1, repetition_penalty=5.0, do_sample=True)
    prompt = [5, 6, 7]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
    n = 2000
    out = HFSampler(0).sample(model, [prompt] * n, SamplingSpec(max_new_tokens=1, seed=0), eos_ids={10**9})
    freq = torch.bincount(torch.tensor([r[0] for r in out]), minlength=probs.numel()).float() / n
    top = probs.topk(10).indices                         # 10 likeliest tokens + one bin for the rest
    binned = lambda d: torch.cat([d[top], (1 - d[top].sum()).reshape(1)])  # noqa: E731
    assert probs.max() < 0.7                             # top_k=1 would put all samples on one token
    assert 0.5 * (binned(freq) - binned(probs)).abs().sum() < 0.06   # TVD to the student's softmax


def test_padded_vocab_same_tokenizer_trains_on_shared_rows(tiny_pair, tmp_path):
    """Same tokenizer, teacher with extra padded rows (Qwen2.5 7B vs 0.5B): accepted, and the
    KD compares the shared len(tokenizer) rows only."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    tok = load_tokenizer(tiny_pair[0])
    teacher.resize_token_embeddings(len(tok) + 64, mean_resizing=False)
    with torch.no_grad():
        teacher.get_output_embeddings().weight[len(tok):] = 5.0     # padded rows would dominate
    padded = tmp_path / "padded"
    teacher.save_pretrained(padded)
    tok.save_pretrained(padded)
    trainer = build_trainer(make_cfg((str(padded), tiny_pair[1]), tmp_path / "run", max_steps=2))
    assert trainer.method.vocab_size == len(tok)
    trainer.train()
    kd = [h["kd"] for h in trainer.state.log_history if "kd" in h]
    assert kd and all(0 < v < 20 for v in kd)


def test_logged_metrics_are_plain_means(tiny_pair, tmp_path, toy_method):
    """A method's metric is logged as the mean it is, whatever the accumulation: at lr 0 the
    toy's per-token CE of step 1 is the same at GA 1 and GA 4 (it was logged x GA before)."""
    def first(ga: int, name: str) -> dict[str, float]:
        trainer = build_trainer(make_cfg(tiny_pair, tmp_path / name, max_steps=1, learning_rate=0.0,
                                         per_device_train_batch_size=8 // ga, gradient_accumulation_steps=ga,
                                         method={"name": name}))
        trainer.train()
        return next(h for h in trainer.state.log_history if "loss" in h)

    one, four = first(1, "argmax_kd"), first(4, "argmax_kd")
    assert four["argmax_ce"] == pytest.approx(one["argmax_ce"], rel=0.2)
    kd = first(4, "token_kd")
    assert kd["kd"] == pytest.approx(kd["loss"], rel=0.2)


def test_sampled_rows_respect_max_length(tiny_pair, tmp_path):
    cfg = make_cfg(tiny_pair, tmp_path / "run", max_steps=1, method={"name": "token_kd", "lmbda": 1.0,
                                                                      "max_new_tokens": 200},
                   data={"recipe": "arithmetic", "num_train": 8, "num_eval": 4, "max_length": 80})
    trainer = build_trainer(cfg)
    batches, count = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1, trainer.args.device)
    assert batches[0]["_source"] == "student"
    assert batches[0]["input_ids"].shape[1] <= 80
    assert int(count) == int((batches[0]["labels"][:, 1:] != -100).sum())


def test_on_policy_grad_accumulation_matches_one_big_batch(tiny_pair, tmp_path):
    """Sampled windows are counted after sampling: 1 x 8 and 4 x 2 give the same update when the
    samples are the same (near-greedy sampling makes them so)."""
    def one_step(bs: int, ga: int, name: str) -> dict[str, torch.Tensor]:
        cfg = make_cfg(tiny_pair, tmp_path / name, max_steps=1, per_device_train_batch_size=bs,
                       gradient_accumulation_steps=ga, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                       lr_scheduler_type="constant", data={"recipe": "arithmetic", "num_train": 8, "num_eval": 4},
                       method={"name": "token_kd", "lmbda": 1.0, "max_new_tokens": 6, "gen_temperature": 1e-4,
                               "chunk_size": 0})
        trainer = build_trainer(cfg)
        trainer.train()
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    a, b = one_step(8, 1, "a"), one_step(2, 4, "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_offline_shards_from_another_tokenizer_are_refused(tiny_pair, tmp_path):
    """Generated shards carry the teacher's token ids: a student with another tokenizer fails
    before training, naming both tokenizers."""
    import json

    from llmkd.data.collate import tokenizer_fingerprint
    from llmkd.training.pipeline import check_generated_tokenizer

    tok = load_tokenizer(tiny_pair[1])
    gen = tmp_path / "gen"
    gen.mkdir()
    other = {"size": len(tok) + 1, "sha": "0" * 64}
    (gen / "manifest.json").write_text(json.dumps({"metadata": {"teacher": {"tokenizer": other}}}))
    with pytest.raises(ValueError, match=rf"tokenizer of {len(tok) + 1} tokens.*student's has {len(tok)}"):
        check_generated_tokenizer(gen, tok)
    ours = tokenizer_fingerprint(tok)
    (gen / "manifest.json").write_text(json.dumps({"metadata": {"teacher": {"tokenizer": ours}}}))
    check_generated_tokenizer(gen, tok)      # the same tokenizer passes


def test_gradient_checkpointing_teacher_is_gone(tiny_pair, tmp_path):
    """The key did nothing (the teacher runs without grad); it is now an unknown key."""
    with pytest.raises(ValueError, match="gradient_checkpointing_teacher"):
        make_cfg(tiny_pair, tmp_path / "run", model={"teacher": tiny_pair[0], "student": tiny_pair[1],
                                                       "gradient_checkpointing_teacher": True})


def test_lora_student_keeps_its_generation_config(tiny_pair, tmp_path):
    """On-policy sampling swaps in its own config only while it samples: a LoRA student's base
    model keeps the checkpoint's generation settings (merge-and-save must not inherit ours)."""
    cfg = make_cfg(tiny_pair, tmp_path / "run", max_steps=1,
                   model={"teacher": tiny_pair[0], "student": tiny_pair[1], "lora": {"r": 4}},
                   method={"name": "token_kd", "lmbda": 1.0, "max_new_tokens": 4})
    trainer = build_trainer(cfg)
    base = trainer.model.get_base_model()
    base.generation_config.top_k, base.generation_config.repetition_penalty = 20, 1.3
    trainer.train()
    gc = trainer.model.get_base_model().generation_config
    assert (gc.top_k, gc.repetition_penalty) == (20, 1.3)
    assert "generation_config" not in trainer.model.__dict__


def test_on_train_begin_gives_the_run_length(tiny_pair, tmp_path):
    """TAID with total_steps 0 takes the run's max_steps from the protocol: its linear floor
    reaches t_end exactly at the last step."""
    trainer = build_trainer(make_cfg(tiny_pair, tmp_path / "run", max_steps=3,
                                     method={"name": "taid", "total_steps": 0}))
    trainer.train()
    assert trainer.method.schedule.total_steps == 3
    ts = [h["taid_t"] for h in trainer.state.log_history if "taid_t" in h]
    assert len(ts) == 3 and ts[0] == pytest.approx(0.4)          # the t each step trained with
    assert ts[1] >= 0.6 - 1e-9 and ts[2] >= 0.8 - 1e-9 and trainer.method.t == pytest.approx(1.0)
