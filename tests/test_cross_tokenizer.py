"""The cross_tokenizer method on a tiny teacher and a student under a different, locally trained
tokenizer: loss wiring against naive per-chunk loops, chunked == full logits, grad accumulation,
on-policy re-tokenisation, tokenizer transfer, training through DistillationTrainer, bad input."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmkd.training.config import config_from_dict
from llmkd.eval.chunk_gap import chunk_gap
from llmkd.methods.cross_tokenizer import CrossTokenizer, CrossTokenizerParams
from llmkd.models.transfer import teacher_pieces, train_tokenizer, transfer_student
from llmkd.models.head import forward_head
from llmkd.models.tiny import _corpus
from llmkd.training.pipeline import build_trainer

ROWS = {"prompt": ["What is 12 + 30?", "Ann has 3 pens. How many now?", "Say hi 😀 naïvely"],
        "response": ["The answer is 42.", "So the answer is 9 pens.", "hi  😀 café 12345"]}


@pytest.fixture(scope="module")
def xtok(tiny_pair, tmp_path_factory) -> tuple[str, str]:
    """(teacher_dir, student_dir): the tiny teacher, and a 1-layer student made from it under a
    new BPE tokenizer (different vocabulary size and merges: digits merge, words split)."""
    teacher_dir = tiny_pair[0]
    t_tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    new_tok = train_tokenizer(_corpus(500, seed=5), 350, like=t_tok)
    student = transfer_student(teacher, t_tok, new_tok, layers=1)
    out = tmp_path_factory.mktemp("xtok") / "student"
    student.save_pretrained(out)
    new_tok.save_pretrained(out)
    return teacher_dir, str(out)


def make_method(xtok, **params) -> tuple[CrossTokenizer, torch.nn.Module, torch.nn.Module]:
    t_dir, s_dir = xtok
    method = CrossTokenizer(CrossTokenizerParams(**params))
    method.setup(AutoTokenizer.from_pretrained(s_dir), AutoTokenizer.from_pretrained(t_dir))
    teacher = AutoModelForCausalLM.from_pretrained(t_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float64)
    method.attach(teacher.double(), student, chunked_head_ok=True)
    return method, teacher, student


def batch_of(method, max_length=128):
    feats = method.features(Dataset.from_dict(ROWS), response="response", max_length=max_length)
    return feats, method.collate([feats[i] for i in range(len(feats))])


def test_tokenizers_really_differ(xtok) -> None:
    method, _, _ = make_method(xtok)
    feats, _ = batch_of(method)
    assert len(method.student_tokenizer) != len(method.teacher_tokenizer)
    spans = [s for row in feats["chunk_spans"] for s in row]
    assert any(a1 - a0 != b1 - b0 for a0, a1, b0, b1 in spans)    # some chunks have unequal token counts


def test_features_chunks_spell_the_response_on_both_sides(xtok) -> None:
    method, _, _ = make_method(xtok)
    feats, _ = batch_of(method)
    s_tok, t_tok = method.student_tokenizer, method.teacher_tokenizer
    for row, response in zip(feats, ROWS["response"]):
        s_text = [s_tok.decode(row["input_ids"][a0:a1]) for a0, a1, _, _ in row["chunk_spans"]]
        t_text = [t_tok.decode(row["teacher_input_ids"][b0:b1]) for _, _, b0, b1 in row["chunk_spans"]]
        assert s_text[:-1] == t_text[:-1] and "".join(s_text[:-1]) == response
        assert (s_text[-1], t_text[-1]) == (s_tok.eos_token, t_tok.eos_token)   # the (eos, eos) chunk
        assert row["input_ids"][-1] == s_tok.eos_token_id and row["teacher_input_ids"][-1] == t_tok.eos_token_id
        assert row["labels"][: row["prompt_len"]] == [-100] * row["prompt_len"]
        # each side's prompt is its own chat template
        assert row["teacher_input_ids"][: row["teacher_prompt_len"]] == t_tok.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=True,
            return_dict=True)["input_ids"]


def test_truncation_keeps_whole_chunks_on_both_sides(xtok) -> None:
    method, _, _ = make_method(xtok)
    full, _ = batch_of(method)
    short, _ = batch_of(method, max_length=min(full["prompt_len"]) + 4)
    for f, s in zip(full, short):
        n = len(s["chunk_spans"])
        assert s["chunk_spans"] == f["chunk_spans"][:n]
        assert len(s["input_ids"]) <= min(full["prompt_len"]) + 4
        if n:
            assert len(s["input_ids"]) == s["chunk_spans"][-1][1]
            assert len(s["teacher_input_ids"]) == s["chunk_spans"][-1][3]


def naive_chunk_logps(logits: torch.Tensor, ids: torch.Tensor, spans: list[list[int]], side: int) -> list[float]:
    """Per chunk: sum over its tokens t of log softmax(logits[t - 1])[ids[t]], by loops."""
    out = []
    for span in spans:
        lo, hi = span[2 * side], span[2 * side + 1]
        total = 0.0
        for t in range(lo, hi):
            z = logits[t - 1].double()
            total = total + (z[ids[t]] - torch.logsumexp(z, 0))
        out.append(total)
    return out


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_alm_method_equals_naive_loops(xtok, chunk_size: int) -> None:
    method, teacher, student = make_method(xtok, loss="alm", tau=0.7, chunk_size=chunk_size)
    feats, batch = batch_of(method)
    s_out = forward_head(student, batch, hidden=chunk_size > 0, vocab=method.vocab_size)
    loss, metrics = method.loss(s_out, method.teacher_targets(batch), batch, None)
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    terms = []
    for i, row in enumerate(feats):
        l_s = naive_chunk_logps(s_logits[i], batch["input_ids"][i], row["chunk_spans"], 0)
        l_t = naive_chunk_logps(t_logits[i].detach(), batch["teacher_input_ids"][i], row["chunk_spans"], 1)
        for ls, lt in zip(l_s, l_t):
            a, b = torch.exp(lt / 0.7), torch.exp(ls / 0.7)
            terms.append(-(a * torch.log(b) + (1 - a) * torch.log(1 - b)))
    assert_equals_reference(loss, torch.stack(terms).mean(), student)
    assert metrics["chunk_gap"] > 0


def assert_equals_reference(loss: torch.Tensor, ref: torch.Tensor, student: torch.nn.Module) -> None:
    """The method's loss and its gradient w.r.t. the student's embeddings equal the float64 loop's."""
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-10)
    g, = torch.autograd.grad(loss, student.model.embed_tokens.weight)
    g_ref, = torch.autograd.grad(ref, student.model.embed_tokens.weight)
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-10)


