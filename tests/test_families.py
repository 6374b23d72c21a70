"""The chunked KD loss equals full-logits KD on every model family's real head (tiny random models
built from configs, no hub): tied Llama, Qwen2, Phi (lm_head bias), Gemma 2 (final-logit
soft-capping), Granite (logits / logits_scaling), Cohere (logits * logit_scale), Gemma 3, HyperCLOVA X
(logits * logits_scaling); a LoRA adapter on lm_head falls back to the model's own full logits."""
from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
import torch
import transformers

from llmkd.losses import divergence
from llmkd.models import head as head_module
from llmkd.models.head import (LMHead, chunked_divergence_heads, forward_head, lm_head_of, run_head,
                              verify_head)

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
# family -> (config class, model class, config overrides); Gemma 2's cap of 2.0 is well inside the
# logits' range (initializer_range 0.2), so dropping it changes the loss.
FAMILIES = {
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict()),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=2.0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25)),
    # beyond the issue's list: Gemma 3's text model, and HyperCLOVA X, which multiplies by the
    # `logits_scaling` that Granite divides by
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=2.0)),
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(logits_scaling=4.0)),
}
KINDS = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("tvd", 0.5), ("skew_fkl", 0.5), ("skew_rkl", 0.5)]


def build(family: str, *, hidden: int, seed: int, vocab: int = VOCAB) -> torch.nn.Module:
    config_cls, model_cls, overrides = FAMILIES[family]
    heads = hidden // 32   # head_dim 32
    config = getattr(transformers, config_cls)(
        **(COMMON | dict(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                         num_key_value_heads=heads, head_dim=32) | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).double()
    bias = model.get_output_embeddings().bias
    if bias is not None:   # initialised to 0, where dropping it would go unnoticed
        with torch.no_grad():
            bias.normal_()
    return model


@functools.cache
def pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, teacher) of one family; they differ in width, as a real pair does."""
    return build(family, hidden=64, seed=1), build(family, hidden=96, seed=2)


def make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[1, -2:] = 0                       # right padding
    labels = ids.clone()
    labels[:, :3] = -100                        # the prompt
    labels[attention == 0] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def full_kd(student, teacher, batch, kind, beta, temperature=1.0):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    zs = student(**inputs).logits
    with torch.no_grad():
        zt = teacher(**inputs).logits
    mask = batch["labels"][:, 1:] != -100
    return divergence(zs[:, :-1], zt[:, :-1], kind, beta=beta, temperature=temperature, mask=mask)


def chunked_kd(student, teacher, batch, kind, beta, temperature=1.0):
    s = forward_head(student, batch, hidden=True)
    t = run_head(teacher, batch, hidden=True)
    assert s.logits is None and t.logits is None   # the chunked path, no (B, S, V) logits
    mask = batch["labels"][:, 1:] != -100
    return chunked_divergence_heads(s.hidden[:, :-1], s.head, t.hidden[:, :-1], t.head, kind, beta=beta,
                                    temperature=temperature, mask=mask, chunk_size=5)


def params_of(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lm_head_of_reads_the_family_head(family):
    student, teacher = pair(family)
    head = lm_head_of(student)
    assert head is not None and head.weight is student.get_output_embeddings().weight
    expected = {"gemma2": (1.0, 2.0), "gemma3": (1.0, 2.0), "granite": (0.25, None),
                "cohere": (0.25, None), "hyperclovax": (4.0, None)}.get(family, (1.0, None))
    assert (head.scale, head.softcap) == expected
    assert (head.bias is not None) == (family == "phi")
    if family == "llama_tied":
        assert head.weight is student.get_input_embeddings().weight
    batch = make_batch()
    assert verify_head(student, head, batch) and verify_head(teacher, lm_head_of(teacher), batch)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind,beta", KINDS, ids=[k for k, _ in KINDS])
def test_chunked_kd_equals_full_logits_kd(family, kind, beta):
    student, teacher = pair(family)
    batch = make_batch()
    params = params_of(student)
    want = full_kd(student, teacher, batch, kind, beta)
    g_want = torch.autograd.grad(want, params)
    got = chunked_kd(student, teacher, batch, kind, beta)
    g_got = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("family", ["phi", "gemma2", "granite", "cohere", "hyperclovax"])
def test_plain_head_would_be_wrong(family):
    """The head pieces matter: logits = hidden @ W.T alone (the old chunked path) is another loss,
    and verify_head notices a head that misses them."""
    student, teacher = pair(family)
    batch = make_batch()
    s = forward_head(student, batch, hidden=True)
    t = run_head(teacher, batch, hidden=True)
    plain_s, plain_t = LMHead(s.head.weight), LMHead(t.head.weight)
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        right = chunked_divergence_heads(s.hidden[:, :-1], s.head, t.hidden[:, :-1], t.head, mask=mask)
        wrong = chunked_divergence_heads(s.hidden[:, :-1], plain_s, t.hidden[:, :-1], plain_t, mask=mask)
    assert abs(float(right) - float(wrong)) > 0.01 * float(right)
    assert not verify_head(student, plain_s, batch)


def test_softcap_with_temperature():
    student, teacher = pair("gemma2")
    batch = make_batch()
    params = params_of(student)
    want = full_kd(student, teacher, batch, "jsd", 0.3, temperature=2.0)
    got = chunked_kd(student, teacher, batch, "jsd", 0.3, temperature=2.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_padded_teacher_vocab_compares_shared_rows():
    """Teacher head with extra padding rows (e.g. 152,064 vs 151,936 for one tokenizer): `vocab`
    keeps the shared rows, on the chunked and the full-logits path alike."""
    student = pair("qwen2")[0]
    teacher = build("qwen2", hidden=96, seed=4, vocab=VOCAB + 20)
    batch = make_batch()
    t = run_head(teacher, batch, hidden=True, vocab=VOCAB)
    assert t.head.weight.shape[0] == VOCAB
    full = run_head(teacher, batch, hidden=False, vocab=VOCAB)
    assert full.logits.shape[-1] == VOCAB
    torch.testing.assert_close(t.head.logits(t.hidden)[:, :-1], full.logits[:, :-1])
    s = forward_head(student, batch, hidden=True)
    mask = batch["labels"][:, 1:] != -100
    got = chunked_divergence_heads(s.hidden[:, :-1], s.head, t.hidden[:, :-1], t.head, "rkl", mask=mask)
    zs = forward_head(student, batch, hidden=False).logits
    torch.testing.assert_close(got, divergence(zs[:, :-1], full.logits[:, :-1], "rkl", mask=mask))
    with pytest.raises(ValueError, match="vocab"):
        run_head(student, batch, hidden=True, vocab=VOCAB + 1)


def test_lora_on_lm_head_falls_back_to_full_logits(monkeypatch, caplog):
    peft = pytest.importorskip("peft")
    base, teacher = build("qwen2", hidden=64, seed=5), pair("qwen2")[1]
    student = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    assert lm_head_of(student) is None
    batch = make_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    monkeypatch.setattr(head_module, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="llmkd.models.head"):
        out = forward_head(student, batch, hidden=True)
        forward_head(student, batch, hidden=True)
    assert sum("full logits" in r.getMessage() for r in caplog.records) == 1   # one log line
    assert out.hidden is None and out.head is None
    torch.testing.assert_close(out.logits, student(**inputs).logits)
    # the adapter changes the logits: applying the base lm_head alone would be wrong
    hidden = student(**inputs, output_hidden_states=True).hidden_states[-1]
    base_head = student.get_output_embeddings().base_layer
    assert not torch.allclose(base_head(hidden), out.logits, atol=1e-3)
    # KD with the student on full logits and the teacher's head applied: the full-logits KD
    t = run_head(teacher, batch, hidden=True)
    mask = batch["labels"][:, 1:] != -100
    got = divergence(out.logits[:, :-1], t.head.logits(t.hidden)[:, :-1], "jsd", mask=mask)
    want = full_kd(student, teacher, batch, "jsd", 0.5)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    params = params_of(student)
    assert params and all("lora" in n for n, p in student.named_parameters() if p.requires_grad)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_lora_elsewhere_keeps_the_chunked_path():
    peft = pytest.importorskip("peft")
    student = peft.get_peft_model(build("phi", hidden=64, seed=6),
                                  peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    head = lm_head_of(student)
    assert head is not None and head.bias is not None
    assert verify_head(student, head, make_batch())


def test_unknown_or_unexpressible_heads_are_none():
    # the same config name means something else in another family: not guessed
    model = build("llama_tied", hidden=64, seed=7)
    model.config.logits_scaling = 4.0
    assert lm_head_of(model) is None
    # a head module other than a plain Linear (here a custom subclass)
    model = build("qwen2", hidden=64, seed=8)

    class Custom(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    custom = Custom(64, VOCAB, bias=False).double()
    model.set_output_embeddings(custom)
    assert lm_head_of(model) is None
    # verify_head catches what lm_head_of cannot see
    plain = LMHead(custom.weight)
    assert not verify_head(model, plain, make_batch())
    assert verify_head(model, dataclasses.replace(plain, scale=2.0), make_batch())
