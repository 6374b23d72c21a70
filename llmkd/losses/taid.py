"""TAID (Shing et al., ICLR 2025): distil towards a target that moves from the student to the teacher.

The target at interpolation t is p_t = softmax((1 - t) · stopgrad(z_S) + t · z_T), mixed in logit
space, and the loss is the cross-entropy CE(p_t, q_S) = -Σ p_t log q_S. Early on (small t) the
target sits close to the student, so a weak student is not pulled towards modes it cannot cover;
t rises to 1 where the loss is forward KL plus a constant (same gradient: q_S - p_T).

`TAIDSchedule` moves t adaptively: a momentum of the relative change of the step loss speeds t up
while the loss is falling fast, and a linear floor from t_start to t_end guarantees progress.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from llmkd.losses.divergences import _LOG_FLOOR, compute_dtype, reduce

# Guards the division by the previous loss (the reference implementation uses the same value).
_EPS = 1e-15


def check_t(t: float) -> float:
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"taid t={t} is outside [0, 1]; 0 = the student itself, 1 = the teacher")
    return t


def taid_target(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                t: float) -> torch.Tensor:
    """Log-probs of p_t = softmax((1 - t) · stopgrad(z_S) + t · z_T), in the compute dtype."""
    t = check_t(t)
    dtype = compute_dtype(student_logits)
    mixed = (1.0 - t) * student_logits.detach().to(dtype) + t * teacher_logits.detach().to(dtype)
    return F.log_softmax(mixed, dim=-1)


def taid_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    t: float,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """CE(p_t, q_S) per position (..., V) -> (...), reduced like `llmkd.losses.divergence`.

    Gradient w.r.t. the student logits: q_S - p_t (p_t carries no gradient).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; TAID needs one shared vocabulary")
    log_p = taid_target(student_logits, teacher_logits, t)
    log_q = F.log_softmax(student_logits.to(log_p.dtype), dim=-1).clamp(min=_LOG_FLOOR)
    values = -(log_p.exp() * log_q).sum(-1)
    return reduce(values, mask, reduction, num_items)


def check_schedule(t_start: float, t_end: float, alpha: float, beta: float, total_steps: int,
                   prefix: str = "") -> None:
    """Fail early, naming the field (`prefix` e.g. "method."), on values the schedule rejects."""
    if not 0.0 <= t_start <= t_end <= 1.0:
        raise ValueError(f"{prefix}t_start={t_start}, {prefix}t_end={t_end}: need "
                         "0 <= t_start <= t_end <= 1 (paper defaults 0.4 and 1.0)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{prefix}alpha={alpha} is outside [0, 1] (paper default 5e-4)")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{prefix}beta={beta} is outside [0, 1) (momentum; paper default 0.99)")
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"{prefix}total_steps={total_steps} must be a positive integer "
                         "(the number of optimizer steps of the run)")


class TAIDSchedule:
    """The adaptive interpolation t; update once per optimizer step with that step's loss.

    With rel = (L_prev - L) / (L_prev + ε): m ← β m + (1 - β) rel; Δ = α · sigmoid(m) · (1 - t);
    t ← min(t_end, max(t_start + (t_end - t_start) · step / total_steps, t + Δ)).
    The first update has no L_prev: it records L and applies only the linear floor. A non-finite
    loss leaves m and L_prev alone (the floor still applies), so one bad step cannot poison m.
    t never decreases and stays in [t_start, t_end]. All state is plain floats (JSON-able).
    """

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 beta: float = 0.99, *, total_steps: int) -> None:
        check_schedule(t_start, t_end, alpha, beta, total_steps)
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.alpha, self.beta = float(alpha), float(beta)
        self.total_steps = int(total_steps)
        self.t = self.t_start
        self.momentum = 0.0
        self.prev_loss: float | None = None

    def floor(self, step: int) -> float:
        """The linear lower bound on t after `step` optimizer steps (t_end from total_steps on)."""
        progress = min(max(step, 0) / self.total_steps, 1.0)
        return self.t_start + (self.t_end - self.t_start) * progress

    def update(self, loss: float, step: int) -> float:
        """Advance t after optimizer step `step` (1-based) whose loss was `loss`; returns the new t."""
        loss = float(loss)
        delta = 0.0
        if math.isfinite(loss):
            if self.prev_loss is not None:
                rel = (self.prev_loss - loss) / (self.prev_loss + _EPS)
                self.momentum = self.beta * self.momentum + (1.0 - self.beta) * rel
                sig = 1.0 / (1.0 + math.exp(-self.momentum))
                delta = self.alpha * sig * (1.0 - self.t)
            self.prev_loss = loss
        self.t = min(self.t_end, max(self.floor(step), self.t + delta))
        return self.t

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"t", "momentum", "prev_loss"} - set(state)
        if missing:
            raise ValueError(f"TAID schedule state lacks {sorted(missing)}; was it saved by "
                             "TAIDSchedule.state_dict()?")
        self.t = check_t(state["t"])
        self.momentum = float(state["momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
