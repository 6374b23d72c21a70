"""Hidden-state targets (`generate` config `targets: hidden`): the offline loss from stored teacher
hidden states and the stored head equals the live teacher's loss to the storage dtype's tolerance,
on two families (tied Llama; Phi, whose lm_head has a bias); a dir without its head file or with
another vocabulary fails in one line before any weights load."""
from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from llmkd.generation.hidden import COLUMN, HEAD_FILE, check_head, load_head
from llmkd.generation.run import GenerationConfig, run_generation
from llmkd.generation.writer import load_generated
from llmkd.methods.common import kd_divergence
from llmkd.models.head import forward_head, run_head
from llmkd.teachers.offline import Offline
from llmkd.training.pipeline import check_token_ids, load_tokenizer
from llmkd.training.trainer import build_method
from helpers import offline_distill_error


def _phi_pair(root, tokenizer_dir):
    """(teacher_dir, student_dir): random Phi models (lm_head with a non-zero bias), the tiny tokenizer."""
    tok = load_tokenizer(tokenizer_dir)
    dirs = []
    for name, hidden, seed in (("phi_teacher", 64, 1), ("phi_student", 32, 2)):
        config = transformers.PhiConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=hidden // 32, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.2)
        torch.manual_seed(seed)
        model = transformers.PhiForCausalLM(config)
        with torch.no_grad():
            model.lm_head.bias.normal_()
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs


@pytest.fixture(scope="module")
def families(tiny_pair, tmp_path_factory):
    """family -> (teacher dir, student dir, generation dir with targets=hidden)."""
    root = tmp_path_factory.mktemp("hidden")
    out = {}
    for family, (teacher, student) in (("llama", tiny_pair), ("phi", _phi_pair(root, tiny_pair[0]))):
        cfg = GenerationConfig(model=teacher, backend="hf", recipe="arithmetic", num_prompts=6,
                               max_new_tokens=8, temperature=1.0, output_dir=str(root / family),
                               shard_size=3, targets="hidden", hidden_dtype="bfloat16")
        out[family] = (teacher, student, run_generation(cfg, progress=False))
    return out


def _losses(teacher_dir, student_dir, data_dir, kind, ce_weight=0.0):
    """(offline loss, live loss, their student gradients) on one batch of the generated rows."""
    tok = load_tokenizer(student_dir)
    rows = load_generated(data_dir)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir)
    offline = build_method("token_kd", {"kind": kind, "chunk_size": 5, "ce_weight": ce_weight}, tok)
    offline.source = Offline(head=load_head(data_dir, len(tok)))   # what the pipeline builds
    feats = offline.features(rows, response="response", max_length=64)
    batch = offline.collate([feats[i] for i in range(len(feats))])
    chunked = offline.wants_hidden()
    assert chunked == (ce_weight == 0)
    out = []
    for targets in (offline.teacher_targets(batch), None):
        if targets is None:   # the live teacher on the same batch
            targets = type(offline.teacher_targets(batch))(output=run_head(teacher, batch, hidden=True))
        s = forward_head(student, batch, hidden=chunked)
        assert (s.logits is None) == chunked and targets.output.logits is None  # stored: hidden always
        loss = kd_divergence(s, targets, batch["labels"], offline.params, None)
        out.append((loss, torch.autograd.grad(loss, [student.get_output_embeddings().weight])[0]))
    return out


@pytest.mark.parametrize("family,kind,ce_weight", [
    ("llama", "fkl", 0.0), ("llama", "rkl", 0.0), ("phi", "fkl", 0.0), ("phi", "rkl", 0.0),
    ("phi", "jsd", 0.5)])   # ce_weight > 0: the student's full logits against the stored head's
