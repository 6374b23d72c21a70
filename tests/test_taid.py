"""TAID: the interpolated target, the loss and the adaptive t schedule against the paper's formulas."""
from __future__ import annotations

import json
import math

import pytest
import torch

from llmkd.losses import TAIDSchedule, divergence, taid_loss
from llmkd.losses.taid import taid_target


def logits(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def naive_softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def naive_taid(zs: torch.Tensor, zt: torch.Tensor, t: float, mask=None, reduction="mean",
               num_items=None) -> torch.Tensor:
    """-Σ p_t log q with p_t = softmax((1-t) stopgrad(z_S) + t z_T), written out."""
    p_t = naive_softmax((1 - t) * zs.detach() + t * zt)
    q = naive_softmax(zs)
    values = -(p_t * torch.log(q)).sum(-1)
    if mask is not None:
        values = values * mask
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    count = mask.sum() if mask is not None else values.numel()
    return values.sum() / (num_items if num_items is not None else count)


@pytest.mark.parametrize("t", [0.0, 0.4, 0.73, 1.0])
def test_target_matches_formula(t: float) -> None:
    zs, zt = logits(3, 5, 11, seed=0), logits(3, 5, 11, seed=1)
    got = taid_target(zs, zt, t).exp()
    want = naive_softmax((1 - t) * zs + t * zt)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("t", [0.0, 0.4, 0.9, 1.0])
def test_loss_values_and_grads_match_formula(t: float, reduction: str) -> None:
    zs, zt = logits(2, 6, 13, seed=2), logits(2, 6, 13, seed=3)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    xs, xt = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    got = taid_loss(xs, xt, t, mask=mask, reduction=reduction)
    gs, gt = torch.autograd.grad(got.sum(), (xs, xt), allow_unused=True)
    ys = zs.clone().requires_grad_()
    want = naive_taid(ys, zt, t, mask=mask.double(), reduction=reduction)
    (ws,) = torch.autograd.grad(want.sum(), ys)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs, ws, rtol=1e-10, atol=1e-12)
    assert gt is None or torch.count_nonzero(gt) == 0   # the target carries no gradient


def test_grad_is_q_minus_target_and_num_items() -> None:
    zs, zt = logits(4, 9, seed=4), logits(4, 9, seed=5)
    xs = zs.clone().requires_grad_()
    loss = taid_loss(xs, zt, 0.6, num_items=10)
    (g,) = torch.autograd.grad(loss, xs)
    want = (naive_softmax(zs) - naive_softmax(0.4 * zs + 0.6 * zt)) / 10
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


def test_at_t1_gradient_equals_forward_kl() -> None:
    zs, zt = logits(3, 4, 17, seed=6), logits(3, 4, 17, seed=7)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) > 0.3
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    (ga,) = torch.autograd.grad(taid_loss(a, zt, 1.0, mask=mask), a)
    (gb,) = torch.autograd.grad(divergence(b, zt, "fkl", mask=mask), b)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)


def test_half_precision_is_computed_in_float32() -> None:
    zs, zt = logits(2, 3, 7, seed=8).to(torch.bfloat16), logits(2, 3, 7, seed=9).to(torch.bfloat16)
    got = taid_loss(zs, zt, 0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_taid(zs.double(), zt.double(), 0.5),
                               rtol=1e-5, atol=1e-6)


