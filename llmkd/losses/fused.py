"""The chunked loss's element-wise math as one function for a compiler: `method.fused`.

Between a chunk's matmuls the eager path (`chunked._fused_loss_and_grad`) runs a dozen whole-chunk
passes (bias, soft-cap, both log-softmaxes, the divergence, its gradient), each reading and
writing the (chunk, V) block. `chunk_math` is the same closed-form math written functionally,
so `torch.compile` (Inductor: Triton on a GPU, C++ on a CPU) fuses it into a few row-wise loops
that read the two logit blocks and write the gradient once. The eager path stays the reference
and the fallback.

One compiled graph per (kind, head flags, dtype, device): the chunk's row count is marked
dynamic (a short last chunk or a new sequence length reuses the graph), beta / lam / TAID's t
and the head constants travel as one tensor (TAID's t changing every step recompiles nothing).
"""
from __future__ import annotations

import logging
import shutil
import time
from typing import Any, Callable

import torch

from llmkd.losses.divergences import _LOG_FLOOR
from llmkd.validation import check_fused

log = logging.getLogger("llmkd")

# Where `fused: auto` turns the compiled path on: only where it was measured faster. On the 2-core
# CPU it is not faster at SmolLM2 sizes (1.28x vs the eager 1.20x of the matmul floor, CPU seconds,
# in one run: benchmarks/results/loss_memory.json), ~9 % faster only where the element-wise work
# dominates, and each process pays ~25 s of compile. On a GPU the eager passes are the bottleneck
# (8.2x the matmul floor on an H200), but the compiled path has not run on a GPU yet
# (benchmarks/gpu_suite.sh measures it): until it has, auto stays eager there too.
AUTO_DEVICES: tuple[str, ...] = ()


def _rowsum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(-1, keepdim=True)


def _divergence_grad(s: torch.Tensor, t: torch.Tensor, kind: str, beta: torch.Tensor,
                     lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (R, 1), d loss / d student logits (R, V)) from clamped log-probs s, t.

    The forms of `chunked._fused_loss_and_grad`: with q = exp(s) and a = d loss / d q, the softmax
    Jacobian gives q * (a - sum(q * a)). Kinds are already normalised (`normalise_kind`).
    """
    q = s.exp()
    if kind == "taid":   # CE(p_t, q), p_t = softmax((1-t) s + t t_T), t in the beta slot
        p_t = torch.softmax(torch.lerp(s, t, beta), dim=-1)
        return -_rowsum(p_t * s), q - p_t
    if kind == "rkl":
        d = s - t
        loss = _rowsum(q * d)
        return loss, q * (d - loss)
    p = t.exp()
    if kind == "fkl":
        return _rowsum(p * (t - s)), q - p
    if kind == "jsd":
        log_m = torch.lerp(q, p, beta).log().clamp(min=_LOG_FLOOR)
        kl_p = _rowsum(p * (t - log_m))
        d = s - log_m
        kl_q = _rowsum(q * d)
        return beta * kl_p + (1.0 - beta) * kl_q, (1.0 - beta) * q * (d - kl_q)
    if kind == "tvd":
        sign = torch.sign(q - p)
        return 0.5 * _rowsum((q - p).abs()), 0.5 * q * (sign - _rowsum(q * sign))
    if kind == "skew_fkl":
        t_minus = t - torch.lerp(q, p, lam).log().clamp(min=_LOG_FLOOR)
        r = t_minus.exp()   # p / m
        return _rowsum(p * t_minus), (lam - 1.0) * q * (r - _rowsum(q * r))
    if kind == "skew_rkl":
        d = s - torch.lerp(p, q, lam).log().clamp(min=_LOG_FLOOR)
        a = d - lam * d.exp()
        return _rowsum(q * d), q * (a - _rowsum(q * a))
    raise ValueError(f"divergence kind={kind!r} is unknown")


def _log_probs(z: torch.Tensor, bias: torch.Tensor | None, pre: torch.Tensor, post: torch.Tensor,
               capped: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clamped log-softmax of one side's tempered logits from its raw matmul output, and the
    soft-cap's tanh (None without one), which the student's gradient needs."""
    u = z.to(dtype)
    if bias is not None:
        u = u + bias
    u = u * pre
    th = None
    if capped:
        th = torch.tanh(u)
        u = th * post
    return torch.log_softmax(u, dim=-1).clamp(min=_LOG_FLOOR), th


