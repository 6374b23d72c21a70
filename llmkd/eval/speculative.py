"""Speculative-decoding quality of a draft (student) for a target (teacher), analytic and measured.

With draft distribution q and target p at one position, speculative sampling accepts the drafted
token with probability β = Σ_v min(p_v, q_v) = 1 - TVD(p, q) (Leviathan et al., 2023). The
expected acceptance α = E[β] over positions, and with draft length γ the expected number of
tokens produced per target call (block efficiency) is τ = (1 - α^(γ+1)) / (1 - α).

`measure_speculative` runs real speculative decoding (transformers assisted generation, greedy)
and counts target forwards; with greedy decoding a drafted token is accepted when it is the
target's argmax, so the matching analytic prediction is τ at α = top-1 agreement.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from llmkd.eval.closeness import acceptance_rate, block_efficiency, teacher_closeness  # noqa: F401 (acceptance_rate: public here too)
from llmkd.fsutil import atomic_write_text
from llmkd.generation.spec import cut_at_eos
from llmkd.generation.spec import eos_ids as eos_of   # `eos_ids` names a list below


# -- measured speculative decoding (transformers assisted generation) ------------------------
def check_draft(target: Any, draft: Any, target_tokenizer: Any = None,
                draft_tokenizer: Any = None) -> None:
    """Draft and target must share one vocabulary: the analytic α compares their distributions
    token by token, and assisted generation then needs no re-tokenisation."""
    vt, vd = target.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size
    same = vt == vd
    if same and target_tokenizer is not None and draft_tokenizer is not None:
        same = target_tokenizer.get_vocab() == draft_tokenizer.get_vocab()
    if not same:
        raise ValueError(
            f"speculative: the draft's vocabulary ({vd} ids) differs from the target's ({vt} ids); "
            "draft and target must share one tokenizer (a student distilled from the target with "
            "token_kd/taid/distillspec does). transformers' universal assisted generation "
            "(generate(tokenizer=..., assistant_tokenizer=...)) can pair different tokenizers, "
            "but the analytic α needs one vocabulary, so llmkd does not use it")


def check_gamma(gamma: int) -> int:
    if isinstance(gamma, bool) or int(gamma) != gamma or gamma < 1:
        raise ValueError(f"speculative: gamma={gamma!r}; the draft length must be an integer >= 1 "
                         "(tokens the draft proposes per target call, e.g. --gamma 4)")
    return int(gamma)


class ForwardCounter:
    """Counts a module's forward calls with a hook: the real number of target/draft passes.
    With `tail` > 0 it also keeps the last `tail` input ids of each call (the drafted tokens the
    target verifies), so accepted drafts can be counted exactly afterwards."""

    def __init__(self, module: torch.nn.Module, tail: int = 0) -> None:
        self.tail = tail
        self.calls = 0
        self.inputs: list[tuple[int, list[int]] | None] = []
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self.calls += 1
        if self.tail:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.inputs.append(None if ids is None else
                               (ids.shape[1], ids[0, -self.tail:].tolist()))

    def reset(self) -> None:
        self.calls = 0
        self.inputs = []

    def remove(self) -> None:
        self._handle.remove()


def accepted_drafts(inputs: list[tuple[int, list[int]] | None], prompt_len: int,
                    output: list[int]) -> tuple[int, int] | None:
    """(accepted, drafted) tokens of one assisted generation, from the target's recorded inputs.

    The first call sees prompt + drafts, later calls the previous round's target token + drafts;
    a round accepts the drafts that lead-match the final output at their positions and adds one
    target token unless the output ends inside the drafts (EOS / length). None if an input was
    not recorded or the replay does not end at the output's length.
    """
    pos = accepted = drafted = 0
    for i, rec in enumerate(inputs):
        if rec is None:
            return None
        length, tail = rec
        n = length - (prompt_len if i == 0 else 1)
        drafts = tail[len(tail) - n:] if n > 0 else []
        k = 0
        while k < n and pos + k < len(output) and drafts[k] == output[pos + k]:
            k += 1
        accepted += k
        drafted += n
        pos += min(k + 1, len(output) - pos)
    return (accepted, drafted) if pos == len(output) else None


def _greedy_config(eos_ids: list[int], pad_id: int, max_new_tokens: int, **extra: Any) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                            eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True, **extra)


def _generate(model: Any, ids: torch.Tensor, config: Any, **kwargs: Any) -> list[int]:
    """Greedy `generate` of one prompt; the model's own generation_config is swapped out because
    generate() fills our defaults from it (a checkpoint's repetition_penalty would leak in)."""
    saved = model.generation_config
    model.generation_config = config
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=config, **kwargs)
    finally:
        model.generation_config = saved
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def measure_speculative(target: Any, draft: Any, prompts: list[list[int]], *, gamma: int = 4,
                        max_new_tokens: int = 64, eos_ids: list[int], pad_id: int,
                        warmup: bool = True) -> dict[str, Any]:
    """Greedy decoding of every prompt by the target alone and by the target with `draft` as
    transformers' assistant (γ = `gamma` drafted tokens per target call, constant), one prompt at
    a time (assisted generation takes batch size 1).

    Returns the per-prompt outputs of both runs, whether they are identical (greedy speculative
    decoding is lossless), target/draft forward calls counted by hooks, wall-clock times, and
    `tokens_per_target_call` = new tokens / target forwards of the speculative run.
    """
    gamma = check_gamma(gamma)
    check_draft(target, draft)
    if draft is target:
        raise ValueError("speculative: the draft is the target model object itself, so their forward "
                         "calls cannot be told apart; load a separate copy as the draft")
    if not prompts:
        raise ValueError("speculative: no prompts given")
    device = next(target.parameters()).device
    target.eval()
    draft.eval()
    plain_cfg = _greedy_config(eos_ids, pad_id, max_new_tokens)
    # constant γ and no confidence cut-off: the draft proposes exactly γ tokens per round
    draft_cfg = _greedy_config(eos_ids, pad_id, max_new_tokens, num_assistant_tokens=gamma,
                               num_assistant_tokens_schedule="constant",
                               assistant_confidence_threshold=0.0)
    saved_draft_cfg = draft.generation_config
    draft.generation_config = draft_cfg
    t_count, d_count = ForwardCounter(target, tail=gamma + 1), ForwardCounter(draft)
    rows: list[dict[str, Any]] = []
    sums = {"target_s": 0.0, "speculative_s": 0.0, "target_calls_plain": 0, "target_calls": 0,
            "draft_calls": 0, "new_tokens": 0, "accepted": 0, "drafted": 0}
    exact = True   # accepted/drafted recovered for every prompt
    try:
        if warmup:   # first calls pay one-off costs (allocator, kernels): keep them out of timings
            ids = torch.tensor([prompts[0]], device=device)
            _generate(target, ids, _greedy_config(eos_ids, pad_id, 2))
            _generate(target, ids, _greedy_config(eos_ids, pad_id, 2), assistant_model=draft)
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            t_count.reset()
            start = time.perf_counter()
            plain = _generate(target, ids, plain_cfg)
            plain_s = time.perf_counter() - start
            plain_calls = t_count.calls
            t_count.reset()
            d_count.reset()
            start = time.perf_counter()
            spec = _generate(target, ids, plain_cfg, assistant_model=draft)
            spec_s = time.perf_counter() - start
            plain, spec = cut_at_eos(plain, set(eos_ids), max_new_tokens), \
                cut_at_eos(spec, set(eos_ids), max_new_tokens)
            counted = accepted_drafts(t_count.inputs, len(prompt), spec)
            if counted is None:
                exact = False
            else:
                sums["accepted"] += counted[0]
                sums["drafted"] += counted[1]
            rows.append({"target_tokens": plain, "speculative_tokens": spec,
                         "identical": plain == spec, "new_tokens": len(spec),
                         "target_calls": t_count.calls, "draft_calls": d_count.calls,
                         "target_calls_plain": plain_calls, "target_s": plain_s,
                         "speculative_s": spec_s})
            sums["target_s"] += plain_s
            sums["speculative_s"] += spec_s
            sums["target_calls_plain"] += plain_calls
            sums["target_calls"] += t_count.calls
            sums["draft_calls"] += d_count.calls
            sums["new_tokens"] += len(spec)
    finally:
        t_count.remove()
        d_count.remove()
        draft.generation_config = saved_draft_cfg
    return {
        "gamma": gamma, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
        "identical_outputs": sum(r["identical"] for r in rows),
        "tokens_per_target_call": sums["new_tokens"] / max(sums["target_calls"], 1),
        "tokens_per_target_call_plain": sums["new_tokens"] / max(sums["target_calls_plain"], 1),
        # greedy acceptance: drafted tokens the target accepted (compare with top-1 agreement)
        "measured_acceptance": sums["accepted"] / max(sums["drafted"], 1) if exact else None,
        "speedup": sums["target_s"] / sums["speculative_s"] if sums["speculative_s"] > 0 else None,
        **sums, "rows": rows,
    }