def test_offline_hidden_loss_equals_the_live_teachers(families, family, kind, ce_weight):
    teacher, student, data = families[family]
    (off, g_off), (live, g_live) = _losses(teacher, student, data, kind, ce_weight)
    assert float(live.detach()) > 1e-3
    # bfloat16 keeps 8 bits of mantissa: ~0.4 % per state, averaged over the vocabulary
    torch.testing.assert_close(off, live, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(g_off, g_live, rtol=5e-2, atol=5e-3 * float(g_live.abs().max()))


def test_hidden_dir_layout_and_what_it_refuses(families):
    teacher, _, data = families["phi"]
    rows = load_generated(data)
    assert COLUMN in rows.column_names and "teacher_topk_ids" not in rows.column_names
    row = rows[0]
    assert len(row[COLUMN]) == len(row["response_token_ids"]) * 64 * 2    # H = 64, 2 bytes each
    head = load_file(str(data / HEAD_FILE))
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher)
    assert torch.equal(head["bias"], model.lm_head.bias.detach())
    with pytest.raises(ValueError, match="targets=hidden needs backend=hf"):
        GenerationConfig(targets="hidden", backend="vllm")
    with pytest.raises(ValueError, match="cache='compact' .* targets=hidden"):
        GenerationConfig(targets="hidden", backend="hf", cache="compact")


def test_head_of_another_vocabulary_is_refused(families, tmp_path):
    _, _, data = families["llama"]
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    tensors = load_file(str(bad / HEAD_FILE))
    from safetensors import safe_open

    with safe_open(str(bad / HEAD_FILE), framework="pt") as f:
        meta = f.metadata()
    vocab = int(meta["vocab"])
    save_file({"weight": tensors["weight"][:-10]}, str(bad / HEAD_FILE), metadata={**meta, "vocab": str(vocab - 10)})
    with pytest.raises(ValueError, match=f"vocabulary of {vocab - 10} tokens .* student's tokenizer has {vocab}"):
        check_head(bad, vocab)


def test_hidden_dir_without_head_one_line_nothing_trained(families, tmp_path):
    _, student, data = families["llama"]
    bad = tmp_path / "nohead"
    shutil.copytree(data, bad)
    (bad / HEAD_FILE).unlink()
    error = offline_distill_error(tmp_path, student, bad)
    assert HEAD_FILE in error and "targets=hidden" in error, error


@pytest.mark.parametrize("targets", ["topk", "hidden"])
def test_teacher_with_padded_vocab_rows_writes_only_tokenizer_ids(tiny_pair, tmp_path, targets):
    """A Gemma 2 teacher whose embedding has more rows than its tokenizer (padded vocab_size, as
    Qwen's): `llmkd generate` never samples or stores the padding ids; rows that hold one anyway
    (a dir from another tool or an older llmkd) stop training with one line naming the row and the
    id, before the student's embedding would fail mid-step with an IndexError."""
    tok = load_tokenizer(tiny_pair[0])
    config = transformers.Gemma2Config(
        vocab_size=len(tok) + 64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=0.2, final_logit_softcapping=2.0)
    torch.manual_seed(1)
    teacher = transformers.Gemma2ForCausalLM(config)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    cfg = GenerationConfig(model=str(tmp_path / "teacher"), backend="hf", recipe="arithmetic", num_prompts=4,
                           max_new_tokens=12, temperature=1.0, output_dir=str(tmp_path / "gen"),
                           targets=targets, topk=20)
    data = run_generation(cfg, progress=False)
    rows = load_generated(data)
    check_token_ids(rows, len(tok), data)                  # nothing beyond the tokenizer was written
    first = rows[0]["response_token_ids"]
    bad = rows.map(lambda r, i: {"response_token_ids": [len(tok) + 3, *first[1:]]} if i == 0 else {},
                   with_indices=True)
    with pytest.raises(ValueError, match=rf"row id={rows[0]['id']}: response_token_ids holds token id "
                                         rf"{len(tok) + 3}, outside the student's tokenizer \({len(tok)} tokens\)"):
        check_token_ids(bad, len(tok), data)
