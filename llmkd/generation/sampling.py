"""Sampling responses inside training (on-policy and sequence-level KD).

On-policy KD is only on-policy if the samples follow the student's own distribution at the
method's temperature / top-p: every sampler takes an explicit `SamplingSpec` and applies exactly
that (`llmkd.generation.hf` says why nothing comes from the checkpoint's generation_config).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from llmkd.generation.hf import hf_generate
from llmkd.generation.spec import SamplingSpec
from llmkd.validation import check_keys, type_ok

if TYPE_CHECKING:
    import torch

SAMPLERS = ("hf", "vllm")
# `method.vllm`: the vLLM sampler's engine options (`VLLMSampler` arguments) -> their types
VLLM_OPTIONS: dict[str, type] = {"max_model_len": int, "gpu_memory_utilization": float,
                                 "kv_cache_bytes": int, "dtype": str, "enforce_eager": bool}


def check_sampler(sampler: str, vllm: dict[str, Any]) -> None:
    """`method.sampler` and `method.vllm`, before anything loads: a clear error naming the key."""
    if sampler not in SAMPLERS:
        raise ValueError(f"method.sampler={sampler!r} is unknown; use one of {SAMPLERS}")
    if vllm and sampler != "vllm":
        raise ValueError(f"method.vllm={vllm} configures the vLLM sampler, but method.sampler={sampler!r}; "
                         "set method.sampler=vllm or drop method.vllm")
    check_keys("method.vllm.", vllm, list(VLLM_OPTIONS))
    for key, value in vllm.items():
        tp = VLLM_OPTIONS[key]
        if not type_ok(value, tp) or (tp in (int, float) and not value > 0):
            raise ValueError(f"method.vllm.{key}={value!r} must be a {'positive ' if tp in (int, float) else ''}"
                             f"{tp.__name__}")


class Sampler(Protocol):
    def sample(self, model: "torch.nn.Module", prompts: list[list[int]], spec: SamplingSpec,
               eos_ids: set[int]) -> list[list[int]]:
        """Response token ids per prompt: up to and including the first eos, at most
        `spec.max_new_tokens` tokens."""


class HFSampler:
    """`model.generate` with a fresh GenerationConfig built from the spec alone."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def sample(self, model: "torch.nn.Module", prompts: list[list[int]], spec: SamplingSpec,
               eos_ids: set[int]) -> list[list[int]]:
        out = hf_generate(model, prompts, spec, pad_id=self.pad, eos_ids=eos_ids)
        return [comps[0].token_ids for comps in out]


def make_sampler(name: str, pad_token_id: int, **options: Any) -> Sampler:
    """The sampler a method names (`method.sampler`)."""
    if name == "hf":
        return HFSampler(pad_token_id)
    if name == "vllm":   # options: `method.vllm` (VLLM_OPTIONS)
        from llmkd.generation.vllm_sampler import VLLMSampler

        return VLLMSampler(**options)
    raise ValueError(f"config: method.sampler={name!r} is unknown; use one of {SAMPLERS}")