def naive_uld(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """sum_i |p_(i) - q_(i)| of the descending-sorted probabilities, zero-padded, by a loop."""
    order_s, order_t = torch.argsort(p_s, descending=True), torch.argsort(p_t, descending=True)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(max(len(p_s), len(p_t))):
        s = p_s[order_s[i]] if i < len(p_s) else 0.0
        t = p_t[order_t[i]] if i < len(p_t) else 0.0
        total = total + abs(s - t)
    return total


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_alm_unbiased_equals_naive_loops(xtok, chunk_size: int) -> None:
    """Debiased ALM: chunks joined up to word ends; each chunk's l plus log P(next token starts
    a word) on each side (not for the eos chunk). Float64 loops, values and gradients."""
    from llmkd.data.alignment import boundary_token_ids

    method, teacher, student = make_method(xtok, loss="alm_unbiased", chunk_size=chunk_size)
    assert method.params.tau == 100.0
    feats, batch = batch_of(method)
    s_tok, t_tok = method.student_tokenizer, method.teacher_tokenizer
    s_b, t_b = boundary_token_ids(s_tok), boundary_token_ids(t_tok)
    assert s_tok.convert_tokens_to_ids("\u0120the") in s_b or any(s_tok.decode([i]).startswith(" ") for i in s_b)
    s_out = forward_head(student, batch, hidden=chunk_size > 0, vocab=method.vocab_size)
    loss, metrics = method.loss(s_out, method.teacher_targets(batch), batch, None)
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    terms = []
    for i, row in enumerate(feats):
        text = ROWS["response"][i]
        l_s = naive_chunk_logps(s_logits[i], batch["input_ids"][i], row["chunk_spans"], 0)
        l_t = naive_chunk_logps(t_logits[i].detach(), batch["teacher_input_ids"][i], row["chunk_spans"], 1)
        for k, (a0, a1, b0, b1) in enumerate(row["chunk_spans"]):
            chunk = t_tok.decode(batch["teacher_input_ids"][i][b0:b1])
            if k < len(row["chunk_spans"]) - 1:     # a word: the text goes on with whitespace
                rest = text[len(t_tok.decode(batch["teacher_input_ids"][i][row["chunk_spans"][0][2]:b1])):]
                assert rest == "" or rest[0].isspace()
                ls = l_s[k] + torch.log(torch.softmax(s_logits[i, a1 - 1].double(), -1)[s_b].sum())
                lt = l_t[k] + torch.log(torch.softmax(t_logits[i, b1 - 1].detach().double(), -1)[t_b].sum())
            else:
                assert chunk == t_tok.eos_token
                ls, lt = l_s[k], l_t[k]
            a, b = torch.exp(lt / 100), torch.exp(ls / 100)
            terms.append(-(a * torch.log(b) + (1 - a) * torch.log(1 - b)))
    assert_equals_reference(loss, torch.stack(terms).mean(), student)
    assert metrics["unpaired_chunks"] == 0.0 and "alm_unbiased" in metrics


@pytest.mark.parametrize("chunk_size,params", [(0, {"ce_weight": 0.0, "uld_weight": 1.0}),
                                               (3, {"ce_weight": 0.0, "uld_weight": 1.0}), (3, {})])
def test_uld_method_compares_the_positions_before_each_chunk(xtok, chunk_size: int, params: dict) -> None:
    """Default: CE + 1.5 * ULD (Boizard et al.); ce_weight 0 leaves the sorted-L1 term alone.
    Checked against a float64 loop, values and gradients."""
    method, teacher, student = make_method(xtok, loss="uld", temperature=2.0, chunk_size=chunk_size, **params)
    ce_w, uld_w = (params["ce_weight"], params["uld_weight"]) if params else (1.0, 1.5)
    assert (method.params.ce_weight, method.params.uld_weight) == (ce_w, uld_w)
    feats, batch = batch_of(method)
    s_out = forward_head(student, batch, hidden=chunk_size > 0, vocab=method.vocab_size)
    loss, metrics = method.loss(s_out, method.teacher_targets(batch), batch, None)
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    uld = [naive_uld(torch.softmax(s_logits[i, a0 - 1] / 2.0, -1), torch.softmax(t_logits[i, b0 - 1].detach() / 2.0, -1))
           for i, row in enumerate(feats) for a0, _, b0, _ in row["chunk_spans"]]
    nll = [-x for i, row in enumerate(feats)
           for x in naive_chunk_logps(s_logits[i], batch["input_ids"][i], row["chunk_spans"], 0)]
    ref = uld_w * torch.stack(uld).mean() + ce_w * torch.stack(nll).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-10)
    g, = torch.autograd.grad(loss, student.model.embed_tokens.weight)
    g_ref, = torch.autograd.grad(ref, student.model.embed_tokens.weight)
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-10)
    assert ("ce" in metrics) == (ce_w > 0) and metrics["unpaired_chunks"] == 0.0


