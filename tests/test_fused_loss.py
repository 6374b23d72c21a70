"""`fused: on` (llmkd.losses.fused): the chunked loss's per-chunk math in one compiled pass.

Every kind, head transform, dtype, mask and num_items is checked against the float64 formula
with the fused math run uncompiled (the compiler only changes how it executes, and each Inductor
graph costs ~25 s on a 2-core CPU); two tests then run the real Inductor CPU backend, compare it
with the eager path and count its compilations over changing sequence lengths and TAID's t.
"""
from __future__ import annotations

import pytest
import torch
from test_losses import CASES, HEADS, IDS, chunked_case, student_grads, transformed_logits

from llmkd.losses import chunked_divergence, divergence, taid_loss
from llmkd.losses import fused
from llmkd.methods.params import TokenKDParams

# dtype -> (value rtol/atol, gradient tolerance relative to the largest gradient entry)
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
             torch.bfloat16: (3e-2, 3e-2), torch.float16: (1e-2, 2e-2)}   # inputs rounded to 10 bits


@pytest.fixture
def uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path with `chunk_math` executed eagerly instead of through Inductor."""
    monkeypatch.setattr(fused, "_compiled", fused.chunk_math)


def reference(inputs: dict, kind: str, heads: str | None, taid_t: float | None = None, **kw):
    """The dense formula in float64 on the head written out; (value, student gradients)."""
    wide = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    hs, ht = HEADS[heads] if heads else (dict(scale=1.0, softcap=None), dict(scale=1.0, softcap=None))
    zero = torch.zeros(wide["student_weight"].shape[0], dtype=torch.float64)
    zs = transformed_logits(wide["student_hidden"], wide["student_weight"], wide.get("student_bias", zero), **hs)
    zt = transformed_logits(wide["teacher_hidden"], wide["teacher_weight"], wide.get("teacher_bias", zero), **ht)
    if kind == "taid":
        t = kw.pop("temperature", 1.0)
        want = taid_loss(zs / t, zt / t, taid_t, **kw)
    else:
        want = divergence(zs, zt, kind, **kw)
    return want, student_grads(want, wide)


def heads_kwargs(heads: str | None) -> dict:
    if heads is None:
        return {}
    hs, ht = HEADS[heads]
    return dict(student_scale=hs["scale"], student_softcap=hs["softcap"],
                teacher_scale=ht["scale"], teacher_softcap=ht["softcap"])


def check(inputs: dict, kind: str, heads: str | None, dtype: torch.dtype, chunk_sizes=(1, 4, 64),
          taid_t: float | None = None, **kw) -> None:
    want, g_want = reference(inputs, kind, heads, taid_t, **kw)
    low = {k: v.detach().to(dtype).requires_grad_(v.requires_grad) for k, v in inputs.items()}
    tol, gtol = TOLERANCE[dtype]
    for chunk_size in chunk_sizes:
        got = chunked_divergence(**low, kind=kind, chunk_size=chunk_size, fused="on", taid_t=taid_t,
                                 **heads_kwargs(heads), **kw)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        for a, b in zip(student_grads(got, low), g_want):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, rtol=gtol, atol=gtol * max(b.abs().max().item(), 1e-3))


@pytest.mark.parametrize("kind,beta,lam", CASES, ids=IDS)
@pytest.mark.parametrize("heads", [None, "both", "student_cap"])
def test_fused_math_equals_float64_formula(uncompiled, kind, beta, lam, heads):
    inputs, mask = chunked_case(bias=heads is not None, seed=83)
    check(inputs, kind, heads, torch.float64, beta=beta, lam=lam, temperature=1.5, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["jsd", "rkl", "tvd", "skew_rkl"])
def test_fused_math_low_precision_num_items_and_3d(uncompiled, dtype, kind):
    inputs, mask = chunked_case(bias=True, seed=84)
    shaped = {k: v.reshape(13, 1, -1) if "hidden" in k else v for k, v in inputs.items()}
    want, g_want = reference(inputs, kind, "teacher_cap", mask=mask, num_items=40)
    low = {k: v.detach().to(dtype).requires_grad_(v.requires_grad) for k, v in shaped.items()}
    got = chunked_divergence(**low, kind=kind, mask=mask.reshape(13, 1), num_items=40, chunk_size=3,
                             fused="on", **heads_kwargs("teacher_cap"))
    assert got.dtype == torch.float32
    tol, gtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    for a, b in zip(student_grads(got, low), g_want):
        torch.testing.assert_close(a.double().reshape(b.shape), b, rtol=gtol, atol=gtol * max(b.abs().max().item(), 1e-3))


@pytest.mark.parametrize("heads", [None, "both"])
def test_fused_math_taid(uncompiled, heads):
    inputs, mask = chunked_case(bias=heads is not None, seed=85)
    for t in (0.0, 0.4, 1.0):
        check(inputs, "taid", heads, torch.float64, taid_t=t, mask=mask, num_items=11)
    check(inputs, "taid", heads, torch.bfloat16, chunk_sizes=(5,), taid_t=0.7, mask=mask)


def test_fused_under_autocast_and_all_masked(uncompiled):
    inputs, mask = chunked_case(dtype=torch.float32, bias=True, seed=86)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = chunked_divergence(**inputs, kind="jsd", mask=mask, chunk_size=4, fused="off")
        got = chunked_divergence(**inputs, kind="jsd", mask=mask, chunk_size=4, fused="on")
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)   # same bf16 matmuls
    for a, b in zip(student_grads(got, inputs), student_grads(eager, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    empty = chunked_divergence(**inputs, mask=torch.zeros_like(mask), fused="on")
    assert empty == 0


def test_inductor_cpu_equals_eager_and_compiles_once_over_sequence_lengths():
    """The real compiler (C++ on this CPU): one graph for every sequence length, and a 1-row
    last chunk, with bias, scale and soft-cap on both sides."""
    counters = torch._dynamo.utils.counters
    inputs, _ = chunked_case(dtype=torch.float32, bias=True, seed=87)
    kw = dict(kind="jsd", beta=0.3, temperature=1.5, chunk_size=8, **heads_kwargs("both"))
    before = counters["stats"]["unique_graphs"]
    for n in (13, 9, 5, 12, 2):   # chunks of 8 + 5, 8 + 1, 5, 8 + 4, 2 rows
        part = {k: v[:n] if "hidden" in k else v for k, v in inputs.items()}
        got = chunked_divergence(**part, fused="on", **kw)
        eager = chunked_divergence(**part, fused="off", **kw)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
        for a, b in zip(student_grads(got, inputs), student_grads(eager, inputs)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - before == 1


def test_inductor_cpu_bf16_taid_recompiles_nothing_as_t_moves():
    counters = torch._dynamo.utils.counters
    inputs, mask = chunked_case(bias=False, seed=88)
    low = {k: v.detach().bfloat16().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    before = counters["stats"]["unique_graphs"]
    for t in (0.4, 0.41, 0.9):
        want, g_want = reference(inputs, "taid", None, t, mask=mask)
        got = chunked_divergence(**low, kind="taid", taid_t=t, mask=mask, chunk_size=4, fused="on")
        torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2)
        for a, b in zip(student_grads(got, low), g_want):
            torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2 * b.abs().max().item())
    assert counters["stats"]["unique_graphs"] - before == 1


def test_fused_modes_resolve_and_bad_values_name_the_field():
    cpu = torch.device("cpu")
    assert fused.use_fused("off", cpu, torch.float32) is False
    assert fused.use_fused(False, cpu, torch.float32) is False
    assert fused.use_fused("auto", cpu, torch.float32) is (cpu.type in fused.AUTO_DEVICES)
    assert fused.use_fused("on", cpu, torch.float32) is True     # g++ is on this machine
    with pytest.raises(ValueError, match="no fused kernel for device 'meta'"):
        fused.use_fused("on", torch.device("meta"), torch.float32)
    assert fused.use_fused("auto", torch.device("meta"), torch.float32) is False
    with pytest.raises(ValueError, match="fused='fast' is unknown"):
        chunked_divergence(*(torch.zeros(2, 3) for _ in range(4)), fused="fast")
    assert TokenKDParams(fused=True).fused == "on"   # YAML 1.1 reads a bare `on` as true
    with pytest.raises(ValueError, match=r"method\.fused='yes please' is unknown; use one of auto, on, off"):
        TokenKDParams(fused="yes please")


def test_method_fused_reaches_the_loss(monkeypatch: pytest.MonkeyPatch):
    """`method.fused` of a token_kd / taid config is the mode the chunked loss resolves."""
    from llmkd.losses import chunked
    from llmkd.methods.base import HeadOutput, TeacherTargets
    from llmkd.methods.common import kd_divergence
    from llmkd.models.head import LMHead

    seen = []
    real = chunked.use_fused
    monkeypatch.setattr(chunked, "use_fused", lambda mode, *a: seen.append(mode) or real(mode, *a))
    head = LMHead(weight=torch.randn(11, 4))
    out = HeadOutput(hidden=torch.randn(2, 5, 4), head=head)
    labels = torch.ones(2, 5, dtype=torch.long)
    kd_divergence(out, TeacherTargets(output=out), labels, TokenKDParams(fused="off"), None)
    assert seen == ["off"]
