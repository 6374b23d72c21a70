"""Closeness of a student to its teacher on held-out text: per-token KL(teacher || student),
top-1 agreement, and the analytic speculative-decoding acceptance 1 - TVD with its block
efficiency (llmkd.eval.speculative measures the same on real assisted generation)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from llmkd.losses import per_token_divergence


def acceptance_rate(target_probs: torch.Tensor, draft_probs: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """α = mean over (unmasked) positions of Σ_v min(p, q); inputs (..., V), mask (...).

    Returns a 0-dim tensor (`float(...)` for a number); NaN when every position is masked.
    """
    if target_probs.shape != draft_probs.shape:
        raise ValueError(f"target_probs {tuple(target_probs.shape)} and draft_probs "
                         f"{tuple(draft_probs.shape)} must have the same shape (..., V)")
    beta = torch.minimum(target_probs, draft_probs).sum(-1)
    if mask is None:
        return beta.mean()
    if mask.shape != beta.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match the positions {tuple(beta.shape)}")
    mask = mask.to(beta.dtype)
    return (beta * mask).sum() / mask.sum()


def block_efficiency(alpha: float, gamma: int) -> float:
    """τ = (1 - α^(γ+1)) / (1 - α): expected tokens per target forward with γ drafted tokens.

    Computed as the geometric sum Σ_{i=0..γ} α^i, which equals the closed form, is exact at
    α = 1 (τ = γ + 1) and has no cancellation near it.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    if int(gamma) != gamma or gamma < 0:
        raise ValueError(f"gamma={gamma} must be a non-negative integer (draft length)")
    return sum(alpha ** i for i in range(int(gamma) + 1))


@torch.no_grad()
def teacher_closeness(student: torch.nn.Module, teacher: torch.nn.Module, features: Any,
                      collator: Any, *, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted means over the response (label) tokens of `features`."""
    student.eval()
    teacher.eval()
    device = next(student.parameters()).device
    sums = {"kl": 0.0, "top1_agreement": 0.0, "acceptance": 0.0, "student_nll": 0.0}
    count = 0
    cols = ["input_ids", "labels", "prompt_len"]
    for batch in DataLoader(features.select_columns(cols), batch_size=batch_size, collate_fn=collator):
        ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        s = torch.log_softmax(student(input_ids=ids, attention_mask=am).logits[:, :-1].float(), -1)
        t = torch.log_softmax(teacher(input_ids=ids, attention_mask=am).logits[:, :-1].float(), -1)
        labels = batch["labels"][:, 1:].to(device)
        mask = labels != -100
        s, t = s[mask], t[mask]
        sums["kl"] += per_token_divergence(s, t, "fkl").sum().item()
        sums["top1_agreement"] += (s.argmax(-1) == t.argmax(-1)).sum().item()
        sums["acceptance"] += acceptance_rate(t.exp(), s.exp()).item() * s.shape[0]
        sums["student_nll"] += -s.gather(-1, labels[mask][:, None]).sum().item()
        count += int(mask.sum())
    return {k: v / max(count, 1) for k, v in sums.items()} | {"tokens": count}


def check_shared_tokenizer(model_dir: str, teacher_dir: str, *, label: str, recipe: str) -> None:
    """Closeness is per token over one vocabulary: the model and the teacher must map every token
    to the same id. Reads the tokenizers only (no weights), so `llmkd eval` fails before loading."""
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False).get_vocab()
    theirs = AutoTokenizer.from_pretrained(teacher_dir, trust_remote_code=False).get_vocab()
    if ours != theirs:
        raise ValueError(f"eval: teacher={teacher_dir!r} (recipe {recipe!r}) has a different tokenizer "
                         f"({len(theirs)} tokens) from model {label!r} ({len(ours)} tokens); closeness "
                         "is per token over one vocabulary: give a teacher sharing the model's tokenizer")


def recipe_closeness(models: dict[str, str], teacher_dir: str, recipe: Any, *, num_examples: int,
                     offset: int = 0, seed: int = 0, max_new_tokens: int = 256, batch_size: int = 16,
                     use_chat_template: bool = True, prompt_prefix: str = "",
                     progress: bool = True) -> dict[str, dict[str, Any]]:
    """{label: closeness} of each model to the teacher on the recipe's eval prompts, scored on the
    teacher's own greedy responses: where the teacher puts its mass, what token KD matches and a
    speculative draft must predict. The responses are generated once (transformers backend) and
    shared by every model; the teacher stays loaded while the models are scored one at a time."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkd.data.collate import DistillCollator
    from llmkd.eval.reasoning import _max_model_len, prompt_ids
    from llmkd.generation.backends import make_backend
    from llmkd.generation.spec import SamplingSpec

    for label, path in models.items():
        check_shared_tokenizer(path, teacher_dir, label=label, recipe=recipe.name)
    rows = recipe.load(num_examples, seed=seed, offset=offset)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, trust_remote_code=False)
    prompts = prompt_ids(tokenizer, rows["prompt"], use_chat_template, prompt_prefix)
    max_len = _max_model_len(teacher_dir, max(map(len, prompts)), max_new_tokens)
    engine = make_backend("hf", teacher_dir, max_model_len=max_len, batch_size=batch_size)
    try:
        greedy = SamplingSpec(temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)
        responses = [c[0].token_ids for c in engine.generate(prompts, greedy, progress=progress)]
        feats = [{"input_ids": p + r, "labels": [-100] * len(p) + r, "prompt_len": len(p)}
                 for p, r in zip(prompts, responses) if r]
        if not feats:
            raise ValueError(f"eval: teacher={teacher_dir!r} gave only empty responses on recipe "
                             f"{recipe.name!r}; raise max_new_tokens")
        features, collator = Dataset.from_list(feats), DistillCollator(engine.pad_id)
        out = {}
        for label, path in models.items():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, trust_remote_code=False, use_safetensors=True).to(engine.device)
            close = teacher_closeness(model, engine.model, features, collator, batch_size=batch_size)
            del model
            out[label] = {"teacher": teacher_dir, "closeness_on": "teacher greedy responses",
                          "kl_to_teacher": close["kl"], "top1_agreement": close["top1_agreement"],
                          "acceptance_rate": close["acceptance"], "closeness_tokens": close["tokens"],
                          "closeness_responses": len(feats)}
        return out
    finally:
        engine.close()
