"""TAID (Shing et al., ICLR 2025): token KD towards p_t = softmax((1-t)·stopgrad(z_S) + t·z_T),
with t moved after every optimizer step by `llmkd.losses.TAIDSchedule`.

t follows the step loss the trainer reports to `on_step_end` (summed over micro-batches and
averaged over ranks), so every rank holds the same t; evaluation never moves it; it is saved in
checkpoints (`state_dict`) and restored on resume. The loss needs the teacher's full logits, so
the teacher must be live (offline top-k log-probs cannot give p_t exactly).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmkd.losses import TAIDSchedule, taid_loss
from llmkd.losses.taid import check_schedule
from llmkd.methods.base import HeadOutput, Method, MethodParams, TeacherTargets, as_mean
from llmkd.methods.common import head_logits, shifted_mask
from llmkd.models.head import chunked_divergence_heads
from llmkd.validation import check_fused, check_fused_applies

NEEDS_LIVE = ("config: method taid needs model.teacher_mode=live: p_t mixes student and teacher "
              "logits over the whole vocabulary, which top-k log-probs (offline or served) cannot "
              "give exactly")


@dataclass
class TAIDParams(MethodParams):
    t_start: float = 0.4            # paper defaults
    t_end: float = 1.0
    alpha: float = 5e-4             # step size of the adaptive increase
    beta: float = 0.99              # momentum of the relative loss change
    total_steps: int = 0            # steps of the linear floor; 0 = the run's optimizer steps
    chunk_size: int = 1024          # >0: lm_head applied chunk by chunk inside the loss; 0: full logits
    fused: str | bool = "auto"      # chunked loss's per-chunk math compiled: auto | on | off

    def __post_init__(self) -> None:
        self.fused = check_fused(self.fused, where="method.")
        if self.total_steps < 0 or self.chunk_size < 0:   # before the schedule check's message
            raise ValueError(f"method.total_steps={self.total_steps} and method.chunk_size="
                             f"{self.chunk_size} must be >= 0 (0 = automatic / full logits)")
        check_fused_applies(self.fused, self.chunk_size, where="method.")
        check_schedule(self.t_start, self.t_end, self.alpha, self.beta, self.total_steps or 1,
                       prefix="method.")

    def unsupported_teachers(self) -> dict[str, str]:
        return {"offline": NEEDS_LIVE, "served": NEEDS_LIVE}


class TAID(Method):
    name = "taid"
    Params = TAIDParams

    def __init__(self, params: TAIDParams) -> None:
        super().__init__(params)
        self.schedule = TAIDSchedule(params.t_start, params.t_end, params.alpha, params.beta,
                                     total_steps=params.total_steps or 1)

    def on_train_begin(self, total_steps: int) -> None:
        """The run's number of optimizer steps (used when method.total_steps is 0)."""
        if not self.params.total_steps:
            check_schedule(self.params.t_start, self.params.t_end, self.params.alpha,
                           self.params.beta, total_steps)
            self.schedule.total_steps = int(total_steps)

    @property
    def t(self) -> float:
        return self.schedule.t

    def wants_hidden(self) -> bool:
        return self.chunked_head_ok and self.params.chunk_size > 0

    def loss(self, student: HeadOutput, targets: TeacherTargets, batch: dict[str, torch.Tensor],
             num_items: torch.Tensor | int | None) -> tuple[torch.Tensor, dict[str, float]]:
        mask = shifted_mask(batch["labels"])
        t = targets.output
        if student.logits is None and t.logits is None:   # chunked: never (B, S, V) logits
            loss = chunked_divergence_heads(student.hidden[:, :-1], student.head, t.hidden[:, :-1],
                                            t.head, "taid", taid_t=self.schedule.t, mask=mask,
                                            num_items=num_items, chunk_size=self.params.chunk_size,
                                            fused=self.params.fused)
        else:
            loss = taid_loss(head_logits(student)[:, :-1], head_logits(t)[:, :-1], self.schedule.t,
                             mask=mask, num_items=num_items)
        return loss, {"taid_ce": as_mean(loss, num_items, mask), "taid_t": self.schedule.t}

    def on_step_end(self, step: int, step_loss: float) -> None:
        self.schedule.update(step_loss, step)

    def state_dict(self) -> dict[str, Any]:
        return {"taid": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "taid" not in state:
            raise ValueError("checkpoint method state has no 'taid' entry: it was not written by "
                             "method taid; resume with the method the checkpoint was trained with")
        self.schedule.load_state_dict(state["taid"])
