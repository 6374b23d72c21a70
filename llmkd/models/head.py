"""A causal LM's output head as data, so the chunked loss can apply it a chunk of tokens at a time.

Not every family computes ``logits = hidden @ W.T``: Phi adds a bias, Gemma 2/3 soft-cap the
final logits (``c * tanh(z / c)``), Granite divides them by ``logits_scaling`` and Cohere
multiplies them by ``logit_scale``. `LMHead` holds exactly those pieces; `lm_head_of` reads them
from a model and returns None for anything it cannot express (a LoRA adapter on lm_head, a
quantized or unknown head module), and `forward_head` then falls back to the model's own full
logits. `verify_head` compares the model's own logits with the head applied to its hidden state,
catching a transform this module does not know about (a family added after this was written).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from llmkd.models.output import HeadOutput

logger = logging.getLogger(__name__)
_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
_logged: set[str] = set()


@dataclass
class LMHead:
    """logits = softcap(scale * (hidden @ weight.T + bias)), softcap(y) = c * tanh(y / c).

    ``weight`` (V, H) and ``bias`` (V,) are the model's own tensors (gradients flow into them);
    ``scale`` and ``softcap`` are constants from the config.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full transform, for paths that need logits (sparse loss, CE, verification)."""
        z = F.linear(hidden, self.weight, self.bias)
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def rows(self, vocab: int | None) -> "LMHead":
        """The head restricted to the first `vocab` tokens (padded vocabularies); self if None."""
        if vocab is None or vocab == self.weight.shape[0]:
            return self
        if vocab > self.weight.shape[0]:
            raise ValueError(f"vocab={vocab} exceeds the lm_head's {self.weight.shape[0]} rows")
        bias = None if self.bias is None else self.bias[:vocab]
        return replace(self, weight=self.weight[:vocab], bias=bias)


# Logit scales, read from transformers' modeling code: config attribute -> {model_type prefix:
# exponent}, logits = lm_head(h) * value ** exponent. The same name means different things in
# different families (HyperCLOVA X multiplies by `logits_scaling`, Granite divides; MPT's
# `logit_scale` is unused), so a value set on a family not listed makes the head unknown.
_SCALES: dict[str, dict[str, int]] = {
    "logits_scaling": {"granite": -1, "minicpm3": -1, "hyperclovax": 1},
    "logit_scale": {"cohere": 1},
    "lm_head_multiplier": {"falcon_h1": 1},
}


def _text_config(model: torch.nn.Module) -> Any:
    """The decoder's config (multimodal wrappers such as Gemma 3 keep it in text_config)."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lm_head_of(model: torch.nn.Module) -> LMHead | None:
    """The model's head as an `LMHead`, or None when it cannot be expressed as one: a LoRA/peft
    wrapper, a quantized or custom module, a ZeRO-3 partitioned weight, an unknown logit scale."""
    module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if module is None or type(module).forward is not torch.nn.Linear.forward:
        return None
    weight = getattr(module, "weight", None)
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point()
            or hasattr(weight, "ds_shape")):
        return None
    config = _text_config(model)
    model_type = str(getattr(config, "model_type", ""))
    scale = 1.0
    for attr, families in _SCALES.items():
        value = getattr(config, attr, None)
        if value is None or value == 1:   # 1 is no scaling, whichever way a family applies it
            continue
        exponent = next((e for prefix, e in families.items() if model_type.startswith(prefix)), None)
        if exponent is None or not isinstance(value, (int, float)) or not value > 0:
            return None
        scale *= float(value) ** exponent
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3/3n/4: c * tanh(z / c)
    if not math.isfinite(scale) or (cap is not None and not (isinstance(cap, (int, float)) and cap > 0)):
        return None
    return LMHead(weight=weight, bias=module.bias, scale=scale,
                  softcap=None if cap is None else float(cap))


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in _INPUT_KEYS if k in batch}


@torch.no_grad()
def verify_head(model: torch.nn.Module, head: LMHead, batch: dict[str, torch.Tensor]) -> bool:
    """Whether `head` applied to the model's final hidden state reproduces the model's own
    last-position logits on `batch` (one forward). Logs the difference when it does not.

    Call once at start-up with a real batch; on False use full logits (chunk_size 0).
    """
    out = model(**_inputs(batch), use_cache=False, output_hidden_states=True, logits_to_keep=1)
    want = out.logits[:, -1].float()
    got = head.logits(out.hidden_states[-1][:, -1].to(head.weight.dtype)).float()
    if got.shape != want.shape:
        logger.warning("lm_head check: %s gives logits %s, its head %s; using full logits",
                       type(model).__name__, tuple(want.shape), tuple(got.shape))
        return False
    low = head.weight.dtype in (torch.float16, torch.bfloat16)
    tol = 2e-2 if low else 1e-4
    err = (got - want).abs().max().item()
    ok = err <= tol * (want.abs().max().item() + 1e-6)
    if not ok:
        logger.warning("lm_head check: %s's logits differ from its lm_head applied to the final "
                       "hidden state by up to %.3g (max |logit| %.3g); the head has a transform "
                       "llmkd does not know, using full logits", type(model).__name__, err,
                       want.abs().max().item())
    return ok


def forward_head(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, hidden: bool,
                 vocab: int | None = None, head_owner: torch.nn.Module | None = None) -> HeadOutput:
    """Run a causal LM on the batch: full logits, or (with `hidden`) the final hidden states and
    the head, skipping the full logits (logits_to_keep=1). Falls back to full logits, with one
    log line, when the head cannot be expressed as an `LMHead`. `vocab` keeps the first `vocab`
    tokens only (a padded vocabulary compared with a smaller one from the same tokenizer);
    `head_owner` is the unwrapped model when `model` is a DDP/DeepSpeed wrapper."""
    inputs = _inputs(batch)
    head = lm_head_of(head_owner or model) if hidden else None
    if hidden and head is None:
        name = type(head_owner or model).__name__
        if name not in _logged:
            _logged.add(name)
            logger.warning("%s: its lm_head cannot be applied chunk by chunk (LoRA/peft, quantized "
                           "or custom head); using full logits", name)
    if head is None:
        logits = model(**inputs, use_cache=False).logits
        return HeadOutput(logits=logits if vocab is None else logits[..., :vocab])
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return HeadOutput(hidden=out.hidden_states[-1], head=head.rows(vocab))


@torch.no_grad()
def run_head(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, hidden: bool,
             vocab: int | None = None) -> HeadOutput:
    """Teacher forward (no grad): `forward_head` without building a graph."""
    return forward_head(model, batch, hidden=hidden, vocab=vocab)


def chunked_divergence_heads(student_hidden: torch.Tensor, student_head: LMHead,
                             teacher_hidden: torch.Tensor, teacher_head: LMHead, kind: str = "jsd",
                             **kwargs: Any) -> torch.Tensor:
    """`llmkd.losses.chunked_divergence` with each side's weight, bias, scale and softcap taken
    from its `LMHead`; other keyword arguments pass through."""
    from llmkd.losses import chunked_divergence

    return chunked_divergence(
        student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, kind,
        student_bias=student_head.bias, teacher_bias=teacher_head.bias,
        student_scale=student_head.scale, teacher_scale=teacher_head.scale,
        student_softcap=student_head.softcap, teacher_softcap=teacher_head.softcap, **kwargs)
