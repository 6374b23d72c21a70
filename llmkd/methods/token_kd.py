"""Token-level KD: off-policy (dataset responses), on-policy (student samples, GKD's lambda),
sequence-level (teacher samples), any divergence of `llmkd.losses`, optional CE mix.

The teacher is either live (a model run on the same batch) or offline (top-k log-probs that
`llmkd generate` wrote; the sparse loss with a tail bucket is used then).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmkd.losses import divergence
from llmkd.losses.divergences import check_params, reduce
from llmkd.methods.base import HeadOutput, Method, MethodParams, TeacherTargets
from llmkd.models.head import chunked_divergence_heads, run_head


@dataclass
class TokenKDParams(MethodParams):
    kind: str = "fkl"               # fkl | rkl | jsd | tvd | skew_fkl | skew_rkl
    beta: float = 0.5               # jsd: 0 = forward KL, 1 = reverse KL (TRL GKD convention)
    lam: float = 0.1                # skew_fkl / skew_rkl mixing weight
    temperature: float = 1.0
    lmbda: float = 0.0              # probability that a batch's responses are student samples
    seq_kd: bool = False            # otherwise, responses are teacher samples (sequence-level KD)
    ce_weight: float = 0.0          # + ce_weight * cross-entropy on the batch's labels
    max_new_tokens: int = 64        # on-policy / seq-KD sampling
    gen_temperature: float = 1.0
    top_p: float = 1.0
    chunk_size: int = 1024          # >0: lm_head applied chunk by chunk inside the loss; 0: full logits

    def __post_init__(self) -> None:
        check_params(self.kind, self.beta, self.lam, self.temperature)
        for name in ("lmbda",):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"method.{name}={getattr(self, name)} is outside [0, 1]")
        if self.ce_weight < 0:
            raise ValueError(f"method.ce_weight={self.ce_weight} must be >= 0")
        if self.max_new_tokens < 1 or self.chunk_size < 0:
            raise ValueError("method.max_new_tokens must be >= 1 and method.chunk_size >= 0")
        if not (self.gen_temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"method.gen_temperature={self.gen_temperature} must be > 0 and "
                             f"method.top_p={self.top_p} in (0, 1]")


def shifted_mask(labels: torch.Tensor) -> torch.Tensor:
    """Position i predicts token i+1: the loss mask is labels[:, 1:] != -100."""
    return labels[:, 1:] != -100


def kd_divergence(student: HeadOutput, targets: TeacherTargets, labels: torch.Tensor,
                  p: TokenKDParams, num_items: torch.Tensor | int | None) -> torch.Tensor:
    """The token KD divergence, dispatched on what the teacher and student provided."""
    mask = shifted_mask(labels)
    kw = dict(beta=p.beta, lam=p.lam, temperature=p.temperature, num_items=num_items)
    if targets.topk_ids is not None:
        from llmkd.losses import sparse_divergence

        logits = head_logits(student)
        return sparse_divergence(logits[:, :-1], targets.topk_ids[:, 1:], targets.topk_logprobs[:, 1:],
                                 p.kind, mask=mask, **kw)
    t = targets.output
    if student.logits is None and t.logits is None:
        return chunked_divergence_heads(student.hidden[:, :-1], student.head, t.hidden[:, :-1], t.head,
                                        p.kind, mask=mask, chunk_size=p.chunk_size, **kw)
    # one side fell back to full logits (a head the chunked loss cannot apply): both full
    return divergence(head_logits(student)[:, :-1], head_logits(t)[:, :-1], p.kind, mask=mask, **kw)


def head_logits(out: HeadOutput) -> torch.Tensor:
    """Full logits of a `HeadOutput`, applying its head where only hidden states were kept."""
    return out.logits if out.logits is not None else out.head.logits(out.hidden)


class TokenKD(Method):
    name = "token_kd"
    Params = TokenKDParams

    def __init__(self, params: TokenKDParams, teacher: "torch.nn.Module | None") -> None:
        if teacher is None and (params.lmbda > 0 or params.seq_kd):
            raise ValueError("config: method.lmbda > 0 / method.seq_kd need model.teacher_mode=live: "
                             "offline top-k columns only cover the generated responses, not new samples")
        super().__init__(params, teacher)

    def response_source(self, rng: Any) -> str:
        if self.params.lmbda > 0 and rng.random() < self.params.lmbda:
            return "student"
        return "teacher" if self.params.seq_kd else "dataset"

    def wants_hidden(self) -> bool:
        # CE and the sparse loss need the student's logits; the dense KD alone can stay chunked.
        return (self.hidden_ok and self.params.chunk_size > 0 and self.params.ce_weight == 0
                and self.teacher is not None)

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> TeacherTargets:
        if self.teacher is None:   # offline: the top-k columns written by `llmkd generate`
            if "teacher_topk_ids" not in batch:
                raise ValueError("model.teacher_mode=offline but the data has no teacher_topk_ids column; "
                                 "point data.path at an `llmkd generate` output made with topk > 0")
            return TeacherTargets(topk_ids=batch["teacher_topk_ids"],
                                  topk_logprobs=batch["teacher_topk_logprobs"])
        return TeacherTargets(output=run_head(self.teacher, batch, hidden=self.wants_hidden()))

    def loss(self, student: HeadOutput, targets: TeacherTargets, batch: dict[str, torch.Tensor],
             num_items: torch.Tensor | int | None) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        kd = kd_divergence(student, targets, labels, self.params, num_items)
        metrics = {"kd": kd.item()}
        if self.params.ce_weight == 0:
            return kd, metrics
        logits = head_logits(student)[:, :-1]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(),
                             ignore_index=-100, reduction="none")
        ce = reduce(ce, None, "mean", num_items if num_items is not None else shifted_mask(labels).sum())
        metrics["ce"] = ce.item()
        return kd + self.params.ce_weight * ce, metrics