def test_bad_inputs_fail_clearly() -> None:
    zs = logits(2, 5, seed=0)
    with pytest.raises(ValueError, match="t=1.5"):
        taid_loss(zs, zs, 1.5)
    with pytest.raises(ValueError, match="shared vocabulary"):
        taid_loss(zs, logits(2, 6, seed=0), 0.5)
    with pytest.raises(ValueError, match="t_start"):
        TAIDSchedule(t_start=0.8, t_end=0.5, total_steps=10)
    with pytest.raises(ValueError, match="beta"):
        TAIDSchedule(beta=1.0, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        TAIDSchedule(total_steps=0)


def naive_schedule(losses: list[float], t_start: float, t_end: float, alpha: float, beta: float,
                   total: int) -> list[float]:
    """The TAID schedule (Shing et al., 2025) written out: the first step only records L_prev (and applies the floor)."""
    t, m, prev, out = t_start, 0.0, None, []
    for step, loss in enumerate(losses, start=1):
        delta = 0.0
        if prev is not None:
            m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
            delta = alpha * (1 / (1 + math.exp(-m))) * (1 - t)
        prev = loss
        t = min(t_end, max(t_start + (t_end - t_start) * step / total, t + delta))
        out.append(t)
    return out


def scripted_losses(n: int) -> list[float]:
    """Fast fall, plateau, a bump and a slow decay: exercises both the adaptive and floor branches."""
    return [3.0 * math.exp(-i / 8) + 0.5 + (0.4 if 20 <= i < 24 else 0.0) + 0.01 * math.sin(i)
            for i in range(n)]


@pytest.mark.parametrize("alpha,beta", [(5e-4, 0.99), (0.05, 0.9), (0.3, 0.5)])
def test_schedule_matches_formulas(alpha: float, beta: float) -> None:
    losses = scripted_losses(60)
    sched = TAIDSchedule(0.4, 1.0, alpha, beta, total_steps=80)
    got = [sched.update(loss, step) for step, loss in enumerate(losses, start=1)]
    want = naive_schedule(losses, 0.4, 1.0, alpha, beta, 80)
    assert got == pytest.approx(want, rel=0, abs=1e-15)
    assert sched.t == got[-1]
    # the large-alpha runs must be driven by the adaptive term, not just the linear floor
    if alpha >= 0.05:
        assert any(t > 0.4 + 0.6 * s / 80 + 1e-9 for s, t in enumerate(got, start=1))


@pytest.mark.parametrize("alpha", [5e-4, 0.2, 1.0])
def test_schedule_bounded_and_monotone(alpha: float) -> None:
    losses = scripted_losses(50) + [10.0, 0.1, 10.0, float("nan"), 1.0, float("inf"), 0.5]
    sched = TAIDSchedule(0.3, 0.9, alpha, 0.9, total_steps=40)
    ts = [sched.t] + [sched.update(loss, step) for step, loss in enumerate(losses, start=1)]
    assert all(0.3 <= t <= 0.9 for t in ts)
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    assert ts[-1] == 0.9                             # past total_steps the floor is t_end
    assert math.isfinite(sched.momentum)             # non-finite losses never reach m


def test_state_round_trip_continues_the_same_trajectory() -> None:
    losses = scripted_losses(40)
    full = TAIDSchedule(alpha=0.1, beta=0.9, total_steps=100)
    ref = [full.update(loss, step) for step, loss in enumerate(losses, start=1)]
    first = TAIDSchedule(alpha=0.1, beta=0.9, total_steps=100)
    for step, loss in enumerate(losses[:17], start=1):
        first.update(loss, step)
    state = json.loads(json.dumps(first.state_dict()))   # JSON-able, exactly
    resumed = TAIDSchedule(alpha=0.1, beta=0.9, total_steps=100)
    resumed.load_state_dict(state)
    rest = [resumed.update(loss, step) for step, loss in enumerate(losses[17:], start=18)]
    assert rest == ref[17:]                              # bit-identical, not approximately
    with pytest.raises(ValueError, match="prev_loss"):
        resumed.load_state_dict({"t": 0.5, "momentum": 0.0})


# -- chunked: lm_head applied chunk by chunk, never (N, V) logits ----------------------------------
def softcapped(h: torch.Tensor, w: torch.Tensor, b, scale: float, cap) -> torch.Tensor:
    z = (h @ w.T + (0 if b is None else b)) * scale
    return z if cap is None else cap * torch.tanh(z / cap)


@pytest.mark.parametrize("head", ["plain", "bias-scale-softcap"])
@pytest.mark.parametrize("t", [0.0, 0.4, 0.85, 1.0])
def test_chunked_taid_equals_dense_formula(t: float, head: str) -> None:
    from llmkd.losses import chunked_divergence

    n, hs, ht, v = 11, 6, 8, 23
    g = torch.Generator().manual_seed(3)
    h_s, w_s = torch.randn(n, hs, generator=g, dtype=torch.float64), torch.randn(v, hs, generator=g, dtype=torch.float64)
    h_t, w_t = torch.randn(n, ht, generator=g, dtype=torch.float64), torch.randn(v, ht, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.25
    extra = head != "plain"
    b_s = torch.randn(v, generator=g, dtype=torch.float64) if extra else None
    kw_head = dict(student_bias=b_s, student_scale=0.7, student_softcap=5.0, teacher_scale=1.3,
                   teacher_softcap=4.0) if extra else {}
    leaves = [x.clone().requires_grad_() for x in (h_s, w_s)] + ([b_s.clone().requires_grad_()] if extra else [])
    for chunk in (1, 4, 64):
        xs = [x.detach().clone().requires_grad_() for x in leaves]
        got = chunked_divergence(xs[0], xs[1], h_t, w_t, "taid", taid_t=t, mask=mask, num_items=13,
                                 chunk_size=chunk, **(kw_head | ({"student_bias": xs[2]} if extra else {})))
        got_grads = torch.autograd.grad(got, xs)
        ys = [x.detach().clone().requires_grad_() for x in leaves]
        zs = softcapped(ys[0], ys[1], ys[2] if extra else None, 0.7 if extra else 1.0, 5.0 if extra else None)
        zt = softcapped(h_t, w_t, None, 1.3 if extra else 1.0, 4.0 if extra else None)
        want = naive_taid(zs, zt, t, mask=mask.double(), num_items=13)
        want_grads = torch.autograd.grad(want, ys)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_chunked_taid_needs_t() -> None:
    from llmkd.losses import chunked_divergence

    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="taid_t"):
        chunked_divergence(h, w, h, w, "taid")
    with pytest.raises(ValueError, match="t=2.0"):
        chunked_divergence(h, w, h, w, "taid", taid_t=2.0)