def test_ce_is_the_mean_chunk_nll_and_sft_skips_the_teacher(xtok) -> None:
    method, _, student = make_method(xtok, loss="none", ce_weight=1.0)
    feats, batch = batch_of(method)
    assert method.teacher_targets(batch).output is None
    loss, metrics = method.loss(forward_head(student, batch, hidden=True, vocab=method.vocab_size),
                                method.teacher_targets(batch), batch, None)
    logits = student(input_ids=batch["input_ids"]).logits
    nll = [-x for i, row in enumerate(feats)
           for x in naive_chunk_logps(logits[i], batch["input_ids"][i], row["chunk_spans"], 0)]
    torch.testing.assert_close(loss, torch.stack(nll).mean(), rtol=1e-9, atol=1e-10)
    assert metrics == {"ce": pytest.approx(float(loss)), "unpaired_chunks": 0.0}


def test_grad_accumulation_matches_one_big_batch(xtok, tmp_path) -> None:
    """1 x 8 and 4 x 2 give the same update: losses are divided by the window's chunk count."""
    def step(bs: int, ga: int, out: Path) -> dict[str, torch.Tensor]:
        trainer = build_trainer(cfg(xtok, out, max_steps=1, per_device_train_batch_size=bs,
                                    gradient_accumulation_steps=ga, optim="sgd", learning_rate=1.0,
                                    max_grad_norm=0.0, lr_scheduler_type="constant",
                                    data={"recipe": "arithmetic", "num_train": 8, "num_eval": 4},
                                    method={"loss": "alm", "ce_weight": 0.5, "chunk_size": 4}))
        trainer.train()
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    w1, w2 = step(8, 1, tmp_path / "a"), step(2, 4, tmp_path / "b")
    w0 = AutoModelForCausalLM.from_pretrained(xtok[1]).state_dict()
    moved = False
    for k in w1:
        torch.testing.assert_close(w1[k] - w0[k], w2[k] - w0[k], atol=1e-5, rtol=1e-4)
        moved |= bool((w1[k] - w0[k]).abs().max() > 1e-4)
    assert moved


