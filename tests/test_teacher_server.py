"""A served teacher (`model.teacher_server`): a real vLLM OpenAI server on the embedded SmolLM2
teacher, started once for the module by `llmkd serve-teacher` on 127.0.0.1 (a free port) and
stopped at the end. Its top-k equals the teacher's own log_softmax, training against it lowers the
KD loss, and a server that dies mid-run gives bounded retries, a clear error, and an intact
checkpoint. The kill test runs last: it takes the module's server down."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from helpers import free_port, start_teacher_server, stop_server  # noqa: E402

from llmkd.teacher_server import ServedTeacher, TeacherServerError, check_teacher_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = 25                       # more than vLLM's default max_logprobs (20)


@pytest.fixture(scope="module")
def teacher_dir() -> Path:
    from llmkd.models.embedded import embedded_teacher_dir

    return embedded_teacher_dir()


@pytest.fixture(scope="module")
def server(tmp_path_factory, teacher_dir):
    """(url, process) of `llmkd serve-teacher` for a config naming the embedded teacher."""
    tmp = tmp_path_factory.mktemp("served")
    url = f"http://127.0.0.1:{free_port()}"
    config = tmp / "distill.yaml"
    config.write_text(json.dumps({"model": {"teacher": "embedded", "teacher_server": url, "teacher_topk": K},
                                  "data": {"recipe": "arithmetic", "max_length": 256}}))
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp / "vllm_cache"), "OMP_NUM_THREADS": "1"}
    proc = start_teacher_server(config, url, tmp / "server.log", env, REPO)
    try:
        yield url, proc
    finally:
        stop_server(proc)


def _batch(tokenizer, pairs: list[tuple[str, str]]):
    """Right-padded (input_ids, attention_mask, labels): chat prompt + response, labels on the response."""
    rows = []
    for q, a in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p, r))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(p) + len(r)] = 1
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
    return ids, mask, labels


def test_config_checks_need_no_server():
    with pytest.raises(ValueError, match="model.teacher_server='teacher:8000' is not an http"):
        check_teacher_server("teacher:8000", 20)
    with pytest.raises(ValueError, match="model.teacher_topk=0"):
        check_teacher_server("http://127.0.0.1:8000", 0)


def test_served_topk_equals_the_teachers_log_softmax(server, teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkd.models.tiny import tiny_tokenizer

    url, _ = server
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    client = ServedTeacher(url, K)
    client.check_tokenizer(tok)
    with pytest.raises(ValueError, match=f"teacher at model.teacher_server={url} tokenizes differently"):
        client.check_tokenizer(tiny_tokenizer())
    ids, mask, labels = _batch(tok, [("What is 3 + 4?", "3 + 4 = 7."),
                                     ("Name a colour.", "Blue is a colour that many people like."),
                                     ("Say hi.", "Hi!")])
    got_ids, got_lp = client.submit(ids, mask, labels).result()
    assert got_ids.shape == got_lp.shape == (*ids.shape, K)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)
    label_pos = labels != -100
    for i, j in label_pos.nonzero().tolist():    # position j holds the distribution of token j
        ref = logp[i, j - 1]
        assert torch.allclose(got_lp[i, j].double(), ref.topk(K).values, atol=1e-4)
        assert torch.allclose(got_lp[i, j].double(), ref[got_ids[i, j]], atol=1e-4)
        assert (got_lp[i, j][:-1] >= got_lp[i, j][1:]).all()
    # elsewhere: the collator's neutral filler, masked out by the loss
    assert (got_ids[~label_pos] == 0).all()
    assert torch.allclose(got_lp[~label_pos], torch.full_like(got_lp[~label_pos], -math.log(K)))
    client.close()


def _tiny_student(teacher_dir: Path, out: Path) -> Path:
    """A 1-layer random Llama on the teacher's tokenizer (49,152 tokens): a cheap student."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llmkd.models.tiny import tiny_config

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    torch.manual_seed(0)
    cfg = tiny_config(len(tok), layers=1, hidden=64)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _config(url: str, student_dir: Path, out: Path, method_cfg: dict, **over):
    from llmkd.training.config import config_from_dict

    return config_from_dict({
        "output_dir": str(out), "max_steps": 12, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
        "use_cpu": True, "save_strategy": "no", "seed": 0, "disable_tqdm": True, "logging_steps": 1,
        "report_to": "none", "lr_scheduler_type": "constant",
        "model": {"teacher": "embedded", "student": str(student_dir), "teacher_server": url,
                  "teacher_topk": K},
        "data": {"recipe": "arithmetic", "num_train": 24, "num_eval": 8, "max_length": 256},
        "method": method_cfg, **over})


def _trainer(url: str, student_dir: Path, out: Path, *, retries: int = 5, **over):
    """A trainer built by hand, to give the client short retries (no teacher model)."""
    from llmkd.models.student import load_causal_lm
    from llmkd.training.pipeline import build_datasets, load_tokenizer
    from llmkd.training.trainer import DistillationTrainer, build_method

    method_cfg = {"name": "token_kd", "kind": "fkl", **over.pop("method", {})}
    cfg = _config(url, student_dir, out, method_cfg, **over)
    tok = load_tokenizer(str(student_dir))
    params = {k: v for k, v in method_cfg.items() if k != "name"}
    from llmkd.teachers.served import Served

    method = build_method("token_kd", params, tok)
    teacher = Served(ServedTeacher(url, K, retries=retries, backoff=0.2))
    train, evals = build_datasets(cfg, method)
    return DistillationTrainer(model=load_causal_lm(student_dir), args=cfg, teacher=teacher, method=method,
                               processing_class=tok, train_dataset=train, eval_dataset=evals)