def chunk_math(z_s: torch.Tensor, z_t: torch.Tensor, b_s: torch.Tensor | None, b_t: torch.Tensor | None,
               consts: torch.Tensor, grad_out: torch.Tensor, kind: str, cap_s: bool, cap_t: bool) -> torch.Tensor:
    """Per-row loss of one chunk; writes d loss / d (h W^T + b) into ``grad_out`` (its dtype is
    the compute dtype), up to the head's scale / T and the mean's 1 / denom.

    z_s, z_t: the chunk's raw matmul outputs (any float dtype; no bias, scale or cap yet);
    consts: [beta (or TAID's t), lam, pre_s, post_s, pre_t, post_t] (see `chunked`): u = pre *
    (z + b), logits = post * tanh(u) with a cap, else u.
    """
    dtype = grad_out.dtype
    beta, lam, pre_s, post_s, pre_t, post_t = consts.to(dtype).unbind()
    s, th = _log_probs(z_s, b_s, pre_s, post_s, cap_s, dtype)
    t, _ = _log_probs(z_t, b_t, pre_t, post_t, cap_t, dtype)
    loss, g = _divergence_grad(s, t, kind, beta, lam)
    if th is not None:   # d post tanh(u) / du = post (1 - tanh^2); post * pre = scale / T
        g = g * (post_s * pre_s) * (1.0 - th * th)
    else:
        g = g * pre_s
    grad_out.copy_(g)
    return loss.squeeze(-1)


def normalise_kind(kind: str, beta: float, lam: float) -> str | None:
    """The kind the math runs (jsd at beta 0 / 1 is fkl / rkl, skew at lam 0 is plain), None
    when the loss is identically 0 (skew at lam 1)."""
    if kind == "jsd" and beta in (0.0, 1.0):
        return "fkl" if beta == 0.0 else "rkl"
    if kind in ("skew_fkl", "skew_rkl") and lam in (0.0, 1.0):
        return None if lam == 1.0 else kind[5:]
    return kind


def compiler_available(device: torch.device) -> str | None:
    """None when torch.compile can build the chunk math on ``device``, else why not."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    if device.type == "cpu":
        return None if shutil.which("g++") or shutil.which("c++") else "no C++ compiler (g++) on PATH"
    return f"no fused kernel for device {device.type!r}"


def use_fused(mode: str | bool, device: torch.device, dtype: torch.dtype) -> bool:
    """Resolve `fused: auto | on | off` for one call: auto is on where the compiled path is
    faster (`AUTO_DEVICES`) and available; on without a compiler is an error naming the fix."""
    mode = check_fused(mode)
    if mode == "off":
        return False
    missing = compiler_available(device)
    if mode == "on":
        if missing:
            raise ValueError(f"method.fused=on but {missing}; set method.fused: auto or off")
        return True
    return missing is None and device.type in AUTO_DEVICES and dtype != torch.float64


# Inductor realizes an intermediate read by several reductions as a (chunk, V) buffer (four of
# them here by default: fresh allocations, page faults on a CPU, memory traffic on a GPU); these
# thresholds make it recompute them in registers instead. On this 2-core CPU (N 2048, V 16384,
# H 64, jsd, fwd+bwd, CPU seconds): eager 0.83, compiled 0.86 by default, 0.76 with them.
INDUCTOR_OPTIONS = {"realize_reads_threshold": 1000, "realize_opcount_threshold": 10000,
                    "realize_acc_reads_threshold": 1000}
_compiled: Callable[..., torch.Tensor] | None = None
_logged: set[tuple[Any, ...]] = set()


def run_compiled(z_s: torch.Tensor, z_t: torch.Tensor, b_s: torch.Tensor | None, b_t: torch.Tensor | None,
                 consts: torch.Tensor, grad_out: torch.Tensor, kind: str, cap_s: bool,
                 cap_t: bool) -> torch.Tensor:
    """`chunk_math` through torch.compile, rows marked dynamic; the first call of each graph logs
    its compile time (once per process)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(chunk_math, fullgraph=True, options=INDUCTOR_OPTIONS)
    rows = z_s.shape[0]
    if rows > 1:   # 0 / 1 rows would specialise the graph: never mark them
        for x in (z_s, z_t, grad_out):
            torch._dynamo.mark_dynamic(x, 0)
    key = (kind, cap_s, cap_t, b_s is not None, b_t is not None, z_s.dtype, z_t.dtype,
           grad_out.dtype, z_s.device.type)
    if key in _logged:
        return _compiled(z_s, z_t, b_s, b_t, consts, grad_out, kind, cap_s, cap_t)
    start = time.perf_counter()
    out = _compiled(z_s, z_t, b_s, b_t, consts, grad_out, kind, cap_s, cap_t)
    _logged.add(key)
    log.info("fused chunk loss: compiled %s (%s logits, %s math, %s) in %.1f s", kind, z_s.dtype,
             grad_out.dtype, z_s.device.type, time.perf_counter() - start)
    return out
