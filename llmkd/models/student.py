"""Students: load one, build one from a config, or derive one from the teacher by dropping layers.

Layer dropping (keep every other layer, or an explicit list) gives a student that shares the
teacher's tokenizer and embeddings: the classic DistilBERT-style warm start for token KD.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


def select_layers(num_layers: int, keep: str | int | list[int]) -> list[int]:
    """Indices of teacher layers to keep: "every_other", a count (spread evenly), or a list."""
    if keep == "every_other":
        return list(range(0, num_layers, 2))
    if isinstance(keep, int) and not isinstance(keep, bool):
        if not 1 <= keep <= num_layers:
            raise ValueError(f"model.student_layers={keep} must be in [1, {num_layers}] for this teacher")
        # spread evenly, always keeping the first and the last layer
        return sorted({round(i * (num_layers - 1) / max(keep - 1, 1)) for i in range(keep)})
    if isinstance(keep, list) and keep and all(isinstance(i, int) and 0 <= i < num_layers for i in keep):
        return sorted(set(keep))
    raise ValueError(f"model.student_layers={keep!r} is invalid; use 'every_other', a layer count, "
                     f"or a list of indices in [0, {num_layers})")


def derive_student(teacher: PreTrainedModel, keep: str | int | list[int]) -> PreTrainedModel:
    """A copy of `teacher` with only the kept decoder layers (weights copied, not shared)."""
    decoder = teacher.get_decoder()
    layers = decoder.layers
    idx = select_layers(len(layers), keep)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(idx)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in idx]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    sd = teacher.state_dict()
    new_sd: dict[str, torch.Tensor] = {}
    prefix = "layers."
    for key, value in sd.items():
        marker = key.find(prefix)
        if marker >= 0 and ".layers." in f".{key}":
            rest = key[marker + len(prefix):]
            layer, _, tail = rest.partition(".")
            if int(layer) not in idx:
                continue
            key = f"{key[:marker]}{prefix}{idx.index(int(layer))}.{tail}"
        new_sd[key] = value.clone()
    missing, unexpected = student.load_state_dict(new_sd, strict=False)
    # tied lm_head may be reported missing; anything else means the layout is not understood
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise ValueError(f"cannot derive a student from {type(teacher).__name__}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def load_causal_lm(path: str | Path, *, dtype: str = "float32") -> PreTrainedModel:
    """Load a causal LM safely (safetensors only, no remote code)."""
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype), trust_remote_code=False, use_safetensors=True)


def wrap_peft(model: PreTrainedModel, lora: dict[str, Any]) -> PreTrainedModel:
    """Wrap the student with a LoRA adapter (peft); `lora` holds LoraConfig fields."""
    from peft import LoraConfig, get_peft_model

    cfg = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
           "task_type": "CAUSAL_LM", **lora}
    try:
        config = LoraConfig(**cfg)
    except TypeError as err:
        raise ValueError(f"config: model.lora has an invalid key ({err}); use peft.LoraConfig "
                         "fields such as r, lora_alpha, lora_dropout, target_modules") from err
    return get_peft_model(model, config)
