"""Token divergence straight from hidden states and lm_head weights, never holding (N, V) logits.

Logits are ``softcap(scale * (hidden @ W.T + bias))`` with softcap(y) = c * tanh(y / c): the
plain head, Phi's bias, Granite/Cohere logit scaling and Gemma 2/3 final-logit soft-capping.

The full logits of a batch (B x S x V floats, twice: student and teacher, plus their softmaxes and
gradients) dominate the memory of a KD step. Here the lm_head is applied to a chunk of tokens at
a time; for each chunk the forward computes the loss *and* its gradient with respect to the
chunk's logits (closed form per divergence), folds that gradient straight into the gradients of
the hidden states and the weight, and drops the chunk. The backward only scales the stored
gradients, so nothing is recomputed (the same trade as Liger's fused linear cross-entropy).

Per chunk only four (chunk, V) buffers exist (five with a soft-capped student, whose tanh the
gradient needs), reused across chunks: allocating fresh (chunk, V) tensors every time costs more
in page faults than the element-wise math itself on CPU.

Mixed precision: with 16-bit hidden states and weights, or under autocast (`bf16: true`), the
three (chunk x H x V) matmuls per chunk run in that 16-bit dtype, as the models' own lm_head
would (a GPU's tensor cores: float32 matmuls run an order of magnitude slower there), through one
more (chunk, V) 16-bit buffer; the softmax, divergence and gradient math stay in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch

from llmkd.losses.divergences import _LOG_FLOOR, check_params, compute_dtype
from llmkd.losses.fused import normalise_kind, run_compiled, use_fused

Buffers = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _rowdot(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) using the spare buffer ``out`` (which may alias a or b)."""
    return torch.mul(a, b, out=out).sum(-1)


