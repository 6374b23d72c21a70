"""Served hidden-state targets (`model.teacher_targets: hidden`): `llmkd serve-teacher` starts
vLLM's pooling runner on the tiny teacher (real vLLM, 127.0.0.1, a free port) and writes the
teacher's head to `model.teacher_head`; the loss from the served states + that head equals the
live teacher's loss (values and gradients) to float32 tolerance. Bad input -- no head file, a
head of another vocabulary, a server started for top-k -- fails in one line naming the fix.
A second server (top-k) is started beside it for that last case and the reverse one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("vllm")

from helpers import free_port, start_teacher_server, stop_server  # noqa: E402

from llmkd.teacher_server import ServedTeacher, TeacherServerError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _model(teacher: str, url: str, **keys) -> dict:
    return {"teacher": teacher, "teacher_server": url, **keys}


@pytest.fixture(scope="module")
def servers(tiny_pair, tmp_path_factory):
    """{"hidden": url, "topk": url}: `llmkd serve-teacher` for the tiny teacher, one per targets
    kind, started together; plus the head file the hidden one wrote."""
    tmp = tmp_path_factory.mktemp("served_hidden")
    head = tmp / "teacher_head.safetensors"
    procs, urls = {}, {}
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp / "vllm_cache"), "OMP_NUM_THREADS": "1"}
    try:
        for kind, keys in (("hidden", {"teacher_targets": "hidden", "teacher_head": str(head)}), ("topk", {})):
            urls[kind] = f"http://127.0.0.1:{free_port()}"
            config = tmp / f"{kind}.yaml"
            config.write_text(yaml.safe_dump({"model": _model(tiny_pair[0], urls[kind], **keys),
                                              "data": {"max_length": 128}}))
            procs[kind] = start_teacher_server(config, urls[kind], tmp / f"{kind}.log", env, REPO)
        yield {**urls, "head": head}
    finally:
        for proc in procs.values():
            stop_server(proc)


def _config(tiny_pair, url: str, head, out: Path, kind: str = "fkl", **model):
    from llmkd.training.config import config_from_dict

    return config_from_dict({
        "output_dir": str(out), "max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
        "use_cpu": True, "save_strategy": "no", "seed": 0, "disable_tqdm": True, "report_to": "none",
        "model": {"student": tiny_pair[1], "teacher_server": url, "teacher_targets": "hidden",
                  "teacher_head": str(head), **model},
        "data": {"recipe": "arithmetic", "num_train": 8, "num_eval": 4, "max_length": 128},
        "method": {"name": "token_kd", "kind": kind, "chunk_size": 7}})


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_served_hidden_loss_equals_the_live_teachers(servers, tiny_pair, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    from llmkd.methods.base import TeacherTargets
    from llmkd.models.head import forward_head, run_head
    from llmkd.training.pipeline import build_trainer

    trainer = build_trainer(_config(tiny_pair, servers["hidden"], servers["head"], tmp_path / "run", kind))
    method = trainer.method
    assert method.source.kind == "served" and method.wants_hidden()     # chunked: no full logits
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["attention_mask"] == 0).any()                        # rows of different lengths
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    student = trainer.model.train()
    out = []
    for targets in (method.teacher_targets(batch), TeacherTargets(output=run_head(teacher, batch, hidden=True))):
        loss, _ = method.loss(forward_head(student, batch, hidden=True), targets, batch, None)
        out.append((loss, torch.autograd.grad(loss, [student.get_output_embeddings().weight])[0]))
    (served, g_served), (live, g_live) = out
    assert float(live.detach()) > 1e-3
    torch.testing.assert_close(served, live, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_served, g_live, rtol=1e-4, atol=1e-6 * float(g_live.abs().max()))
    trainer.train()                                                     # the whole step runs on it
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_serve_teacher_starts_the_pooling_runner_and_writes_the_head(servers, tiny_pair, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from llmkd.cli.serve import main
    from llmkd.generation.hidden import read_head

    head, _ = read_head(servers["head"], 512)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    assert torch.equal(head.weight, teacher.get_output_embeddings().weight.detach())
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": _model(
        tiny_pair[0], "http://127.0.0.1:8000", teacher_targets="hidden", teacher_head=str(tmp_path / "h"))}))
    assert main([str(tmp_path / "cfg.yaml"), "--dry-run"]) == 0
    argv = capsys.readouterr().out.split()
    assert argv[argv.index("--runner") + 1] == "pooling" and "--max-logprobs" not in argv
    assert not (tmp_path / "h").exists()           # a dry run writes nothing


def test_config_errors_need_no_server(tiny_pair, tmp_path):
    url, head = "http://127.0.0.1:9", tmp_path / "h.safetensors"
    with pytest.raises(ValueError, match=r"model.teacher_targets=hidden needs model.teacher_head"):
        _config(tiny_pair, url, head, tmp_path / "o", teacher_head=None)
    with pytest.raises(ValueError, match=r"model.teacher_targets='logits' is unknown; use topk"):
        _config(tiny_pair, url, head, tmp_path / "o", teacher_targets="logits")
    with pytest.raises(ValueError, match=r"teacher_targets / model.teacher_head apply to a served teacher"):
        _config(tiny_pair, url, head, tmp_path / "o", teacher_server=None, teacher=tiny_pair[0])


def test_missing_head_file_fails_in_one_line_before_training(servers, tiny_pair, tmp_path):
    """Through the CLI: exit 2, one line naming the key and the command that writes the file."""
    cfg = {"output_dir": str(tmp_path / "out"), "use_cpu": True, "max_steps": 1, "report_to": "none",
           "model": {"student": tiny_pair[1], "teacher_server": servers["hidden"], "teacher_targets": "hidden",
                     "teacher_head": str(tmp_path / "nowhere.safetensors")},
           "data": {"recipe": "arithmetic", "num_train": 4, "num_eval": 2}, "method": {"name": "token_kd"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "llmkd.cli", "distill", str(tmp_path / "cfg.yaml")], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llmkd distill: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model.teacher_head=" in errors[0] and "llmkd serve-teacher CONFIG" in errors[0], errors[0]
    assert not (tmp_path / "out").exists()


def test_head_of_another_vocabulary_fails_in_one_line(servers, tiny_pair, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmkd.training.pipeline import build_trainer

    with safe_open(str(servers["head"]), framework="pt") as f:
        weight, meta = f.get_tensor("weight"), f.metadata()
    bad = tmp_path / "head.safetensors"
    save_file({"weight": weight[:-12]}, str(bad), metadata={**meta, "vocab": str(weight.shape[0] - 12)})
    with pytest.raises(ValueError, match=r"the teacher head covers a vocabulary of 500 tokens \(500 rows\) but "
                                         r"the student's tokenizer has 512; .*use a student with the teacher's"):
        build_trainer(_config(tiny_pair, servers["hidden"], bad, tmp_path / "run"))


def test_server_in_the_wrong_mode_fails_in_one_line(servers, tiny_pair, tmp_path):
    """A top-k server asked for hidden states, and a pooling server asked for top-k: each says how
    to start the server (or set the config) instead."""
    from llmkd.training.pipeline import build_trainer

    with pytest.raises(TeacherServerError, match=r"refused /pooling \(HTTP 404.*start it with `llmkd serve-teacher "
                                                 r"CONFIG --set model.teacher_targets=hidden`"):
        build_trainer(_config(tiny_pair, servers["topk"], servers["head"], tmp_path / "run"))
    client = ServedTeacher(servers["hidden"], 5, retries=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(TeacherServerError, match=r"serves hidden states \(vLLM's pooling runner\), not log-probs: "
                                                 r"set model.teacher_targets=hidden"):
        client.submit(ids, torch.ones_like(ids), ids).result()
    client.close()


def test_wire_format_is_raw_states(servers, tiny_pair):
    """The client decodes vLLM's base64 states to what the teacher computes (float32 exact)."""
    from transformers import AutoModelForCausalLM

    from llmkd.training.pipeline import load_tokenizer

    tok = load_tokenizer(tiny_pair[0])
    ids = tok("Calculate 12 + 3. Reply with just the number. 15", add_special_tokens=False)["input_ids"]
    client = ServedTeacher(servers["hidden"], 20, targets="hidden")
    got = client._hidden_rows([ids, ids[:5]], 30.0)
    client.close()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    with torch.no_grad():
        want = teacher(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], want[:5], rtol=0, atol=1e-5)
