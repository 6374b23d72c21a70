"""ALM and ULD against their formulas written out naively in float64 (values and gradients), the
identical-tokenizer reduction of ALM to a per-token computation, and TRL GOLD's ULD as a peer."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from llmkd.data.alignment import align_chunks
from llmkd.losses import alm_loss, boundary_logp, uld_loss
from llmkd.losses.alm import chunk_sums


def naive_alm(l_t: torch.Tensor, l_s: torch.Tensor, tau: float) -> torch.Tensor:
    """-[a log b + (1 - a) log(1 - b)], a = exp(l_T / tau), b = exp(l_S / tau), per chunk."""
    a = torch.exp(l_t.detach() / tau)
    b = torch.exp(l_s / tau)
    return -(a * torch.log(b) + (1 - a) * torch.log(1 - b))


def naive_uld(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Per row: sorted probabilities, zero-padded to the larger vocabulary, L1."""
    out = []
    for s_row, t_row in zip(s_logits.reshape(-1, s_logits.shape[-1]), t_logits.reshape(-1, t_logits.shape[-1])):
        p = torch.exp(s_row) / torch.exp(s_row).sum()
        q = torch.exp(t_row.detach()) / torch.exp(t_row.detach()).sum()
        p, q = torch.sort(p, descending=True).values, torch.sort(q, descending=True).values
        n = max(len(p), len(q))
        p = torch.cat([p, p.new_zeros(n - len(p))])
        q = torch.cat([q, q.new_zeros(n - len(q))])
        out.append(sum(abs(p[i] - q[i]) for i in range(n)))
    return torch.stack(out).reshape(s_logits.shape[:-1])


def chunk_logps(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    l_t = -torch.rand(shape, generator=g, dtype=torch.float64) * 6 - 1e-3
    l_s = (-torch.rand(shape, generator=g, dtype=torch.float64) * 6 - 1e-3).requires_grad_()
    return l_t, l_s


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_alm_equals_formula_values_and_grads(tau: float, reduction: str) -> None:
    l_t, l_s = chunk_logps((3, 7), seed=0)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    ours = alm_loss(l_t, l_s, tau=tau, mask=mask, reduction=reduction)
    per = torch.where(mask, naive_alm(l_t, l_s, tau), 0.0)
    ref = {"mean": per.sum() / mask.sum(), "sum": per.sum(), "none": per}[reduction]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    g_ours, = torch.autograd.grad(ours.sum(), l_s)
    g_ref, = torch.autograd.grad(ref.sum(), l_s)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)


def test_alm_float32_matches_float64_and_minimum_at_teacher() -> None:
    l_t, l_s = chunk_logps((4, 5), seed=2)
    ours = alm_loss(l_t.float(), l_s.detach().float(), tau=1.0)
    torch.testing.assert_close(ours.double(), naive_alm(l_t, l_s, 1.0).mean().detach(), rtol=1e-5, atol=1e-6)
    # as a function of l_S the loss is smallest where the student matches the teacher
    grid = torch.linspace(-6, -1e-3, 2001, dtype=torch.float64)
    values = alm_loss(torch.full_like(grid, -1.3), grid, tau=1.0, reduction="none")
    assert abs(float(grid[values.argmin()]) + 1.3) < 5e-3


