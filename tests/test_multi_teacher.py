"""Several teachers, one student (model.teachers + data.mixture + method.teacher_mix): routed
loss and gradient = the sum of single-teacher losses on their rows; `mean` = KL to the weighted
mixture computed by hand in float64; grad accumulation with mixed teachers; the teacher manifest
of a checkpoint on resume; an offloaded teacher."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkd.training.config import config_from_dict
from llmkd.training.pipeline import build_trainer

from helpers import StopAt
from test_cross_tokenizer import xtok  # noqa: F401  (the fixture: a student on a new tokenizer)


@pytest.fixture(scope="module")
def second_teacher(tiny_pair, tmp_path_factory) -> str:
    """Another tiny teacher on the same tokenizer, with different weights (peakier)."""
    from transformers import AutoTokenizer

    from llmkd.models.tiny import tiny_model

    out = tmp_path_factory.mktemp("teacher2")
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    tiny_model(tok, layers=2, std=0.1, seed=7).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def multi_cfg(tiny_pair, second, out: Path, *, mix: str = "route", weights=(1.0, 1.0), method=None,
              offload: bool = False, **over):
    raw = {"output_dir": str(out), "max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
           "logging_steps": 1, "use_cpu": True, "save_strategy": "no", "seed": 0, "disable_tqdm": True,
           "model": {"student": tiny_pair[1], "teachers": {
               "math": {"teacher": tiny_pair[0], "weight": weights[0]},
               "logic": {"teacher": second, "weight": weights[1], **({"offload": "cpu"} if offload else {})}}},
           "data": {"mixture": [{"recipe": "arithmetic", "num_train": 8, "num_eval": 4, "teacher": "math"},
                                {"recipe": "arithmetic", "num_train": 8, "num_eval": 4, "seed": 1,
                                 "teacher": "logic"}]},
           "method": {"name": "token_kd", "kind": "fkl", "teacher_mix": mix, **(method or {})}} | over
    return config_from_dict(raw)


def _single(tiny_pair, teacher_dir: str, student):
    """A plain one-teacher token_kd method (no mixture code) on a given teacher."""
    from llmkd.models.student import load_causal_lm
    from llmkd.training.pipeline import load_tokenizer
    from llmkd.training.trainer import build_method

    method = build_method("token_kd", {"kind": "fkl"}, load_tokenizer(tiny_pair[1]))
    method.attach(load_causal_lm(teacher_dir), student, chunked_head_ok=True)
    return method


@pytest.mark.parametrize("chunk", [0, 1024])
def test_routed_loss_and_grad_are_the_sum_of_single_teacher_losses(tiny_pair, second_teacher, tmp_path, chunk):
    from llmkd.models.head import forward_head

    trainer = build_trainer(multi_cfg(tiny_pair, second_teacher, tmp_path / "run", offload=True,
                                      method={"chunk_size": chunk}))
    ds = trainer.train_dataset
    rows = [ds[i] for i in (0, 8, 1, 9, 10, 2)]
    assert [r["teacher"] for r in rows] == ["math", "logic", "math", "logic", "logic", "math"]
    batch = trainer.data_collator(rows)
    student = trainer.model.train()
    n = trainer.method.count_items(batch)
    student.zero_grad()
    loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=n)
    loss.backward()
    routed_grad = {k: p.grad.clone() for k, p in student.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics.items()}

    student.zero_grad()
    total = 0.0
    for name, teacher_dir in (("math", tiny_pair[0]), ("logic", second_teacher)):
        idx = (batch["teacher"] == trainer.method.index[name]).nonzero().flatten()
        sub = {k: v[idx] for k, v in batch.items() if k != "teacher"}
        single = _single(tiny_pair, teacher_dir, student)
        part = single.loss(forward_head(student, sub, hidden=False), single.teacher_targets(sub), sub, n)[0]
        part.backward()
        total += float(part.detach())
        own = single.loss(forward_head(student, sub, hidden=False), single.teacher_targets(sub), sub, None)[0]
        assert metrics[f"kd_{name}"] == pytest.approx(float(own), rel=1e-4)
        assert metrics[f"rows_{name}"] == 3
    assert float(loss) == pytest.approx(total, rel=1e-5)
    for k, p in student.named_parameters():
        torch.testing.assert_close(routed_grad[k], p.grad, rtol=1e-4, atol=1e-7)


def test_mean_is_kl_to_the_weighted_mixture_by_hand_in_float64(tiny_pair, second_teacher, tmp_path):
    from llmkd.models.student import load_causal_lm

    trainer = build_trainer(multi_cfg(tiny_pair, second_teacher, tmp_path / "run", mix="mean", weights=(1.0, 3.0)))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 9, 3)])
    student = trainer.model.train()
    n = trainer.method.count_items(batch)
    loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=n)

    def logits(model):
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()

    p = (0.25 * logits(load_causal_lm(tiny_pair[0])).softmax(-1)
         + 0.75 * logits(load_causal_lm(second_teacher)).softmax(-1))
    log_q = logits(student).log_softmax(-1)
    mask = batch["labels"][:, 1:] != -100
    kl = (p * (p.log() - log_q)).sum(-1)[:, :-1][mask].sum() / mask.sum()
    assert float(loss.detach()) == pytest.approx(float(kl), rel=1e-4)


def _one_step(tiny_pair, second, out, bs, ga):
    cfg = multi_cfg(tiny_pair, second, out, max_steps=1, per_device_train_batch_size=bs,
                    gradient_accumulation_steps=ga, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                    lr_scheduler_type="constant", logging_steps=1000)
    trainer = build_trainer(cfg)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_grad_accumulation_with_mixed_teachers_matches_one_batch(tiny_pair, second_teacher, tmp_path):
    """1 x 4 and 4 x 1 (micro-batches of one teacher each, windows mixing both) give one update."""
    a = _one_step(tiny_pair, second_teacher, tmp_path / "a", 4, 1)
    b = _one_step(tiny_pair, second_teacher, tmp_path / "b", 1, 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_resume_checks_the_teacher_manifest_and_continues_exactly(tiny_pair, second_teacher, tmp_path):
    from safetensors.torch import load_file

    from llmkd.training.teachers import MANIFEST

    save = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1000)
    full = build_trainer(multi_cfg(tiny_pair, second_teacher, tmp_path / "full", **save))
    full.train()
    cut = build_trainer(multi_cfg(tiny_pair, second_teacher, tmp_path / "cut", **save))
    cut.add_callback(StopAt(2))
    cut.train()
    manifest = (tmp_path / "cut" / "checkpoint-2" / MANIFEST).read_text()
    assert '"math"' in manifest and '"logic"' in manifest and '"tokenizer"' in manifest
    with pytest.raises(ValueError, match=r"another teacher set \(logic\.model .* -> .*\)"):
        multi_cfg(tiny_pair, tiny_pair[0], tmp_path / "cut", resume_from_checkpoint=True, **save)
    resumed = build_trainer(multi_cfg(tiny_pair, second_teacher, tmp_path / "cut", resume_from_checkpoint=True,
                                      **save))
    resumed.train()
    a = load_file(tmp_path / "full" / "checkpoint-4" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoint-4" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_resume_refuses_a_served_teacher_with_other_targets(tmp_path):
    """The manifest records a served teacher's targets (top-k and its k, or hidden states and a
    hash of the head file): resuming a top-20 run against hidden states or top-50, or a hidden
    run with another head, is named; a manifest written before these keys existed still resumes."""
    from types import SimpleNamespace

    from llmkd.training.teachers import MANIFEST, check_resume_teachers, teacher_manifest

    def model(**keys):
        return SimpleNamespace(teachers={"chat": {"teacher_server": "http://127.0.0.1:8000", **keys}})

    head_a, head_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    head_a.write_bytes(b"head a")
    head_b.write_bytes(b"head b")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    topk20 = teacher_manifest(model())
    assert topk20["chat"]["targets"] == "top-20" and topk20["chat"]["head"] is None
    (ckpt / MANIFEST).write_text(json.dumps(topk20))
    check_resume_teachers(ckpt, model())
    with pytest.raises(ValueError, match=r"chat\.targets 'top-20' -> 'hidden'"):
        check_resume_teachers(ckpt, model(teacher_targets="hidden", teacher_head=str(head_a)))
    with pytest.raises(ValueError, match=r"chat\.targets 'top-20' -> 'top-50'"):
        check_resume_teachers(ckpt, model(teacher_topk=50))
    (ckpt / MANIFEST).write_text(json.dumps(teacher_manifest(model(teacher_targets="hidden",
                                                                    teacher_head=str(head_a)))))
    check_resume_teachers(ckpt, model(teacher_targets="hidden", teacher_head=str(head_a)))
    with pytest.raises(ValueError, match=r"chat\.head '[0-9a-f]+' -> '[0-9a-f]+'"):
        check_resume_teachers(ckpt, model(teacher_targets="hidden", teacher_head=str(head_b)))
    old = {"chat": {k: v for k, v in topk20["chat"].items() if k not in ("targets", "head")}}
    (ckpt / MANIFEST).write_text(json.dumps(old))
    check_resume_teachers(ckpt, model(teacher_targets="hidden", teacher_head=str(head_a)))


def test_per_teacher_eval_and_training_logs(tiny_pair, second_teacher, tmp_path):
    trainer = build_trainer(multi_cfg(tiny_pair, second_teacher, tmp_path / "run"))
    trainer.train()
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"kd", "kd_math", "kd_logic", "rows_math", "rows_logic"} <= logged
    ev = trainer.evaluate()
    assert {"eval_math_loss", "eval_logic_loss", "eval_kd_math", "eval_kd_logic"} <= set(ev)


def test_one_teacher_is_the_one_element_case(tiny_pair, tmp_path):
    """model.teacher and model.teachers with one entry build the same plain method (no mixture
    code, no teacher column) and the same loss on the same batch."""
    from llmkd.methods.token_kd import TokenKD

    base = {"output_dir": str(tmp_path), "max_steps": 1, "use_cpu": True, "save_strategy": "no", "seed": 0,
            "disable_tqdm": True, "data": {"recipe": "arithmetic", "num_train": 8, "num_eval": 4},
            "method": {"name": "token_kd", "kind": "fkl"}}
    one = build_trainer(config_from_dict(base | {"model": {"student": tiny_pair[1], "teacher": tiny_pair[0]}}))
    named = build_trainer(config_from_dict(base | {"model": {"student": tiny_pair[1], "student_from": None,
                                                             "teachers": {"math": {"teacher": tiny_pair[0]}}}}))
    losses = []
    for trainer in (one, named):
        assert type(trainer.method) is TokenKD and "teacher" not in trainer.train_dataset.column_names
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        n = trainer.method.count_items(batch)
        losses.append(float(trainer.compute_loss(trainer.model.train(), batch, num_items_in_batch=n).detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_on_policy_each_sample_is_scored_by_its_sources_teacher(tiny_pair, second_teacher, tmp_path):
    from llmkd.models.head import forward_head

    trainer = build_trainer(multi_cfg(tiny_pair, second_teacher, tmp_path / "run",
                                      method={"lmbda": 1.0, "max_new_tokens": 6, "chunk_size": 0}))
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in (0, 8, 1, 9)]))
    sampled = trainer._with_responses(dict(batch), 0)
    assert sampled.pop("_source") == "student"
    assert sampled["teacher"].tolist() == batch["teacher"].tolist()
    assert not torch.equal(sampled["labels"][:, -1], batch["labels"][:, -1]) or \
        sampled["input_ids"].shape != batch["input_ids"].shape        # new responses
    student = trainer.model.train()
    n = trainer.method.count_items(sampled)
    loss = trainer.compute_loss(student, dict(sampled), num_items_in_batch=n)
    metrics = {k: v[-1] for k, v in trainer._metrics.items()}
    total = 0.0
    for name, teacher_dir in (("math", tiny_pair[0]), ("logic", second_teacher)):
        idx = (sampled["teacher"] == trainer.method.index[name]).nonzero().flatten()
        sub = {k: sampled[k][idx] for k in ("input_ids", "attention_mask", "labels")}
        single = _single(tiny_pair, teacher_dir, student)
        with torch.no_grad():
            total += float(single.loss(forward_head(student, sub, hidden=False), single.teacher_targets(sub),
                                       sub, n)[0])
            own = single.loss(forward_head(student, sub, hidden=False), single.teacher_targets(sub), sub, None)[0]
        assert metrics[f"kd_{name}"] == pytest.approx(float(own), rel=1e-4)
    assert float(loss.detach()) == pytest.approx(total, rel=1e-5)


@pytest.fixture(scope="module")
def student_tok_teacher(xtok, tmp_path_factory) -> str:
    """A teacher on the (new) student tokenizer of `xtok`: the same-tokenizer one beside the
    cross-tokenizer teacher."""
    from transformers import AutoTokenizer

    from llmkd.models.tiny import tiny_model

    out = tmp_path_factory.mktemp("same")
    tok = AutoTokenizer.from_pretrained(xtok[1])
    tiny_model(tok, layers=2, std=0.1, seed=3).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def cross_cfg(xtok, same_dir: str, out: Path, **method):
    return config_from_dict({
        "output_dir": str(out), "max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
        "logging_steps": 1, "use_cpu": True, "save_strategy": "no", "seed": 0, "disable_tqdm": True,
        "model": {"student": xtok[1], "teachers": {
            "same": {"teacher": same_dir},
            "other": {"teacher": xtok[0], "method": {"name": "cross_tokenizer", "loss": "alm"}}}},
        "data": {"mixture": [{"recipe": "arithmetic", "num_train": 8, "num_eval": 4, "teacher": "same"},
                             {"recipe": "arithmetic", "num_train": 8, "num_eval": 4, "seed": 1, "teacher": "other"}]},
        "method": {"name": "token_kd", "kind": "fkl", **method}})


def test_cross_tokenizer_teacher_beside_a_same_tokenizer_one(xtok, student_tok_teacher, tmp_path):
    """One micro-batch, one backward: token_kd on the same-tokenizer teacher's rows + ALM on the
    other tokenizer's rows = the two methods' losses (and gradients) on their own rows, each
    normalised by the window's items (tokens + chunks)."""
    from llmkd.methods.cross_tokenizer import CrossTokenizer
    from llmkd.models.head import forward_head

    trainer = build_trainer(cross_cfg(xtok, student_tok_teacher, tmp_path / "run"))
    methods = trainer.method.methods
    assert isinstance(methods["other"], CrossTokenizer) and not isinstance(methods["same"], CrossTokenizer)
    rows = [trainer.train_dataset[i] for i in (0, 8, 1, 9)]
    batch = trainer.data_collator(rows)
    assert "other/teacher_input_ids" in batch and "same/teacher_input_ids" not in batch
    own = {name: methods[name].collate([{k: v for k, v in r.items() if k != "teacher" and v is not None}
                                        for r in rows if r["teacher"] == name]) for name in methods}
    n = trainer.method.count_items(batch)
    assert n == sum(methods[name].count_items(own[name]) for name in methods)
    student = trainer.model.train()
    student.zero_grad()
    trainer.compute_loss(student, dict(batch), num_items_in_batch=n).backward()
    mixed_grad = {k: p.grad.clone() for k, p in student.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics.items()}
    assert {"kd_same", "alm_other", "rows_same", "rows_other"} <= set(metrics)
    student.zero_grad()
    for name, sub in own.items():
        m = methods[name]
        m.loss(forward_head(student, sub, hidden=False), m.teacher_targets(sub), sub, n)[0].backward()
    for k, p in student.named_parameters():
        torch.testing.assert_close(mixed_grad[k], p.grad, rtol=1e-4, atol=1e-7)
    on_policy = build_trainer(cross_cfg(xtok, student_tok_teacher, tmp_path / "op", lmbda=1.0, max_new_tokens=6))
    on_policy.train()                   # student samples, re-tokenised for the other teacher
    logged = {k: v for h in on_policy.state.log_history for k, v in h.items()}
    assert logged["on_policy"] == 1.0 and "alm_other" in logged and "kd_same" in logged


