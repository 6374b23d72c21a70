"""Token-level KD: off-policy (dataset responses), on-policy (student samples, GKD's lambda),
sequence-level (teacher samples), any divergence of `llmkd.losses`, optional CE mix.

The teacher is either live (a model run on the same batch), offline (top-k log-probs that
`llmkd generate` wrote) or served (top-k log-probs from a vLLM server, `model.teacher_server`);
the sparse loss with a tail bucket is used for the last two.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmkd.losses import divergence
from llmkd.losses.divergences import reduce
from llmkd.methods.base import HeadOutput, Method, TeacherTargets, as_mean
from llmkd.methods.params import TokenKDParams   # torch-free: configs validate before torch loads
from llmkd.models.head import chunked_divergence_heads, run_head
from llmkd.sampling import SamplingSpec


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


def offline_hidden(batch: dict[str, torch.Tensor], head: Any, dtype: str) -> HeadOutput:
    """The stored teacher hidden states of a batch with the stored head, on the batch's device."""
    from llmkd.data.hidden import COLUMN

    if COLUMN not in batch:
        raise ValueError("model.teacher_mode=offline with a teacher head but the data has no "
                         f"{COLUMN} column; point data.path at an `llmkd generate` dir made with "
                         "targets=hidden")
    bits = batch[COLUMN]
    if head.weight.device != bits.device:
        head.weight = head.weight.to(bits.device)
        head.bias = None if head.bias is None else head.bias.to(bits.device)
    # in the head's dtype: (B, S, H) is small, and full-logits paths (ce_weight > 0) need one dtype
    return HeadOutput(hidden=bits.view(getattr(torch, dtype)).to(head.weight.dtype), head=head)


def head_logits(out: HeadOutput) -> torch.Tensor:
    """Full logits of a `HeadOutput`, applying its head where only hidden states were kept."""
    return out.logits if out.logits is not None else out.head.logits(out.hidden)


@dataclass
class ServedTargets(TeacherTargets):
    """The teacher server's top-k, still on the way: resolved in `loss`, after the student's
    forward, which the requests overlap."""

    pending: Future | None = None


class TokenKD(Method):
    name = "token_kd"
    Params = TokenKDParams
    needs_live_teacher = False      # offline: the teacher's top-k columns come with the batch
    # model.teacher_server: a `llmkd.teacher_server.ServedTeacher` the pipeline sets (no teacher model)
    teacher_server: Any = None
    # offline hidden-state targets: (the stored teacher LMHead, the states' dtype name), set by the
    # pipeline from the generation dir (`llmkd.generation.hidden.load_head`)
    offline_head: Any = None

    def attach(self, teacher: "torch.nn.Module | None", student: "torch.nn.Module", *,
               chunked_head_ok: bool) -> None:
        if self.teacher_server is not None:
            self.params.check_teacher_mode("served")
            self.teacher_server.check_tokenizer(self.student_tokenizer)   # also: is it up?
        elif teacher is None and (self.params.lmbda > 0 or self.params.seq_kd):
            raise ValueError("config: method.lmbda > 0 / method.seq_kd need model.teacher_mode=live: "
                             "offline top-k columns only cover the generated responses, not new samples")
        super().attach(teacher, student, chunked_head_ok=chunked_head_ok)

    def response_source(self, rng: Any) -> str:
        if self.params.lmbda > 0 and rng.random() < self.params.lmbda:
            return "student"
        return "teacher" if self.params.seq_kd else "dataset"

    def sampling(self) -> SamplingSpec:
        p = self.params
        return SamplingSpec(temperature=p.gen_temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens)

    def wants_hidden(self) -> bool:
        # CE and the sparse loss need the student's logits; the dense KD alone can stay chunked.
        return (self.chunked_head_ok and self.params.chunk_size > 0 and self.params.ce_weight == 0
                and (self.teacher is not None or self.offline_head is not None))

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> TeacherTargets:
        if self.teacher_server is not None:   # top-k for the label positions, like offline columns
            return ServedTargets(pending=self.teacher_server.submit(
                batch["input_ids"], batch["attention_mask"], batch["labels"]))
        if self.teacher is None and self.offline_head is not None:   # offline hidden states
            return TeacherTargets(output=offline_hidden(batch, *self.offline_head))
        if self.teacher is None:   # offline: the top-k columns written by `llmkd generate`
            if "teacher_topk_ids" not in batch:
                raise ValueError("model.teacher_mode=offline but the data has no teacher_topk_ids column; "
                                 "point data.path at an `llmkd generate` output made with topk > 0")
            return TeacherTargets(topk_ids=batch["teacher_topk_ids"],
                                  topk_logprobs=batch["teacher_topk_logprobs"])
        return TeacherTargets(output=run_head(self.teacher, batch, hidden=self.wants_hidden(),
                                              vocab=self.vocab_size))

    def loss(self, student: HeadOutput, targets: TeacherTargets, batch: dict[str, torch.Tensor],
             num_items: torch.Tensor | int | None) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        if isinstance(targets, ServedTargets):
            ids, logprobs = targets.pending.result()
            targets = TeacherTargets(topk_ids=ids.to(labels.device), topk_logprobs=logprobs.to(labels.device))
        kd = kd_divergence(student, targets, labels, self.params, num_items)
        metrics = {"kd": as_mean(kd, num_items, shifted_mask(labels))}
        if self.params.ce_weight == 0:
            return kd, metrics
        logits = head_logits(student)[:, :-1]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(),
                             ignore_index=-100, reduction="none")
        ce = reduce(ce, None, "mean", num_items if num_items is not None else shifted_mask(labels).sum())
        metrics["ce"] = as_mean(ce, num_items, shifted_mask(labels))
        return kd + self.params.ce_weight * ce, metrics