def cfg(xtok, out: Path, **over):
    t_dir, s_dir = xtok
    method = {"name": "cross_tokenizer", **over.pop("method", {})}
    raw = {"output_dir": str(out), "max_steps": 60, "learning_rate": 3e-3, "per_device_train_batch_size": 8,
           "logging_steps": 1000, "use_cpu": True, "save_strategy": "no", "seed": 0, "disable_tqdm": True,
           "model": {"teacher": t_dir, "student": s_dir},
           "data": {"recipe": "arithmetic", "num_train": 128, "num_eval": 32}, "method": method, **over}
    return config_from_dict(raw)


def test_alm_training_lowers_held_out_chunk_gap(xtok, tmp_path) -> None:
    trainer = build_trainer(cfg(xtok, tmp_path / "run", method={"loss": "alm"}))
    before = chunk_gap(trainer.method, trainer.model, trainer.eval_dataset)
    trainer.train()
    after = chunk_gap(trainer.method, trainer.model, trainer.eval_dataset)
    assert after["chunks"] == before["chunks"] > 100
    assert after["chunk_gap"] <= 0.6 * before["chunk_gap"], (before, after)
    assert after["teacher_chunk_logp"] == pytest.approx(before["teacher_chunk_logp"])


def test_on_policy_samples_are_retokenised_for_both(xtok, tmp_path) -> None:
    trainer = build_trainer(cfg(xtok, tmp_path / "op", max_steps=2, per_device_train_batch_size=4,
                                method={"loss": "alm", "lmbda": 1.0, "max_new_tokens": 10}))
    trainer.train()
    assert [h["on_policy"] for h in trainer.state.log_history if "on_policy" in h] == [1.0]
    # a sampled batch rebuilt by the method: chunks spell the same text on both sides
    method = trainer.method
    feats = [trainer.train_dataset[i] for i in range(2)]
    batch = method.collate(feats)
    s_tok, t_tok = method.student_tokenizer, method.teacher_tokenizer
    sampled = s_tok(" The answer is 12345 😀", add_special_tokens=False)["input_ids"]
    # rows as the trainer hands them over: student prompt + sample, batch keys carried per row
    rows = [{"input_ids": f["input_ids"][: f["prompt_len"]] + sampled + end, "prompt_len": f["prompt_len"],
             "labels": [-100] * f["prompt_len"] + sampled + end,
             "teacher_input_ids": batch["teacher_input_ids"][i].tolist(),
             "teacher_prompt_len": int(batch["teacher_prompt_len"][i])}
            for i, (f, end) in enumerate(zip(feats, ([s_tok.eos_token_id], [])))]
    new = method.sampled_batch(rows)
    for i in range(2):
        n = int(new["chunk_mask"][i].sum())
        a0, b0 = int(new["student_chunk_start"][i, 0]), int(new["teacher_chunk_start"][i, 0])
        s_text = s_tok.decode(new["input_ids"][i][a0: int(new["attention_mask"][i].sum())])
        t_text = t_tok.decode(new["teacher_input_ids"][i][b0: int(new["teacher_attention_mask"][i].sum())])
        assert n > 3 and s_text == t_text       # both tokenizers share the eos string here
        assert s_text == " The answer is 12345 😀" + (s_tok.eos_token if i == 0 else "")
        tp = int(new["teacher_prompt_len"][i])
        assert new["teacher_input_ids"][i][:tp].tolist() == batch["teacher_input_ids"][i][:tp].tolist()


