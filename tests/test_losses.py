"""Divergences (dense, sparse top-k, chunked) against the formulas written out in float64."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from llmkd.losses import chunked_divergence, divergence, sparse_divergence

# (kind, beta, lam) cases covering every kind and the jsd / skew end points.
CASES = [
    ("fkl", 0.5, 0.1),
    ("rkl", 0.5, 0.1),
    ("jsd", 0.0, 0.1),
    ("jsd", 0.3, 0.1),
    ("jsd", 0.5, 0.1),
    ("jsd", 1.0, 0.1),
    ("tvd", 0.5, 0.1),
    ("skew_fkl", 0.5, 0.1),
    ("skew_fkl", 0.5, 0.0),
    ("skew_rkl", 0.5, 0.1),
    ("skew_rkl", 0.5, 0.0),
]
IDS = [f"{k}-b{b}-l{l}" for k, b, l in CASES]


def naive_from_probs(
    p: torch.Tensor, q: torch.Tensor, kind: str, beta: float, lam: float
) -> torch.Tensor:
    """The papers' formulas, literally: p teacher, q student, summed over the last dim."""
    if kind == "jsd" and beta == 0.0:
        kind = "fkl"
    if kind == "jsd" and beta == 1.0:
        kind = "rkl"
    if kind == "fkl":
        return (p * torch.log(p / q)).sum(-1)
    if kind == "rkl":
        return (q * torch.log(q / p)).sum(-1)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * torch.log(p / m)).sum(-1) + (1 - beta) * (q * torch.log(q / m)).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_fkl":
        return (p * torch.log(p / (lam * p + (1 - lam) * q))).sum(-1)
    if kind == "skew_rkl":
        return (q * torch.log(q / (lam * q + (1 - lam) * p))).sum(-1)
    raise AssertionError(kind)