def _fused_loss_and_grad(
    buf: Buffers, kind: str, beta: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Per-row divergence and its gradient w.r.t. the (tempered) student logits.

    ``buf[0]``/``buf[1]`` hold student/teacher log-probs s, t; all four buffers are scratch and
    are overwritten. Returns (loss (R,), g, c) with d loss / d logits = c * g (g is None when the
    loss is identically 0). With q = exp(s) and a = d loss / d q, the softmax Jacobian gives
    d loss / d logits = q * (a - sum(q * a)); each branch evaluates that for its kind.
    """
    s, t, b3, b4 = buf
    kind = normalise_kind(kind, beta, lam)
    if kind is None:
        return s.new_zeros(s.shape[0]), None, 0.0
    q = torch.exp(s, out=b3)
    if kind == "taid":  # CE(p_t, q), p_t = softmax((1-t) s + t t_T), t in the beta slot; g = q - p_t
        log_pt = torch.log_softmax(torch.lerp(s, t, beta, out=b4), dim=-1, out=t)
        p_t = torch.exp(log_pt, out=b4)
        return -_rowdot(p_t, s, t), q.sub_(p_t), 1.0
    if kind == "rkl":  # sum q (s - t); a = s - t (+1, cancels)
        d = s.sub_(t)
        loss = _rowdot(q, d, t)
        return loss, d.sub_(loss[:, None]).mul_(q), 1.0
    p = torch.exp(t, out=b4)
    if kind == "fkl":  # sum p (t - s); a = -p / q  ->  g = q - p
        loss = _rowdot(p, t.sub_(s), t)
        return loss, q.sub_(p), 1.0
    if kind == "jsd":  # beta KL(p||m) + (1-beta) KL(q||m); a = (1-beta) (s - log m)
        p_log_p = t.mul_(p).sum(-1)
        log_m = torch.lerp(q, p, beta, out=t).log_().clamp_(min=_LOG_FLOOR)
        kl_p = p_log_p - _rowdot(p, log_m, b4)
        d = s.sub_(log_m)
        kl_q = _rowdot(q, d, b4)
        return beta * kl_p + (1.0 - beta) * kl_q, d.sub_(kl_q[:, None]).mul_(q), 1.0 - beta
    if kind == "tvd":  # 0.5 sum |q - p|; a = 0.5 sign(q - p)
        diff = torch.sub(q, p, out=s)
        sign = torch.sign(diff, out=t)
        loss = 0.5 * diff.mul_(sign).sum(-1)
        return loss, sign.sub_(_rowdot(q, sign, b4)[:, None]).mul_(q), 0.5
    if kind == "skew_fkl":  # KL(p || m), m = lam p + (1-lam) q; a = -(1-lam) p/m
        log_m = torch.lerp(q, p, lam, out=s).log_().clamp_(min=_LOG_FLOOR)
        t_minus = t.sub_(log_m)
        loss = _rowdot(p, t_minus, s)
        r = torch.exp(t_minus, out=s)  # p / m
        return loss, r.sub_(_rowdot(q, r, b4)[:, None]).mul_(q), -(1.0 - lam)
    if kind == "skew_rkl":  # KL(q || m), m = lam q + (1-lam) p; a = s - log m - lam q/m (+1)
        log_m = torch.lerp(p, q, lam, out=t).log_().clamp_(min=_LOG_FLOOR)
        d = s.sub_(log_m)
        loss = _rowdot(q, d, b4)
        a = d.sub_(torch.exp(d, out=t), alpha=lam)
        return loss, a.sub_(_rowdot(q, a, b4)[:, None]).mul_(q), 1.0
    raise ValueError(f"divergence kind={kind!r} is unknown")


def matmul_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype of the chunk matmuls: autocast's when it is on, the inputs' when all are the same
    16-bit dtype, else float32 (or wider, as the softmax math)."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16}:
        return dtypes.pop()
    return functools.reduce(torch.promote_types, dtypes, torch.float32)


def _add_grads(grads: tuple[torch.Tensor | None, ...], g: torch.Tensor, low: torch.Tensor,
               hs: torch.Tensor, ws: torch.Tensor, start: int, end: int, alpha: float) -> None:
    """Fold a chunk's logit gradient ``g`` (compute dtype), times ``alpha``, into the hidden,
    weight and bias gradients. With 16-bit matmuls (``hs``'s dtype) g is first copied into
    ``low``, a spare (chunk, V) buffer of that dtype; accumulation stays in the compute dtype."""
    grad_h, grad_w, grad_b = grads
    if grad_b is not None:
        grad_b.add_(g.sum(0), alpha=alpha)
    if hs.dtype == g.dtype:
        if grad_h is not None:
            torch.mm(g, ws, out=grad_h[start:end]).mul_(alpha)
        if grad_w is not None:
            grad_w.addmm_(g.t(), hs, alpha=alpha)
        return
    g32, g = g, low.copy_(g)
    if grad_h is not None:
        grad_h[start:end] = torch.mm(g, ws)
        grad_h[start:end].mul_(alpha)
    if grad_w is not None and hs.dtype == torch.float16:
        # a chunk's sum over rows of g * h can pass float16's 65504 before any scaling
        grad_w.addmm_(g32.t(), hs.to(g32.dtype), alpha=alpha)
    elif grad_w is not None:
        grad_w.add_(torch.mm(g.t(), hs), alpha=alpha)


def _eager_chunks(h_s: torch.Tensor, h_t: torch.Tensor, ws: torch.Tensor, wt: torch.Tensor,
                  biases: tuple[torch.Tensor | None, torch.Tensor | None], sides: list[tuple[Any, float, float | None]], grads: tuple[torch.Tensor | None, ...],
                  rows: int, opts: dict[str, Any]) -> torch.Tensor:
    """The reference path (`fused: off`): in-place passes over reused buffers, chunk by chunk.
    Returns the summed loss; the gradients are accumulated into ``grads``."""
    kind, beta, lam, dtype, mm_dtype = (opts[k] for k in ("kind", "beta", "lam", "dtype", "mm_dtype"))
    (bs, pre_s, post_s), (bt, pre_t, post_t) = sides
    n, vocab = h_s.shape[0], ws.shape[0]
    total = torch.zeros((), dtype=dtype, device=ws.device)
    n_buf = 4 if post_s is None else 5
    buffers = [torch.empty((rows, vocab), dtype=dtype, device=ws.device) for _ in range(n_buf)]
    low = None if mm_dtype == dtype else torch.empty((rows, vocab), dtype=mm_dtype, device=ws.device)
    # d loss / d u = c * g [* (1 - tanh^2)] * scale / T, averaged over denom tokens.
    coef = opts["student_scale"] * (1.0 / opts["temperature"]) / opts["denom"]
    for start in range(0, n, rows):
        end = min(start + rows, n)
        buf: Buffers = tuple(b[: end - start] for b in buffers[:4])  # type: ignore[assignment]
        th_s = buffers[4][: end - start] if post_s is not None else None
        hs = h_s[start:end].to(mm_dtype)
        ht = h_t[start:end].to(mm_dtype)
        for h, w, b, pre, post, u, out in ((hs, ws, bs, pre_s, post_s, th_s, buf[0]),
                                           (ht, wt, bt, pre_t, post_t, None, buf[1])):
            h = h * pre if pre != 1.0 else h
            u = buf[2] if u is None else u
            if low is not None:   # 16-bit product, float32 from here on
                u.copy_(torch.mm(h, w.t(), out=low[: end - start]))
                if b is not None:
                    u.add_(b)
            elif b is None:
                torch.mm(h, w.t(), out=u)
            else:
                torch.addmm(b, h, w.t(), out=u)
            if post is not None:  # u becomes tanh(.), kept for the student's gradient
                u = torch.mul(u.tanh_(), post, out=buf[2])
            torch.log_softmax(u, dim=-1, out=out).clamp_(min=_LOG_FLOOR)
        loss, g, c = _fused_loss_and_grad(buf, kind, beta, lam)
        total += loss.sum()
        if g is None:
            continue
        if th_s is not None:  # d c tanh(y / c) / dy = 1 - tanh^2
            g.mul_(th_s.mul_(th_s).neg_().add_(1.0))
        _add_grads(grads, g, None if low is None else low[: end - start], hs, ws, start, end, c * coef)
    return total


def _fused_chunks(h_s: torch.Tensor, h_t: torch.Tensor, ws: torch.Tensor, wt: torch.Tensor,
                  biases: tuple[torch.Tensor | None, torch.Tensor | None],
                  sides: list[tuple[Any, float, float | None]], grads: tuple[torch.Tensor | None, ...],
                  rows: int, opts: dict[str, Any]) -> torch.Tensor:
    """`fused: on`: per chunk the two matmuls, one compiled pass (`fused.chunk_math`: bias,
    scale, cap, both softmaxes, loss and gradient), the gradient matmuls. Three (chunk, V)
    buffers: the two raw products (the student's reused for a 16-bit gradient) and the gradient."""
    dtype, mm_dtype = opts["dtype"], opts["mm_dtype"]
    kind = normalise_kind(opts["kind"], opts["beta"], opts["lam"])
    (_, pre_s, post_s), (_, pre_t, post_t) = sides
    n, vocab = h_s.shape[0], ws.shape[0]
    total = torch.zeros((), dtype=dtype, device=ws.device)
    consts = torch.tensor([opts["beta"], opts["lam"], pre_s, post_s or 1.0, pre_t, post_t or 1.0],
                          dtype=dtype, device=ws.device)
    # a 1-row chunk runs as 2 rows (the second all-zero logits, dropped): the compiled graph is
    # dynamic in rows >= 2, and 1 row would compile a second, specialised one
    z_s, z_t = (torch.zeros((max(rows, 2), vocab), dtype=mm_dtype, device=ws.device) for _ in "st")
    g_buf = torch.empty((max(rows, 2), vocab), dtype=dtype, device=ws.device)
    b_s, b_t = (None if b is None else b.to(dtype) for b in biases)
    for start in range(0, n, rows) if kind is not None else ():
        end = min(start + rows, n)
        m = max(end - start, 2)
        if end - start == 1:
            z_s[1].zero_(), z_t[1].zero_()
        hs = h_s[start:end].to(mm_dtype)
        torch.mm(hs, ws.t(), out=z_s[: end - start])
        torch.mm(h_t[start:end].to(mm_dtype), wt.t(), out=z_t[: end - start])
        loss = run_compiled(z_s[:m], z_t[:m], b_s, b_t, consts, g_buf[:m], kind, post_s is not None,
                            post_t is not None)
        total += loss[: end - start].sum()
        _add_grads(grads, g_buf[: end - start], z_s[: end - start], hs, ws, start, end, 1.0 / opts["denom"])
    return total


class _ChunkedDivergence(torch.autograd.Function):
    """Loss in the forward with its gradients; the backward returns them scaled."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h_s: torch.Tensor,
        w_s: torch.Tensor,
        b_s: torch.Tensor | None,
        h_t: torch.Tensor,
        w_t: torch.Tensor,
        b_t: torch.Tensor | None,
        opts: dict[str, Any],
    ) -> torch.Tensor:
        with torch.autocast(h_s.device.type, enabled=False):   # dtypes are chosen explicitly
            return _ChunkedDivergence._forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, opts)

    @staticmethod
    def _forward(ctx: Any, h_s: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None,
                 h_t: torch.Tensor, w_t: torch.Tensor, b_t: torch.Tensor | None,
                 opts: dict[str, Any]) -> torch.Tensor:
        need_h, need_w, need_b = opts["need_grad"]
        inv_t = 1.0 / opts["temperature"]
        dtype, mm_dtype = opts["dtype"], opts["mm_dtype"]
        n, vocab = h_s.shape[0], w_s.shape[0]
        ws, wt = w_s.to(mm_dtype), w_t.to(mm_dtype)
        # u = h W^T + b is multiplied by `pre` on the small hidden chunk and bias, never on the
        # (chunk, V) logits: scale / T without a softcap, scale / c (the tanh input) with one;
        # `post` multiplies tanh(.) into tempered logits (c / T).
        sides = []
        for b, scale, cap in ((b_s, opts["student_scale"], opts["student_softcap"]),
                              (b_t, opts["teacher_scale"], opts["teacher_softcap"])):
            pre = scale / cap if cap is not None else scale * inv_t
            post = None if cap is None else cap * inv_t
            sides.append((None if b is None else b.to(dtype) * pre, pre, post))
        grad_h = torch.zeros(h_s.shape, dtype=dtype, device=h_s.device) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=dtype, device=ws.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=dtype, device=ws.device) if need_b else None
        rows = max(min(opts["chunk_size"], n), 1)
        chunks = _fused_chunks if opts["fused"] else _eager_chunks
        total = chunks(h_s, h_t, ws, wt, (b_s, b_t), sides, (grad_h, grad_w, grad_b), rows, opts)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        return total / opts["denom"]

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = tuple(
            None if g is None else (g * grad_output).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes)
        )
        return grads + (None, None, None, None)


def chunked_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kind: str = "jsd",
    *,
    beta: float = 0.5,
    lam: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
    chunk_size: int = 1024,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    taid_t: float | None = None,
    fused: str | bool = "auto",
) -> torch.Tensor:
    """Mean divergence of ``softcap(scale * (hidden @ weight.T + bias))`` logits, chunk by chunk.

    hidden: (N, H) or (B, S, H); weights (V, H) (teacher and student may differ in H, not V);
    softcap(y) = c * tanh(y / c), none when None. Equals ``divergence(z_s, z_t, kind, ...,
    reduction="mean")`` on those logits: the sum over unmasked tokens divided by ``num_items``
    (global token count, for grad accumulation) or the mask count. Masked rows are dropped before
    any projection. Gradients reach the student hidden states, weight and bias only;
    half-precision inputs are computed in float32. ``kind="taid"`` is TAID's CE(p_t, q) at
    interpolation ``taid_t`` (equals `llmkd.losses.taid_loss` on those logits). ``fused``: the
    per-chunk element-wise math compiled into one pass (`llmkd.losses.fused`): "on", "off" (the
    eager reference) or "auto" (on where it is faster: a GPU with Triton).
    """
    if kind == "taid":
        from llmkd.losses.taid import check_t

        if taid_t is None:
            raise ValueError("kind='taid' needs taid_t, the interpolation t in [0, 1]")
        check_params("fkl", beta, lam, temperature)
        beta = check_t(taid_t)   # the per-chunk kernel reads t from the beta slot
    else:
        check_params(kind, beta, lam, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    for name, value in (("student_scale", student_scale), ("teacher_scale", teacher_scale),
                        ("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value} must be a finite number > 0")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student vocab {student_weight.shape[0]} and teacher vocab {teacher_weight.shape[0]} "
            "differ; token_kd needs one shared vocabulary (for different tokenizers use "
            "method.name=cross_tokenizer)"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
            f"{tuple(teacher_hidden.shape)} cover different token positions"
        )
    for name, h, w in (
        ("student", student_hidden, student_weight),
        ("teacher", teacher_hidden, teacher_weight),
    ):
        if h.shape[-1] != w.shape[1]:
            raise ValueError(f"{name} hidden size {h.shape[-1]} != {name} weight dim {w.shape[1]}")
    positions = tuple(student_hidden.shape[:-1])
    if mask is not None and tuple(mask.shape) != positions:
        raise ValueError(f"mask {tuple(mask.shape)} != token positions {positions}")

    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    count: float = float(h_s.shape[0])
    if mask is not None:
        keep = mask.reshape(-1).nonzero().squeeze(1)
        count = float(keep.numel())
        if keep.numel() != h_s.shape[0]:
            h_s, h_t = h_s.index_select(0, keep), h_t.index_select(0, keep)
    denom = max(float(count if num_items is None else num_items), 1.0)

    grad_on = torch.is_grad_enabled()
    dtype = functools.reduce(
        torch.promote_types,
        [x.dtype for x in (student_hidden, student_weight, teacher_hidden, teacher_weight,
                           student_bias, teacher_bias) if x is not None],
        compute_dtype(student_hidden),
    )
    opts = {
        "kind": kind,
        "beta": beta,
        "lam": lam,
        "temperature": temperature,
        "denom": denom,
        "chunk_size": chunk_size,
        "student_scale": float(student_scale),
        "teacher_scale": float(teacher_scale),
        "student_softcap": None if student_softcap is None else float(student_softcap),
        "teacher_softcap": None if teacher_softcap is None else float(teacher_softcap),
        "dtype": dtype,
        "fused": use_fused(fused, student_hidden.device, dtype),
        "mm_dtype": matmul_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight),
        "need_grad": tuple(
            grad_on and x is not None and x.requires_grad
            for x in (h_s, student_weight, student_bias)
        ),
    }
    return _ChunkedDivergence.apply(
        h_s, student_weight, student_bias, h_t, teacher_weight, teacher_bias, opts
    )