def test_a_teacher_of_another_method_samples_like_the_shared_section():
    """A teacher's own method name starts from that method's defaults, but the sampling keys of
    the shared method section still reach it: a step samples once for all its teachers."""
    from llmkd.training.config import MethodSpec
    from llmkd.training.teachers import TeacherSpec, teacher_method

    shared = MethodSpec(name="token_kd", params={"lmbda": 0.5, "max_new_tokens": 9, "kind": "rkl", "seq_kd": False})
    spec = TeacherSpec(teacher="x", method={"name": "cross_tokenizer", "loss": "alm"})
    assert teacher_method(shared, spec) == ("cross_tokenizer", {"lmbda": 0.5, "max_new_tokens": 9, "loss": "alm"})


def test_generate_several_teachers_into_one_dataset_then_train_offline_routed(tiny_pair, second_teacher, tmp_path):
    """`llmkd generate` with a mixture: each source answered by its own teacher into one dataset
    with a `teacher` column (resumable: a rerun generates nothing, a larger source only its new
    prompts); offline multi-teacher training on that dir routes each row to its teacher and its
    top-k are that teacher's."""
    from llmkd.generation.run import GenerationConfig, run_generation
    from llmkd.generation.writer import load_generated, read_manifest

    out = tmp_path / "gen"

    def gen(n_logic: int) -> dict:
        cfg = GenerationConfig(backend="hf", max_model_len=256, max_new_tokens=6, topk=5, output_dir=str(out),
                               shard_size=4, mixture=[
                                   {"teacher": "math", "model": tiny_pair[0], "recipe": "arithmetic", "num_prompts": 6},
                                   {"teacher": "logic", "model": second_teacher, "recipe": "arithmetic",
                                    "num_prompts": n_logic}])
        run_generation(cfg, progress=False)
        return read_manifest(out)["metadata"]

    meta = gen(4)
    assert set(meta["teachers"]) == {"math", "logic"} and meta["prompts"]["generated_this_run"] == 10
    assert gen(4)["prompts"]["generated_this_run"] == 0          # resume: every key on disk
    assert gen(6)["prompts"]["generated_this_run"] == 2          # only logic's two new prompts
    rows = load_generated(out)
    assert sorted(rows["teacher"]).count("math") == 6 and sorted(rows["teacher"]).count("logic") == 6
    stored = {(r["teacher"], r["id"]): r["teacher_topk_ids"] for r in rows}
    assert any(stored[("math", i)] != stored[("logic", i)] for t, i in stored if t == "math")

    cfg = config_from_dict({
        "output_dir": str(tmp_path / "run"), "max_steps": 1, "learning_rate": 1e-2, "per_device_train_batch_size": 8,
        "logging_steps": 1, "use_cpu": True, "save_strategy": "no", "seed": 0, "disable_tqdm": True,
        "model": {"student": tiny_pair[1], "teachers": {"math": {"teacher_mode": "offline"},
                                                        "logic": {"teacher_mode": "offline"}}},
        "data": {"path": str(out), "num_train": 4, "num_eval": 2},
        "method": {"name": "token_kd", "kind": "fkl"}})
    trainer = build_trainer(cfg)
    train = trainer.train_dataset
    assert sorted(train["teacher"]) == ["logic"] * 4 + ["math"] * 4
    for r in train:
        assert r["teacher_topk_ids"] == stored[(r["teacher"], r["id"])]
    trainer.train()
    logged = {k: v for h in trainer.state.log_history for k, v in h.items()}
    assert logged["rows_math"] == 4 and logged["rows_logic"] == 4 and "kd_math" in logged and "kd_logic" in logged


def test_routed_eval_loss_is_the_per_item_mean_over_all_teachers(tiny_pair, second_teacher, tmp_path):
    """In evaluation (no window item count) a batch mixing teachers gives the same loss as in
    training: one per-item mean over all rows, not the sum of each teacher's own mean."""
    trainer = build_trainer(multi_cfg(tiny_pair, second_teacher, tmp_path / "run"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 8, 1, 9, 10)])
    student = trainer.model
    with torch.no_grad():
        train_loss = trainer.compute_loss(student.train(), dict(batch),
                                          num_items_in_batch=trainer.method.count_items(batch))
        eval_loss = trainer.compute_loss(student.eval(), dict(batch))
    assert float(eval_loss) == pytest.approx(float(train_loss), rel=1e-5)
