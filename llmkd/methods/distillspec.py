"""DistillSpec (Zhou et al., ICLR 2024): distil the student as a speculative-decoding draft.

It is token KD with the paper's choices as defaults: the responses are the draft's own samples
(`lmbda` = fraction of student-generated batches, 1.0 = all, which the paper found best) and the
divergence is TVD, since a drafted token is accepted with probability Σ min(p, q) = 1 - TVD(p, q).
Any other divergence of `llmkd.losses` may be chosen (`kind`). Evaluate the result as a draft with
`llmkd eval --model TEACHER --speculative STUDENT` (measured tokens per target call).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkd.methods.base import HeadOutput, TeacherTargets
from llmkd.methods.params import TokenKDParams
from llmkd.methods.token_kd import TokenKD


@dataclass
class DistillSpecParams(TokenKDParams):
    kind: str = "tvd"               # 1 - TVD is the per-token acceptance probability
    lmbda: float = 1.0              # fraction of batches whose responses are draft (student) samples


class DistillSpec(TokenKD):
    name = "distillspec"
    Params = DistillSpecParams

    def loss(self, student: HeadOutput, targets: TeacherTargets, batch: dict[str, torch.Tensor],
             num_items: torch.Tensor | int | None) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = super().loss(student, targets, batch, num_items)
        if self.params.kind == "tvd" and self.params.temperature == 1.0:
            metrics["acceptance"] = 1.0 - metrics["kd"]   # α on this batch's responses
        return loss, metrics
