"""Reasoning accuracy: generate -> extract the final answer -> verify against gold -> accuracy ± CI.

The answer rules live in `llmkd.data.answers` (extraction and checking, re-exported here).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from llmkd.data.answers import KINDS, extract_answer, is_correct, wilson_interval
from llmkd.fsutil import atomic_write_text

__all__ = ["KINDS", "evaluate_reasoning", "extract_answer", "is_correct", "prompt_ids", "wilson_interval"]


# -- evaluation -------------------------------------------------------------------------------
def prompt_ids(tokenizer: Any, prompts: list[str], use_chat_template: bool,
               prompt_prefix: str = "") -> list[list[int]]:
    """The token ids every eval feeds a model: prefix + prompt, through the chat template
    unless it is off (one definition, so accuracy and closeness see the same prompts)."""
    from llmkd.data.collate import chat_prompt_ids

    texts = [prompt_prefix + p for p in prompts]
    return [chat_prompt_ids(tokenizer, p) if use_chat_template
            else tokenizer(p, add_special_tokens=True)["input_ids"] for p in texts]


def _max_model_len(model_dir: str, longest_prompt: int, max_new_tokens: int) -> int:
    """Context the engine needs; fail early (naming the fix) when the model cannot hold it."""
    need = longest_prompt + max_new_tokens
    limit = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    if limit is not None and need > limit:
        raise ValueError(f"longest prompt ({longest_prompt} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"= {need} exceeds the model's context of {limit} tokens; lower "
                         "max_new_tokens or use shorter prompts")
    return need


def evaluate_reasoning(model_path: str | Path, recipe: Any, *, backend: str = "vllm",
                       num_examples: int = 100, offset: int = 0, seed: int = 0,
                       max_new_tokens: int = 256, batch_size: int = 16,
                       use_chat_template: bool = True, output_dir: str | Path | None = None,
                       label: str | None = None, overwrite: bool = False,
                       progress: bool = True, prompt_prefix: str = "") -> dict[str, Any]:
    """Greedy-generate answers to `num_examples` recipe rows and score them.

    `recipe` is a name, a YAML path or a `Recipe`. Inputs (recipe, model dir, output dir) are
    checked before any data or model is loaded. With `output_dir`, writes `predictions.jsonl`
    (one row per example) and `metrics.json` (the returned dict; schema in `llmkd.eval.report`).
    `batch_size` sets the transformers backend's batch; vLLM schedules its own batches.
    `prompt_prefix` is put before every prompt: a task prefix of a multi-task student, e.g. the
    rationale method's "[label] " (answer only) or "[rationale] " (rationale, then answer).
    """
    from llmkd.data.recipes import Recipe, load_recipe
    from llmkd.eval.metrics import load_metric
    from llmkd.generation.backends import check_model_dir, make_backend
    from llmkd.generation.spec import SamplingSpec

    started = time.time()
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))
    model_dir = check_model_dir(str(model_path))
    if num_examples < 1:
        raise ValueError(f"num_examples={num_examples}: need at least one example")
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and (out / "metrics.json").exists() and not overwrite:
        raise FileExistsError(f"{out / 'metrics.json'} exists; pass overwrite=True (--overwrite) or "
                              "choose another output dir (nothing was written)")

    from transformers import AutoTokenizer

    rows = rec.load(num_examples, seed=seed, offset=offset)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    prompts = prompt_ids(tokenizer, rows["prompt"], use_chat_template, prompt_prefix)
    max_len = _max_model_len(model_dir, max(map(len, prompts)), max_new_tokens)
    engine_kwargs = {"batch_size": batch_size} if backend == "hf" else {}
    engine = make_backend(backend, model_dir, max_model_len=max_len, **engine_kwargs)
    try:
        gen_start = time.time()
        completions = [c[0] for c in engine.generate(
            prompts, SamplingSpec(temperature=0.0, max_new_tokens=max_new_tokens, seed=seed),
            progress=progress)]
        gen_s = time.time() - gen_start
    finally:
        engine.close()

    responses = [c.text for c in completions]
    scores = load_metric("reasoning_accuracy").compute(
        predictions=responses, references=list(rows["answer"]), kind=rec.answer_kind)
    new_tokens = sum(len(c.token_ids) for c in completions)
    metrics = {
        "label": label or Path(model_dir).name, "model": model_dir, "recipe": rec.name,
        "answer_kind": rec.answer_kind, "backend": backend,
        "accuracy": scores["accuracy"], "ci_low": scores["ci_low"], "ci_high": scores["ci_high"],
        "ci_level": 0.95, "n": scores["n"], "num_correct": scores["num_correct"],
        "offset": offset, "seed": seed, "max_new_tokens": max_new_tokens,
        "use_chat_template": use_chat_template, "prompt_prefix": prompt_prefix,
        "truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
        "mean_new_tokens": new_tokens / len(completions),
        "generation_s": gen_s, "tokens_per_s": new_tokens / gen_s if gen_s > 0 else None,
        "time_s": time.time() - started,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"id": row["id"], "prompt": row["prompt"], "gold": row["answer"],
                             "response": c.text, "extracted": extract_answer(c.text, rec.answer_kind),
                             "correct": ok, "finish_reason": c.finish_reason,
                             "new_tokens": len(c.token_ids)}, ensure_ascii=False)
                 for row, c, ok in zip(rows, completions, scores["correct"])]
        atomic_write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