def evaluate_speculative(target_path: str, draft_path: str, recipe: Any, *, gamma: int = 4,
                         num_examples: int = 32, offset: int = 0, seed: int = 0,
                         max_new_tokens: int = 64, use_chat_template: bool = True,
                         prompt_prefix: str = "", output_dir: str | Path | None = None,
                         label: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """`llmkd eval --speculative`: measured speculative decoding of `draft` for `target` on
    held-out recipe prompts, next to the analytic α / τ of the draft on the target's own greedy
    responses (`teacher_closeness`) and the accuracy of those responses.

    With `output_dir`, writes `metrics.json` (keys of `llmkd.eval.report`: accuracy, ci_*,
    acceptance_rate, block_efficiency, kl_to_teacher, plus the measured numbers) and
    `predictions.jsonl`. Inputs are checked before any model loads.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkd.data.collate import DistillCollator
    from llmkd.data.recipes import Recipe, load_recipe
    from llmkd.eval.metrics import load_metric
    from llmkd.eval.reasoning import prompt_ids
    from llmkd.generation.backends import check_model_dir

    started = time.time()
    gamma = check_gamma(gamma)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))
    target_dir, draft_dir = check_model_dir(str(target_path)), check_model_dir(str(draft_path))
    if num_examples < 1 or max_new_tokens < 1:
        raise ValueError(f"speculative: num_examples={num_examples} and max_new_tokens="
                         f"{max_new_tokens} must be >= 1")
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and (out / "metrics.json").exists() and not overwrite:
        raise FileExistsError(f"{out / 'metrics.json'} exists; pass overwrite=True (--overwrite) or "
                              "choose another output dir (nothing was written)")
    tokenizer = AutoTokenizer.from_pretrained(target_dir, trust_remote_code=False)
    draft_tok = (AutoTokenizer.from_pretrained(draft_dir, trust_remote_code=False)
                 if any((Path(draft_dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
                 else None)
    load = dict(dtype=torch.float32, trust_remote_code=False, use_safetensors=True)
    target = AutoModelForCausalLM.from_pretrained(target_dir, **load).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, **load).eval()
    check_draft(target, draft, tokenizer, draft_tok)

    rows = rec.load(num_examples, seed=seed, offset=offset)
    prompts = prompt_ids(tokenizer, rows["prompt"], use_chat_template, prompt_prefix)
    eos_ids = sorted(eos_of(tokenizer, target))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    m = measure_speculative(target, draft, prompts, gamma=gamma, max_new_tokens=max_new_tokens,
                            eos_ids=eos_ids, pad_id=pad)

    # analytic closeness on the target's own greedy responses (what speculative decoding sees)
    feats = Dataset.from_list([{"input_ids": p + r["target_tokens"],
                                "labels": [-100] * len(p) + r["target_tokens"], "prompt_len": len(p)}
                               for p, r in zip(prompts, m["rows"]) if r["target_tokens"]])
    close = teacher_closeness(draft, target, feats, DistillCollator(pad))
    responses = [tokenizer.decode(r["target_tokens"], skip_special_tokens=True) for r in m["rows"]]
    scores = load_metric("reasoning_accuracy").compute(
        predictions=responses, references=list(rows["answer"]), kind=rec.answer_kind)
    metrics = {
        "label": label or f"{Path(target_dir).name}+{Path(draft_dir).name}",
        "model": target_dir, "draft": draft_dir, "recipe": rec.name, "answer_kind": rec.answer_kind,
        "backend": "hf-assisted",
        "accuracy": scores["accuracy"], "ci_low": scores["ci_low"], "ci_high": scores["ci_high"],
        "ci_level": 0.95, "n": scores["n"], "num_correct": scores["num_correct"],
        "gamma": gamma, "tokens_per_target_call": m["tokens_per_target_call"],
        "tokens_per_target_call_plain": m["tokens_per_target_call_plain"],
        "measured_acceptance": m["measured_acceptance"],
        "identical_outputs": m["identical_outputs"], "prompts": m["prompts"],
        "target_calls": m["target_calls"], "target_calls_plain": m["target_calls_plain"],
        "draft_calls": m["draft_calls"], "new_tokens": m["new_tokens"],
        "target_s": m["target_s"], "speculative_s": m["speculative_s"], "speedup": m["speedup"],
        "acceptance_rate": close["acceptance"], "top1_agreement": close["top1_agreement"],
        "kl_to_teacher": close["kl"], "closeness_tokens": close["tokens"],
        "block_efficiency": block_efficiency(close["acceptance"], gamma),
        "block_efficiency_greedy": block_efficiency(close["top1_agreement"], gamma),
        "offset": offset, "seed": seed, "max_new_tokens": max_new_tokens,
        "use_chat_template": use_chat_template, "prompt_prefix": prompt_prefix,
        "time_s": time.time() - started, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"id": row["id"], "prompt": row["prompt"], "gold": row["answer"],
                             "response": text, "identical": r["identical"],
                             "new_tokens": r["new_tokens"], "target_calls": r["target_calls"],
                             "draft_calls": r["draft_calls"]}, ensure_ascii=False)
                 for row, text, r in zip(rows, responses, m["rows"])]
        atomic_write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
