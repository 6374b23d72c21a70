"""The one transformers `generate` loop: left-pad, a GenerationConfig built from the spec alone,
seeded without touching global RNG state, cut at the first EOS. The teacher backend
(`generate`), on-policy sampling and eval all call it.

Nothing may be inherited from a checkpoint's generation_config (Qwen2.5-Instruct ships top_k=20
and repetition_penalty=1.05; transformers defaults to top_k=50): every knob is explicit, and the
model's own config is swapped out during the call because `generate` fills our defaults from it.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from llmkd.generation.spec import Completion, SamplingSpec, cut_at_eos

if TYPE_CHECKING:
    import torch


def hf_generate(model: "torch.nn.Module", prompts: list[list[int]], spec: SamplingSpec, *,
                pad_id: int, eos_ids: set[int], vocab: int | None = None) -> list[list[Completion]]:
    """`spec.n` completions per prompt (text left empty: the caller decodes if it needs it).
    Token ids run up to and including the first eos, at most `spec.max_new_tokens`; with
    `spec.logprobs`, the top-k of the raw (T=1) distribution per generated token.
    Greedy with n > 1 generates once and copies. `vocab` (the tokenizer's size): output rows
    from it on (a padded vocab_size) are never sampled, and the top-k is the distribution over
    the first `vocab` rows only, so no id the tokenizer cannot decode is returned."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):          # left-padded: generation continues every row
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    reps = 1 if spec.greedy else spec.n
    sampling = ({"do_sample": False} if spec.greedy else
                {"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0})
    rows = model.get_output_embeddings().weight.shape[0] if vocab is not None else 0
    padding = list(range(vocab, rows)) if vocab is not None and rows > vocab else None
    config = GenerationConfig(
        **sampling, suppress_tokens=padding, repetition_penalty=1.0, max_new_tokens=spec.max_new_tokens,
        num_return_sequences=reps, pad_token_id=pad_id, eos_token_id=sorted(eos_ids), use_cache=True,
        return_dict_in_generate=True, output_logits=bool(spec.logprobs))
    # generate() merges the model's own generation_config into ours where ours holds a default:
    # swap it out. A PEFT wrapper reads (and on generate copies) the base model's: swap it there.
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = owner.generation_config
    owner.generation_config = config
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=spec.seed is not None):
            if spec.seed is not None:
                torch.manual_seed(spec.seed)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    finally:
        owner.generation_config = saved
        if owner is not model:
            model.__dict__.pop("generation_config", None)   # never shadow the base's own
    new = out.sequences[:, width:].cpu()
    topv = topi = None
    if spec.logprobs:
        logp = torch.stack(out.logits, dim=1)[..., :vocab].float().log_softmax(-1)   # (B*n, T, V), raw T=1
        topv, topi = (t.cpu() for t in logp.topk(spec.logprobs, dim=-1))
    comps: list[Completion] = []
    for r in range(new.shape[0]):
        row = cut_at_eos(new[r].tolist(), eos_ids, spec.max_new_tokens)
        stopped = bool(row) and row[-1] in eos_ids
        comps.append(Completion(
            token_ids=row, text="", finish_reason="stop" if stopped else "length",
            topk_ids=topi[r, :len(row)].tolist() if topi is not None else None,
            topk_logprobs=topv[r, :len(row)].tolist() if topv is not None else None))
    if spec.greedy:
        return [[dataclasses.replace(c) for _ in range(spec.n)] for c in comps]
    return [comps[i * reps:(i + 1) * reps] for i in range(len(prompts))]
