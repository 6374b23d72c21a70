"""Token-level KD: off-policy (dataset responses), on-policy (student samples, GKD's lambda),
sequence-level (teacher samples), any divergence of `llmkd.losses`, optional CE mix.

The teacher is any kind of `llmkd.teachers.Teacher`: live (a model run on the same batch),
offline (top-k log-probs that `llmkd generate` wrote) or served (top-k log-probs from a vLLM
server, `model.teacher_server`); the sparse loss with a tail bucket is used for the last two,
unless they give the teacher's hidden states + output head (`targets: hidden`, either kind).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmkd.generation.spec import SamplingSpec
from llmkd.losses.divergences import reduce
from llmkd.methods.base import HeadOutput, Method, TeacherTargets, as_mean
from llmkd.methods.common import head_logits, kd_divergence, shifted_mask
from llmkd.methods.params import TokenKDParams   # torch-free: configs validate before torch loads
from llmkd.teachers import resolve
from llmkd.teachers.served import ServedTargets  # noqa: F401  (its old home: re-exported)


class TokenKD(Method):
    name = "token_kd"
    Params = TokenKDParams
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
                and (self.teacher is not None or getattr(self.source, "head", None) is not None))

    def loss(self, student: HeadOutput, targets: TeacherTargets, batch: dict[str, torch.Tensor],
             num_items: torch.Tensor | int | None) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        targets = resolve(targets)      # a server's answer, collected after the student's forward
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