def test_training_with_the_served_teacher_lowers_the_kd_loss(server, teacher_dir, tmp_path):
    url, _ = server
    student = _tiny_student(teacher_dir, tmp_path / "student")
    from llmkd.training.pipeline import build_trainer

    # the user's path (config -> build_trainer: no teacher model loaded); half the batches are the
    # student's own samples, scored by the server (on-policy)
    trainer = build_trainer(_config(url, student, tmp_path / "run",
                                    {"name": "token_kd", "kind": "fkl", "lmbda": 0.5, "max_new_tokens": 8}))
    assert trainer.teacher is None and trainer.method.source.kind == "served"
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.7 * before, (before, after)
    sources = [h["on_policy"] for h in trainer.state.log_history if "on_policy" in h]
    assert 0 < sum(sources) < len(sources), sources


def test_a_served_and_a_live_teacher_in_one_run(server, teacher_dir, tmp_path):
    """model.teachers: one served (this module's server), one live (a tiny model on the same
    tokenizer). A mixed batch's loss = each method's loss on its own rows; an on-policy run scores
    each sample by its source's teacher."""
    from llmkd.training.config import config_from_dict
    from llmkd.models.head import forward_head
    from llmkd.training.pipeline import build_trainer

    url, _ = server
    student = _tiny_student(teacher_dir, tmp_path / "student")
    live = _tiny_student(teacher_dir, tmp_path / "live")

    def cfg(out, **method):
        return config_from_dict({
            "output_dir": str(out), "max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
            "use_cpu": True, "save_strategy": "no", "seed": 0, "disable_tqdm": True, "logging_steps": 1,
            "report_to": "none",
            "model": {"student": str(student), "teachers": {"served": {"teacher_server": url, "teacher_topk": K},
                                                            "live": {"teacher": str(live)}}},
            "data": {"max_length": 256, "mixture": [
                {"recipe": "arithmetic", "num_train": 8, "num_eval": 4, "teacher": "served"},
                {"recipe": "arithmetic", "num_train": 8, "num_eval": 4, "seed": 1, "teacher": "live"}]},
            "method": {"name": "token_kd", "kind": "fkl", "chunk_size": 0, **method}})

    trainer = build_trainer(cfg(tmp_path / "run"))
    methods = trainer.method.methods
    assert methods["served"].source.kind == "served" and methods["live"].source.kind == "live"
    rows = [trainer.train_dataset[i] for i in (0, 8, 1, 9)]
    batch = trainer.data_collator(rows)
    n = trainer.method.count_items(batch)
    model = trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
        total = 0.0
        for name, m in methods.items():
            sub = m.collate([{k: v for k, v in r.items() if k != "teacher" and v is not None}
                             for r in rows if r["teacher"] == name])
            total += float(m.loss(forward_head(model, sub, hidden=False), m.teacher_targets(sub), sub, n)[0])
    assert float(loss) == pytest.approx(total, rel=1e-5)
    on_policy = build_trainer(cfg(tmp_path / "op", lmbda=1.0, max_new_tokens=6))
    on_policy.train()
    logged = {k: v for h in on_policy.state.log_history for k, v in h.items()}
    assert logged["on_policy"] == 1.0 and {"kd_served", "kd_live", "rows_served", "rows_live"} <= set(logged)


def test_the_readmes_served_config_runs_through_the_cli(server, teacher_dir, tmp_path):
    """`model: {student: DIR, teacher_server: URL}` and no model.teacher: the server is the
    teacher (its tokenizer is checked against the student's); the URL may end in /v1."""
    import yaml

    url, _ = server
    student = _tiny_student(teacher_dir, tmp_path / "student")
    cfg = {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 2,
           "use_cpu": True, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
           "model": {"student": str(student), "teacher_server": url + "/v1", "teacher_topk": K},
           "data": {"recipe": "arithmetic", "num_train": 4, "num_eval": 2, "max_length": 256},
           "method": {"name": "token_kd", "kind": "jsd", "beta": 0.5}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "llmkd.cli", "distill", str(tmp_path / "cfg.yaml")], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert "eval_loss" in proc.stdout


def test_server_killed_mid_run_retries_then_fails_clearly_keeping_the_checkpoint(server, teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainerCallback

    from llmkd.training.checkpoint import find_checkpoint

    url, proc = server
    student = _tiny_student(teacher_dir, tmp_path / "student")
    out = tmp_path / "run"
    trainer = _trainer(url, student, out, retries=2, save_strategy="steps", save_steps=2, max_steps=20)

    class KillServer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                stop_server(proc)

    trainer.add_callback(KillServer())
    with pytest.raises(TeacherServerError, match=f"teacher server {url} did not answer /v1/completions "
                                                 "after 3 attempts"):
        trainer.train()
    assert trainer.state.global_step == 3
    newest, skipped = find_checkpoint(out)
    assert newest == out / "checkpoint-2" and not skipped
    restored = AutoModelForCausalLM.from_pretrained(newest)
    assert restored.config.vocab_size == trainer.model.config.vocab_size