def softmax(z: torch.Tensor, temperature: float) -> torch.Tensor:
    e = torch.exp(z / temperature - (z / temperature).max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def naive(zs, zt, kind, beta, lam, temperature, mask=None, reduction="mean", num_items=None):
    values = naive_from_probs(softmax(zt, temperature), softmax(zs, temperature), kind, beta, lam)
    if mask is not None:
        values = values * mask
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    count = mask.sum() if mask is not None else values.numel()
    return values.sum() / (num_items if num_items is not None else count)


def logits(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


MASK = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.float64)


# --------------------------------------------------------------------------- dense


@pytest.mark.parametrize("kind,beta,lam", CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_matches_naive_values_and_grads(kind, beta, lam, temperature):
    zs, zt = logits(2, 5, 11, seed=1), logits(2, 5, 11, seed=2)
    for reduction, num_items in (("mean", None), ("mean", 17), ("sum", None), ("none", None)):
        kw = dict(mask=MASK, reduction=reduction, num_items=num_items)
        got, g_got = grad(
            lambda z: divergence(z, zt, kind, beta=beta, lam=lam, temperature=temperature, **kw), zs
        )
        want, g_want = grad(lambda z: naive(z, zt, kind, beta, lam, temperature, **kw), zs)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    # masked positions get no gradient
    _, g = grad(lambda z: divergence(z, zt, kind, beta=beta, lam=lam, mask=MASK), zs)
    assert g[MASK == 0].abs().max() == 0


def test_dense_without_mask_is_plain_mean():
    zs, zt = logits(3, 7, seed=3), logits(3, 7, seed=4)
    torch.testing.assert_close(divergence(zs, zt, "jsd"), naive(zs, zt, "jsd", 0.5, 0.1, 1.0))
    assert divergence(zs, zs, "fkl").abs() < 1e-12


def test_skew_lam_one_is_zero_with_a_gradient_path():
    zs = logits(2, 6, seed=5).requires_grad_()
    loss = divergence(zs, logits(2, 6, seed=6), "skew_fkl", lam=1.0)
    loss.backward()
    assert loss == 0 and zs.grad.abs().max() == 0


def test_float32_input_computes_in_float32_and_bf16_upcasts():
    zs, zt = logits(4, 9, seed=7), logits(4, 9, seed=8)
    want = divergence(zs, zt, "jsd")
    assert divergence(zs.float(), zt.float(), "jsd").dtype == torch.float32
    low = divergence(zs.bfloat16(), zt.bfloat16(), "jsd")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), want, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("fn", ["dense", "sparse", "chunked"])
def test_bad_parameters_raise_naming_them(fn):
    zs, zt = logits(2, 6, seed=9), logits(2, 6, seed=10)
    ids = torch.arange(6).expand(2, 6)

    def call(**kw):
        if fn == "dense":
            return divergence(zs, zt, "jsd", **kw)
        if fn == "sparse":
            return sparse_divergence(zs, ids, zt.log_softmax(-1), "jsd", **kw)
        w = logits(6, 3, seed=11)
        return chunked_divergence(logits(2, 3, seed=12), w, logits(2, 3, seed=13), w, "jsd", **kw)

    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            call(beta=bad)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            call(temperature=bad)
    with pytest.raises(ValueError, match="lam"):
        call(lam=2.0)


def test_mismatched_vocab_raises():
    with pytest.raises(ValueError, match="vocab"):
        divergence(logits(2, 6, seed=1), logits(2, 7, seed=2))
    with pytest.raises(ValueError, match="vocabulary"):
        ids = torch.tensor([[0, 6], [1, 2]])
        sparse_divergence(logits(2, 6, seed=1), ids, torch.full((2, 2), -1.0))
    h = logits(2, 3, seed=3)
    with pytest.raises(ValueError, match="vocab"):
        chunked_divergence(h, logits(6, 3, seed=4), h, logits(7, 3, seed=5))
    with pytest.raises(ValueError, match="kind"):
        divergence(logits(2, 6, seed=1), logits(2, 6, seed=2), "kl")


# --------------------------------------------------------------------------- TRL GKD


@pytest.fixture(scope="module")
def trl_gkd_loss():
    with warnings.catch_warnings():  # trl.experimental announces itself as unstable
        warnings.simplefilter("ignore")
        gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_agrees_with_trl_gkd(trl_gkd_loss, beta, temperature):
    zs, zt = logits(2, 5, 13, seed=20), logits(2, 5, 13, seed=21)
    labels = torch.tensor([[3, 4, -100, 1, 2], [-100, 0, 5, 6, -100]])
    ours = divergence(zs, zt, "jsd", beta=beta, temperature=temperature, mask=labels != -100)
    theirs = trl_gkd_loss(
        zs, zt, labels=labels, beta=beta, temperature=temperature, reduction="batchmean"
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- sparse


@pytest.mark.parametrize("kind,beta,lam", CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_full_vocab_equals_dense(kind, beta, lam, temperature):
    zs, zt = logits(2, 5, 11, seed=30), logits(2, 5, 11, seed=31)
    logp, ids = zt.log_softmax(-1).sort(-1, descending=True)  # k = V, in teacher order
    kw = dict(beta=beta, lam=lam, temperature=temperature, mask=MASK)
    for reduction in ("mean", "none"):
        got, g_got = grad(
            lambda z: sparse_divergence(z, ids, logp, kind, reduction=reduction, **kw), zs
        )
        want, g_want = grad(lambda z: divergence(z, zt, kind, reduction=reduction, **kw), zs)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)
    # float32 teacher log-probs do not sum to exactly 1: the rounding must not become a tail.
    got32 = sparse_divergence(zs.float(), ids, logp.float(), kind, **kw)
    torch.testing.assert_close(got32.double(), divergence(zs, zt, kind, **kw), rtol=0, atol=1e-6)


def naive_tail_bucket(zs, ids, teacher_logp, kind, beta, lam, temperature):
    """Teacher: top-k probs + 1 - their sum; student: its probs at ids + 1 - their sum; tempered."""
    p_bins = torch.cat([teacher_logp.exp(), 1 - teacher_logp.exp().sum(-1, keepdim=True)], -1)
    p_bins = p_bins ** (1 / temperature)
    p_bins = p_bins / p_bins.sum(-1, keepdim=True)
    q = softmax(zs, temperature)
    q_top = q.gather(-1, ids)
    q_bins = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    return naive_from_probs(p_bins, q_bins, kind, beta, lam)


@pytest.mark.parametrize("kind,beta,lam", CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_topk_matches_naive_tail_bucket(kind, beta, lam, temperature):
    zs, zt = logits(2, 5, 23, seed=40), logits(2, 5, 23, seed=41)
    logp, ids = zt.log_softmax(-1).topk(4, dim=-1)
    kw = dict(beta=beta, lam=lam, temperature=temperature)
    got, g_got = grad(
        lambda z: sparse_divergence(z, ids, logp, kind, reduction="none", **kw), zs
    )
    want, g_want = grad(lambda z: naive_tail_bucket(z, ids, logp, kind, beta, lam, temperature), zs)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
def test_sparse_padding_ids_are_ignored(kind):
    zs, zt = logits(2, 5, 23, seed=50), logits(2, 5, 23, seed=51)
    logp, ids = zt.log_softmax(-1).topk(4, dim=-1)
    pad_ids = torch.cat([ids, torch.full((2, 5, 3), -1)], -1)
    pad_logp = torch.cat([logp, torch.zeros(2, 5, 3, dtype=logp.dtype)], -1)
    got, g_got = grad(lambda z: sparse_divergence(z, pad_ids, pad_logp, kind, mask=MASK), zs)
    want, g_want = grad(lambda z: sparse_divergence(z, ids, logp, kind, mask=MASK), zs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind,beta,lam", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_empty_teacher_tail_is_finite(kind, beta, lam, dtype):
    zs = logits(2, 5, 9, seed=60).to(dtype)
    ids = torch.tensor([0, 3]).expand(2, 5, 2)
    half = torch.full((2, 5, 2), 0.5, dtype=dtype).log()  # all teacher mass in the top-2
    for temperature in (1.0, 3.0):
        kw = dict(beta=beta, lam=lam, temperature=temperature)
        value, g = grad(lambda z: sparse_divergence(z, ids, half, kind, **kw), zs)
        assert torch.isfinite(value).all() and torch.isfinite(g).all()


def test_sparse_shape_errors():
    zs = logits(2, 5, 9, seed=70)
    with pytest.raises(ValueError, match="same shape"):
        sparse_divergence(zs, torch.zeros(2, 5, 3, dtype=torch.long), torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match="positions"):
        sparse_divergence(zs, torch.zeros(2, 4, 3, dtype=torch.long), torch.zeros(2, 4, 3))


# --------------------------------------------------------------------------- chunked


def chunked_case(dtype=torch.float64, bias=False, seed=80):
    n, hs, ht, v = 13, 6, 5, 17
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    inputs = dict(
        student_hidden=make(n, hs).requires_grad_(),
        student_weight=make(v, hs).requires_grad_(),
        teacher_hidden=make(n, ht),
        teacher_weight=make(v, ht),
    )
    if bias:
        inputs["student_bias"] = make(v).requires_grad_()
        inputs["teacher_bias"] = make(v)
    mask = torch.ones(n, dtype=torch.bool)
    mask[[2, 3, 9]] = False
    return inputs, mask


def dense_reference(inputs, kind, **kw):
    zs = inputs["student_hidden"] @ inputs["student_weight"].T
    zt = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
    if "student_bias" in inputs:
        zs, zt = zs + inputs["student_bias"], zt + inputs["teacher_bias"]
    return divergence(zs, zt, kind, **kw)


def student_grads(loss, inputs):
    names = ("student_hidden", "student_weight", "student_bias")
    params = [inputs[k] for k in names if k in inputs]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("kind,beta,lam", CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_equals_unchunked(kind, beta, lam, temperature):
    inputs, mask = chunked_case()
    kw = dict(beta=beta, lam=lam, temperature=temperature, mask=mask)
    want = dense_reference(inputs, kind, **kw)
    g_want = student_grads(want, inputs)
    for chunk_size in (1, 4, 10, 13, 64):  # 4 and 10 do not divide the 10 unmasked rows evenly
        got = chunked_divergence(**inputs, kind=kind, chunk_size=chunk_size, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for a, b in zip(student_grads(got, inputs), g_want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
def test_chunked_bias_num_items_and_3d(kind):
    inputs, mask = chunked_case(bias=True)
    shaped = {k: v.reshape(13, 1, -1) if "hidden" in k else v for k, v in inputs.items()}
    want = dense_reference(inputs, kind, mask=mask, num_items=40, temperature=1.5)
    got = chunked_divergence(
        **shaped, kind=kind, mask=mask.reshape(13, 1), num_items=40, chunk_size=3, temperature=1.5
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(student_grads(got * 3, inputs), student_grads(want * 3, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_float32_and_bf16():
    inputs, mask = chunked_case()
    want = dense_reference(inputs, "jsd", mask=mask)
    g_want = student_grads(want, inputs)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        low = {k: v.detach().to(dtype).requires_grad_(v.requires_grad) for k, v in inputs.items()}
        got = chunked_divergence(**low, kind="jsd", mask=mask, chunk_size=4)
        assert got.dtype == torch.float32
        grads = student_grads(got, low)
        assert [g.dtype for g in grads] == [dtype, dtype]
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        for a, b in zip(grads, g_want):
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * b.abs().max().item())


def test_chunked_under_autocast_runs_its_matmuls_in_bf16():
    """Mixed precision (`bf16: true`): float32 inputs, bf16 matmuls, float32 loss and gradients."""
    from llmkd.losses.chunked import matmul_dtype

    inputs, mask = chunked_case(dtype=torch.float32, bias=True)
    wide = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    want = dense_reference(wide, "jsd", mask=mask)
    exact = chunked_divergence(**inputs, kind="jsd", mask=mask, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul_dtype(*inputs.values()) == torch.bfloat16
        got = chunked_divergence(**inputs, kind="jsd", mask=mask, chunk_size=4)
    assert matmul_dtype(*inputs.values()) == torch.float32
    grads = student_grads(got, inputs)
    assert got.dtype == torch.float32 and [g.dtype for g in grads] == [torch.float32] * 3
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2)
    assert abs(float(got.detach()) - float(exact.detach())) > 1e-6   # the matmuls ran in bf16
    for a, b in zip(grads, student_grads(want, wide)):
        torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


def test_chunked_no_teacher_grad_no_grad_mode_and_all_masked():
    inputs, mask = chunked_case()
    inputs["teacher_hidden"].requires_grad_()
    loss = chunked_divergence(**inputs, mask=mask)
    loss.backward()
    assert inputs["teacher_hidden"].grad is None
    with torch.no_grad():
        torch.testing.assert_close(chunked_divergence(**inputs, mask=mask), loss.detach())
    inputs["student_hidden"].grad = None
    empty = chunked_divergence(**inputs, mask=torch.zeros_like(mask))
    empty.backward()
    assert empty == 0 and inputs["student_hidden"].grad.abs().max() == 0


# (student, teacher) logit transforms: Phi's bias, Granite/Cohere scales, Gemma 2 soft-capping
HEADS = {
    "both": (dict(scale=0.5, softcap=1.5), dict(scale=3.0, softcap=2.5)),
    "student_cap": (dict(scale=1.0, softcap=2.0), dict(scale=0.25, softcap=None)),
    "teacher_cap": (dict(scale=4.0, softcap=None), dict(scale=1.0, softcap=3.0)),
}


def transformed_logits(h, w, b, scale, softcap):
    """The head written out: softcap(scale * (h W^T + b)), softcap(y) = c tanh(y / c)."""
    z = scale * (h @ w.T + b)
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@pytest.mark.parametrize("kind,beta,lam", CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("heads", list(HEADS))
def test_chunked_bias_scale_softcap_equals_dense(kind, beta, lam, temperature, heads):
    inputs, mask = chunked_case(bias=True, seed=81)
    (hs, ht) = HEADS[heads]
    zs = transformed_logits(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"], **hs)
    zt = transformed_logits(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"], **ht)
    assert zs.abs().max() > 1.0 and zt.abs().max() > 1.0  # the caps and scales change the result
    kw = dict(beta=beta, lam=lam, temperature=temperature, mask=mask)
    want = divergence(zs, zt, kind, **kw)
    g_want = student_grads(want, inputs)
    heads_kw = dict(student_scale=hs["scale"], student_softcap=hs["softcap"],
                    teacher_scale=ht["scale"], teacher_softcap=ht["softcap"])
    for chunk_size in (1, 4, 64):
        got = chunked_divergence(**inputs, kind=kind, chunk_size=chunk_size, **heads_kw, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for a, b in zip(student_grads(got, inputs), g_want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the plain head (what the chunked loss computed before scales and caps) is a different loss
    plain = chunked_divergence(**inputs, kind=kind, **kw)
    if kind != "skew_fkl" or lam != 1.0:
        assert not torch.allclose(plain, want, rtol=1e-3)


def test_chunked_softcap_float32():
    inputs, mask = chunked_case(bias=True, seed=82)
    h_s, w_s, b_s = (inputs[f"student_{k}"] for k in ("hidden", "weight", "bias"))
    h_t, w_t, b_t = (inputs[f"teacher_{k}"] for k in ("hidden", "weight", "bias"))
    zs, zt = transformed_logits(h_s, w_s, b_s, 0.5, 1.5), transformed_logits(h_t, w_t, b_t, 2.0, 3.0)
    want = divergence(zs, zt, "jsd", mask=mask)
    g_want = student_grads(want, inputs)
    low = {k: v.detach().float().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    got = chunked_divergence(**low, kind="jsd", mask=mask, chunk_size=4, student_scale=0.5,
                             student_softcap=1.5, teacher_scale=2.0, teacher_softcap=3.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for a, b in zip(student_grads(got, low), g_want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("name", ["student_scale", "teacher_scale", "student_softcap", "teacher_softcap"])
def test_chunked_bad_scale_or_softcap_raises(name):
    inputs, _ = chunked_case()
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=name):
            chunked_divergence(**inputs, **{name: bad})


# --------------------------------------------------------------------------- confident sparse teacher


def confident_teacher(vocab=64, k=20, seed=90):
    """A float32 teacher whose top-k log-probs sum to 1 in float32 although k < V (a confident
    teacher: its top-1 log-prob rounds to 0), as vLLM / the embedded teacher store them; also
    the teacher's true tail mass, in float64."""
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(2, 3, vocab, generator=g, dtype=torch.float64)
    zt[..., 5] += 25.0
    logp, ids = torch.log_softmax(zt.float(), -1).topk(k, dim=-1)
    assert (torch.logsumexp(logp, -1) >= 0).all()  # the tail rounds to nothing in float32
    true_tail = 1 - torch.log_softmax(zt, -1).gather(-1, ids).exp().sum(-1)
    assert (true_tail > 0).all() and (true_tail < 1e-9).all()
    return logp, ids, true_tail


def naive_with_tail(zs, ids, teacher_logp, kind, beta, tail):
    """Top-k bins + a teacher tail of exactly `tail`, renormalised; float64 throughout."""
    tail = torch.as_tensor(tail, dtype=torch.float64).expand(teacher_logp.shape[:-1])
    p_bins = torch.cat([teacher_logp.exp(), tail[..., None]], -1)
    p_bins = p_bins / p_bins.sum(-1, keepdim=True)
    q = softmax(zs, 1.0)
    q_top = q.gather(-1, ids)
    q_bins = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    return naive_from_probs(p_bins, q_bins, kind, beta, 0.1)


@pytest.mark.parametrize("kind,beta", [("rkl", 0.5), ("jsd", 1.0), ("jsd", 0.5), ("skew_rkl", 0.5)])
def test_sparse_confident_teacher_tail_is_small_not_empty(kind, beta):
    logp, ids, true_tail = confident_teacher()
    zs = logits(2, 3, 64, seed=91)  # a student that still puts mass outside the teacher's top-k
    eps = torch.finfo(torch.float32).eps
    got, g_got = grad(lambda z: sparse_divergence(z.float(), ids, logp, kind, beta=beta,
                                                  reduction="none"), zs)
    # exact: the formula with the teacher tail floored at float32 resolution
    want, g_want = grad(lambda z: naive_with_tail(z, ids, logp.double(), kind, beta, eps), zs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-5)
    # sane: no more than the teacher's true (smaller) tail would charge, and gradients bounded by
    # the log-ratios (|log eps| = 16 nats); an empty tail charged about q_tail * 1e4 here.
    true = naive_with_tail(zs, ids, logp.double(), kind, beta, true_tail)
    assert (got.double() <= true + 1e-6).all() and (got > 0).all()
    assert g_got.abs().max() < 2 * abs(math.log(eps))


def test_chunked_fp16_weight_gradient_does_not_overflow():
    """Under fp16 autocast a chunk's weight-gradient sum (rows x g x h) can pass 65504 before any
    scaling: it must be formed in float32 (bf16 has the range)."""
    torch.manual_seed(0)
    n, h, v = 2048, 16, 64
    hidden = torch.randn(n, h)
    hidden[:, 0] = 80.0                                   # one large hidden dimension
    w_s = 0.01 * torch.randn(v, h)
    w_s[0, 0] = 0.2                                       # the student sits on token 0
    h_t, w_t = torch.randn(n, h), torch.randn(v, h)
    grads = []
    for dtype in (None, torch.float16):
        w = w_s.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = chunked_divergence(hidden, w, h_t, w_t, "fkl", chunk_size=1024)
        loss.backward()
        grads.append(w.grad)
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=2e-2 * grads[0].abs().max().item())