def test_transfer_embeddings_are_means_of_teacher_pieces(xtok) -> None:
    t_dir, s_dir = xtok
    t_tok, s_tok = AutoTokenizer.from_pretrained(t_dir), AutoTokenizer.from_pretrained(s_dir)
    teacher = AutoModelForCausalLM.from_pretrained(t_dir)
    student = AutoModelForCausalLM.from_pretrained(s_dir)
    pieces = teacher_pieces(s_tok, t_tok)
    w_t, w_s = teacher.get_input_embeddings().weight, student.get_input_embeddings().weight
    assert w_s.shape[0] == len(s_tok)
    for i in range(len(s_tok)):
        # every piece list spells the new token's bytes in the teacher's vocabulary
        assert "".join(t_tok.convert_ids_to_tokens(pieces[i])) == s_tok.convert_ids_to_tokens(i)
        torch.testing.assert_close(w_s[i], w_t[pieces[i]].mean(0))
    assert student.config.eos_token_id == s_tok.eos_token_id
    msgs = [{"role": "user", "content": "hi"}]
    assert s_tok.apply_chat_template(msgs, tokenize=False) == t_tok.apply_chat_template(msgs, tokenize=False)


def test_same_tokenizer_warns_and_gives_one_token_chunks(tiny_pair) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    method = CrossTokenizer(CrossTokenizerParams())
    with pytest.warns(UserWarning, match="token_kd"):
        method.setup(tok, AutoTokenizer.from_pretrained(tiny_pair[0]))
    feats = method.features(Dataset.from_dict({"prompt": ["What is 1 + 2?"], "response": ["The answer is 3."]}),
                            response="response", max_length=128)
    assert all(a1 - a0 == 1 and b1 - b0 == 1 and a0 - feats[0]["prompt_len"] == b0 - feats[0]["teacher_prompt_len"]
               for a0, a1, b0, b1 in feats[0]["chunk_spans"])


def test_bad_input_fails_early_with_the_fix(tiny_pair) -> None:
    from transformers import ByT5Tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    with pytest.raises(ValueError, match=r"model\.student: .*use_fast=True"):
        CrossTokenizer(CrossTokenizerParams()).setup(ByT5Tokenizer(), tok)
    with pytest.raises(ValueError, match="teacher_mode=live"):
        CrossTokenizer(CrossTokenizerParams()).setup(tok, None)
    for params, match in (({"loss": "kl"}, "method.loss"), ({"tau": 0}, "method.tau"),
                          ({"loss": "none"}, "method.ce_weight"), ({"lmbda": 2}, "method.lmbda")):
        with pytest.raises(ValueError, match=match):
            CrossTokenizerParams.from_dict(params)
    with pytest.raises(ValueError, match="lack 'response'"):
        method = CrossTokenizer(CrossTokenizerParams())
        with pytest.warns(UserWarning):
            method.setup(tok, tok)
        method.features(Dataset.from_dict({"prompt": ["x"]}), response="response", max_length=64)
    assert math.isfinite(CrossTokenizerParams.from_dict({"name": "cross_tokenizer", "tau": 2}).tau)