def test_alm_teacher_gets_no_gradient_and_edges_stay_finite() -> None:
    l_t = torch.tensor([0.0, -1e-9, -30.0, -1e4, -2.0], requires_grad=True)
    l_s = torch.tensor([0.0, -1e-9, -1e4, -30.0, 1e-7], requires_grad=True)   # 1e-7: rounding above 0
    loss = alm_loss(l_t, l_s, tau=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(l_s.grad).all()
    assert l_t.grad is None or not l_t.grad.any()


def test_alm_default_temperature_is_tokenkits_and_keeps_low_likelihood_chunks_learning() -> None:
    """tau defaults to 100 (tokenkit): at tau = 1 a chunk at l_S = -25 (teacher -20) has a
    gradient of ~2e-9 and does not learn; at 100 it has a usable one."""
    l_t = torch.tensor([-20.0], dtype=torch.float64)
    grads = {}
    for tau in (None, 1.0):
        l_s = torch.tensor([-25.0], dtype=torch.float64, requires_grad=True)
        loss = alm_loss(l_t, l_s) if tau is None else alm_loss(l_t, l_s, tau=tau)
        grads[tau], = torch.autograd.grad(loss, l_s)
    ref = torch.tensor([-25.0], dtype=torch.float64, requires_grad=True)
    g_ref, = torch.autograd.grad(naive_alm(l_t, ref, 100.0).sum(), ref)
    torch.testing.assert_close(grads[None], g_ref)
    assert abs(float(grads[1.0])) < 1e-8 < 1e-3 < abs(float(grads[None]))


@pytest.mark.parametrize("shape,v", [((3,), 7), ((2, 4), 11)])
def test_boundary_logp_equals_formula_values_and_grads(shape: tuple, v: int) -> None:
    """log sum_{v in ids} softmax(z)_v, written as a loop in float64; float32 agrees."""
    gen = torch.Generator().manual_seed(5)
    z = (3 * torch.randn(*shape, v, generator=gen, dtype=torch.float64)).requires_grad_(True)
    ids = torch.tensor([0, 2, v - 1])
    ours = boundary_logp(z, ids)
    flat = z.reshape(-1, v)
    ref = torch.stack([torch.log(sum(torch.exp(row[i]) for i in ids.tolist()) / torch.exp(row).sum())
                       for row in flat]).reshape(shape)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g, = torch.autograd.grad((ours * torch.arange(ours.numel()).reshape(shape)).sum(), z)
    g_ref, = torch.autograd.grad((ref * torch.arange(ref.numel()).reshape(shape)).sum(), z)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(boundary_logp(z.detach().float(), ids).double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert (ours <= 0).all()


def test_alm_bad_input_names_the_field() -> None:
    with pytest.raises(ValueError, match="method.tau"):
        alm_loss(torch.zeros(2), torch.zeros(2), tau=0.0)
    with pytest.raises(ValueError, match="per chunk"):
        alm_loss(torch.zeros(2), torch.zeros(3), tau=1.0)


def test_chunk_sums_equal_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(2, 6, generator=g, dtype=torch.float64)
    index = torch.tensor([[-1, 0, 0, 1, 2, -1], [-1, -1, 0, 1, 1, 1]])
    logp.requires_grad_()
    out = chunk_sums(logp, index, 3)
    ref = torch.zeros(2, 3, dtype=torch.float64)
    for b in range(2):
        for s in range(6):
            if index[b, s] >= 0:
                ref[b, index[b, s]] += logp[b, s].detach()
    torch.testing.assert_close(out.detach(), ref)
    out.sum().backward()
    torch.testing.assert_close(logp.grad, (index >= 0).double())


def token_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[j] | ids[<j]) for j >= 1 from logits at j - 1; position 0 gets 0 (no prediction)."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([lp.new_zeros(ids.shape[0], 1), lp], dim=1)


def test_alm_identical_tokenizers_equals_per_token_alm() -> None:
    """Same tokenizer: every chunk is one token, so chunked ALM is ALM on each token's probability."""
    from llmkd.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    text = "Bob has 12 apples and gets 30 more. So the answer is 42."
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    chunks = align_chunks(text, tok, tok)
    assert all(a == b and a[1] - a[0] == 1 for a, b in chunks)
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(1, ids.shape[1], len(tok), generator=g, dtype=torch.float64) * 3
    s_logits = torch.randn(1, ids.shape[1], len(tok), generator=g, dtype=torch.float64).requires_grad_()
    # chunks from token 1 on (token 0 has no prediction), laid out per token: its chunk id or -1
    index = torch.full_like(ids, -1)
    for k, ((start, end), _) in enumerate(chunks[1:]):
        index[0, start:end] = k
    n = len(chunks) - 1
    ours = alm_loss(chunk_sums(token_logp(t_logits, ids), index, n),
                    chunk_sums(token_logp(s_logits, ids), index, n), tau=2.0)
    p_t = torch.softmax(t_logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    p_s = torch.softmax(s_logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    a, b = p_t ** 0.5, p_s ** 0.5
    direct = (-(a * torch.log(b) + (1 - a) * torch.log(1 - b))).mean()
    torch.testing.assert_close(ours, direct, rtol=1e-10, atol=1e-12)
    g_ours, = torch.autograd.grad(ours, s_logits)
    g_direct, = torch.autograd.grad(direct, s_logits)
    torch.testing.assert_close(g_ours, g_direct, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("v_s,v_t", [(11, 11), (7, 13), (17, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_uld_equals_formula_values_and_grads(v_s: int, v_t: int, reduction: str) -> None:
    g = torch.Generator().manual_seed(v_s * 100 + v_t)
    s = (torch.randn(2, 4, v_s, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(2, 4, v_t, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    ours = uld_loss(s, t, mask=mask, reduction=reduction)
    per = torch.where(mask, naive_uld(s, t), 0.0)
    ref = {"mean": per.sum() / mask.sum(), "sum": per.sum(), "none": per}[reduction]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    g_ours, = torch.autograd.grad(ours.sum(), s)
    g_ref, = torch.autograd.grad(ref.sum(), s)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)


def test_uld_properties() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 9, generator=g)
    perm = torch.randperm(9, generator=g)
    # a permutation of the vocabulary is invisible to ULD; extra zero-probability rows too
    assert float(uld_loss(s, s[:, perm])) < 1e-6
    padded = torch.cat([s, torch.full((3, 4), -1e9)], dim=-1)
    assert float(uld_loss(s, padded)) < 1e-6
    assert 0 < float(uld_loss(s, torch.randn(3, 5, generator=g))) <= 2
    t = torch.randn(3, 9, requires_grad=True)
    uld_loss(torch.randn(3, 9, requires_grad=True), t).backward()
    assert t.grad is None or not t.grad.any()
    with pytest.raises(ValueError, match="aligned position"):
        uld_loss(torch.zeros(2, 3, 5), torch.zeros(3, 3, 5))


def test_uld_equals_trl_gold_non_hybrid() -> None:
    """TRL GOLD's ULDLoss (use_extended_uld=False, no hybrid, no CE) on the same logits."""
    from trl.experimental.gold.gold_trainer import ULDLoss

    cfg = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0,
                          uld_student_temperature=1.0, uld_teacher_temperature=1.0,
                          uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                          use_extended_uld=False, uld_token_merge_strategy="observed",
                          uld_use_hybrid_loss=False)
    gold = ULDLoss(cfg)
    g = torch.Generator().manual_seed(0)
    b, s_len, t_len, v_s, v_t = 3, 9, 11, 23, 31
    s_logits = torch.randn(b, s_len, v_s, generator=g) * 2
    t_logits = torch.randn(b, t_len, v_t, generator=g) * 2
    s_ids = torch.randint(0, v_s, (b, s_len), generator=g)
    t_ids = torch.randint(0, v_t, (b, t_len), generator=g)
    # prompts of different lengths; every row has 5 answer positions on the student side
    s_start, t_start, m = [2, 3, 4], [3, 5, 6], 5
    s_labels = torch.full((b, s_len), -100)
    t_labels = torch.full((b, t_len), -100)
    for i in range(b):
        s_labels[i, s_start[i]: s_start[i] + m] = s_ids[i, s_start[i]: s_start[i] + m]
        t_labels[i, t_start[i]:] = t_ids[i, t_start[i]:]
    ref = gold(s_logits, t_logits, s_labels, t_labels, s_ids, t_ids)
    # GOLD compares answer positions in order, truncated to the shorter answer
    s_rows = torch.stack([s_logits[i, s_start[i]: s_start[i] + m] for i in range(b)])
    t_rows = torch.stack([t_logits[i, t_start[i]: t_start[i] + m] for i in range(b)])
    torch.testing.assert_close(uld_loss(s_rows, t_rows), ref.reshape(()), rtol=1e-5, atol=1e-6)


def test_uld_is_zero_iff_sorted_shapes_match() -> None:
    s = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    t = torch.log(torch.tensor([[0.2, 0.0 + 1e-30, 0.5, 0.3]]))
    assert math.isclose(float(uld_loss(s, t)), 0.0, abs_tol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 100.0])
def test_alm_overconfident_student_is_pushed_down(tau: float) -> None:
    """A chunk the student finds likelier than exp(-tau * 1e-6) (b within 1e-6 of 1: a chunk of
    probability > 0.9999 at tau 100, common for a trained model) while the teacher is less sure:
    d loss / d l_S = (b - a) / ((1 - b) tau) > 0, so descent must lower l_S. Clamping b cut the
    second term's gradient, leaving -a / tau: the student was pushed to be *more* confident."""
    l_t = torch.tensor([-0.5 * tau, -5.0 * tau, -1e-4 * tau], dtype=torch.float64)   # a < b
    l_s = torch.tensor([-1e-7 * tau, -1e-8 * tau, -1e-7 * tau], dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(alm_loss(l_t, l_s, tau=tau, reduction="sum"), l_s)
    g_ref, = torch.autograd.grad(naive_alm(l_t, l_s, tau).sum(), l_s)
    assert bool((g_ref > 0).all()) and bool((g > 0).all()), (g, g_ref)
    assert bool(torch.isfinite(g).all())
    # a teacher more confident still than the clamp point pulls the student up
    g_up, = torch.autograd.grad(alm_loss(torch.tensor([0.0], dtype=torch.float64), l_s[:1], tau=tau), l_s)
    assert float(g_up[0]) < 0
