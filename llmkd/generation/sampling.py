"""Sampling responses inside training (on-policy and sequence-level KD).

On-policy KD is only on-policy if the samples follow the student's own distribution at the
method's temperature / top-p: nothing may be inherited from a checkpoint's generation_config
(Qwen2.5-Instruct ships top_k=20 and repetition_penalty=1.05, transformers defaults to top_k=50).
Every sampler therefore takes an explicit `SamplingSpec` and applies exactly that.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from llmkd.generation.spec import SamplingSpec, cut_at_eos
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
        import torch
        from transformers import GenerationConfig

        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):          # left-padded: generation continues every row
            ids[i, width - len(p):] = torch.tensor(p, device=device)
            mask[i, width - len(p):] = 1
        config = GenerationConfig(
            do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
            max_new_tokens=spec.max_new_tokens, pad_token_id=self.pad,
            eos_token_id=sorted(eos_ids), use_cache=True)
        # generate() merges the model's own generation_config into ours where ours holds a
        # default (repetition_penalty 1.0 would become the checkpoint's 1.05): swap it out.
        # A PEFT wrapper reads (and on generate copies) the base model's config: swap it there.
        owner = model.get_base_model() if hasattr(model, "get_base_model") else model
        saved = owner.generation_config
        owner.generation_config = config
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices, enabled=spec.seed is not None):
                if spec.seed is not None:
                    torch.manual_seed(spec.seed)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        finally:
            owner.generation_config = saved
            if owner is not model:
                model.__dict__.pop("generation_config", None)   # never shadow the base's own
        return [cut_at_eos(row, eos_ids, spec.max_new_tokens) for row in out[:, width:].tolist()]


def make_sampler(name: str, pad_token_id: int, **options: Any) -> Sampler:
    """The sampler a method names (`method.sampler`)."""
    if name == "hf":
        return HFSampler(pad_token_id)
    if name == "vllm":   # options: `method.vllm` (VLLM_OPTIONS)
        from llmkd.generation.vllm_sampler import VLLMSampler

        return VLLMSampler(**options)
    raise ValueError(f"config: method.sampler={name!r} is unknown; use one of {SAMPLERS}")
