"""Method parameters, apart from the methods: this module imports no model library, so a config
(and `llmkd distill --help`) is validated in a fraction of a second, before torch loads.

Each method module uses its Params from here (`Params = TokenKDParams`); `llmkd.methods.get_params`
finds them by method name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmkd.methods.base import MethodParams
from llmkd.generation.sampling import check_sampler
from llmkd.validation import FUSED_ON_SPARSE, check_divergence, check_fused, check_fused_applies

LABEL, RATIONALE = 0, 1     # rationale method: the two tasks of Distilling Step-by-Step


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
    fused: str | bool = "auto"      # chunked loss's per-chunk math compiled: auto | on | off
    sampler: str = "hf"             # on-policy / seq-KD sampling backend: hf | vllm
    vllm: dict[str, Any] = field(default_factory=dict)   # vLLM sampler engine options (README)

    def __post_init__(self) -> None:
        check_divergence(self.kind, self.beta, self.lam, self.temperature, where="method.")
        for name in ("lmbda",):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"method.{name}={getattr(self, name)} is outside [0, 1]")
        if self.ce_weight < 0:
            raise ValueError(f"method.ce_weight={self.ce_weight} must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"method.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.chunk_size < 0:
            raise ValueError(f"method.chunk_size={self.chunk_size} must be >= 0 (0 = full logits)")
        self.fused = check_fused(self.fused, where="method.")
        check_fused_applies(self.fused, self.chunk_size, self.ce_weight, where="method.")
        check_sampler(self.sampler, self.vllm)
        if not (self.gen_temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"method.gen_temperature={self.gen_temperature} must be > 0 and "
                             f"method.top_p={self.top_p} in (0, 1]")

    def unsupported_teachers(self) -> dict[str, str]:
        """Any kind scores dataset responses; new samples need a teacher that can score them."""
        out = {}
        if self.seq_kd:
            out["served"] = ("config: method.seq_kd samples responses from a teacher model; with "
                             "model.teacher_server use method.lmbda (student samples) instead")
        if self.lmbda > 0 or self.seq_kd:
            out["offline"] = ("config: method.lmbda > 0 / method.seq_kd need model.teacher_mode=live: "
                              "offline top-k columns only cover the generated responses, not new samples")
        if self.fused == "on":
            out = {"offline": FUSED_ON_SPARSE, "served": FUSED_ON_SPARSE} | out
        return out


@dataclass
class RationaleParams(MethodParams):
    alpha: float = 0.5                                  # weight of the label task; 1 - alpha: rationale
    label_prefix: str = "[label] "
    rationale_prefix: str = "[rationale] "
    answer_template: str = "The answer is {answer}."
    rationale_template: str = "{rationale} So the answer is {answer}."
    keep_incorrect: bool = False                        # also train on rationales with a wrong answer
    kd_weight: float = 0.0                              # + kd_weight * KD on rationale rows (live teacher)
    kind: str = "fkl"                                   # divergence of that KD (see llmkd.losses)
    beta: float = 0.5
    lam: float = 0.1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_divergence(self.kind, self.beta, self.lam, self.temperature, where="method.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"method.alpha={self.alpha} is outside [0, 1]; 0.5 weighs both tasks equally")
        if self.kd_weight < 0:
            raise ValueError(f"method.kd_weight={self.kd_weight} must be >= 0")
        if self.label_prefix == self.rationale_prefix:
            raise ValueError(f"method.label_prefix and method.rationale_prefix are both "
                             f"{self.label_prefix!r}; the student tells the tasks apart by them")
        if "{answer}" not in self.answer_template:
            raise ValueError(f"method.answer_template={self.answer_template!r} lacks '{{answer}}'")
        if "{rationale}" not in self.rationale_template or "{answer}" not in self.rationale_template:
            raise ValueError(f"method.rationale_template={self.rationale_template!r} needs both "
                             "'{rationale}' and '{answer}'")

    def unsupported_teachers(self) -> dict[str, str]:
        """Only the optional KD term runs a teacher, and it needs the full logits of a live one."""
        why = {"offline": "config: method.kd_weight > 0 needs model.teacher_mode=live (a live teacher): "
                          "the generated top-k columns belong to the teacher's CoT response, not the "
                          "[rationale] rows; or set method.kd_weight=0",
               "served": "config: model.teacher_server is set but method.name='rationale' reads no "
                         "served top-k (its KD term needs a live teacher's full logits); drop "
                         "model.teacher_server, or use a live teacher"}
        return why if self.kd_weight > 0 else {"served": why["served"]}

    @property
    def tasks(self) -> tuple[int, ...]:
        """Tasks with a non-zero weight: rows of a zero-weight task would only cost compute."""
        return tuple(t for t, on in ((LABEL, self.alpha > 0),
                                     (RATIONALE, self.alpha < 1 or self.kd_weight > 0)) if on)
