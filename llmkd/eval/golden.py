"""Golden metrics during training, and the callback that watches them for teacher hacking.

`GoldenMonitor.measure` runs inside the Trainer's evaluation (the trainer merges its dict into
the eval log, so `metric_for_best_model` / `load_best_model_at_end` see the golden metric);
`on_evaluate` feeds the detector (`llmkd.eval.monitor`) and warns or stops. On resume the
detector replays the restored `log_history`, so nothing extra is checkpointed.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from llmkd.data.answers import extract_answer, is_correct, wilson_interval
from llmkd.eval.monitor import (FALLBACK_PROXY, GOLDEN_KEYS, PROXY_KEY, SE_SUFFIX, describe,
                                detect_hacking, evaluations)
from llmkd.losses import per_token_divergence


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Mean over examples and its standard error."""
    n = len(values)
    mean = sum(values) / max(n, 1)
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n) if n else 0.0


@torch.no_grad()
def per_example_scores(student: torch.nn.Module, features: Any, collator: Any, *,
                       reference: torch.nn.Module | None = None, batch_size: int = 8) -> dict[str, list[float]]:
    """Per example, means over its response (label) tokens: `nll` of the labels under the student
    and, with a `reference` model, `kl` = KL(reference || student) per token."""
    device = next(student.parameters()).device
    out: dict[str, list[float]] = {"nll": [], "kl": []}
    for batch in DataLoader(features.select_columns(["input_ids", "labels", "prompt_len"]),
                            batch_size=batch_size, collate_fn=collator):
        ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        s = torch.log_softmax(student(input_ids=ids, attention_mask=am).logits[:, :-1].float(), -1)
        labels = batch["labels"][:, 1:].to(device)
        mask = labels != -100
        count = mask.sum(-1).clamp(min=1)
        nll = -s.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        out["nll"] += ((nll * mask).sum(-1) / count).tolist()
        if reference is not None:
            r = torch.log_softmax(reference(input_ids=ids, attention_mask=am).logits[:, :-1].float(), -1)
            kl = per_token_divergence(s, r, "fkl")
            out["kl"] += ((kl * mask).sum(-1) / count).tolist()
    return out


@torch.no_grad()
def greedy_accuracy(student: torch.nn.Module, tokenizer: Any, prompts: list[str], golds: list[str], *,
                    kind: str, max_new_tokens: int, batch_size: int = 16) -> dict[str, float]:
    """Greedy answers to `prompts` (chat template), scored like `llmkd eval` (Wilson 95 % CI)."""
    from llmkd.data.collate import chat_prompt_ids
    from llmkd.generation.hf import hf_generate
    from llmkd.generation.spec import SamplingSpec, eos_ids

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    spec, eos = SamplingSpec(temperature=0.0, max_new_tokens=max_new_tokens), eos_ids(tokenizer, student)
    correct = 0
    for start in range(0, len(prompts), batch_size):
        ids = [chat_prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
        outs = hf_generate(student, ids, spec, pad_id=pad, eos_ids=eos)
        texts = [tokenizer.decode(c[0].token_ids, skip_special_tokens=True) for c in outs]
        correct += sum(is_correct(extract_answer(t, kind), g, kind)
                       for t, g in zip(texts, golds[start:start + batch_size]))
    n = len(prompts)
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n, "ci_low": low, "ci_high": high, "n": n}


class GoldenMonitor(TrainerCallback):
    """Measures the proxy and the golden metric at each evaluation and flags teacher hacking.

    `gold` holds features whose responses are the gold answers (gold_nll); `prompts`/`answers`
    the held-out questions (accuracy); `oracle` the oracle model (oracle_kl)."""

    def __init__(self, spec: Any, *, gold: Any = None, prompts: list[str] | None = None,
                 answers: list[str] | None = None, answer_kind: str = "exact",
                 oracle: torch.nn.Module | None = None) -> None:
        self.spec = spec
        self.gold, self.prompts, self.answers, self.answer_kind = gold, prompts, answers, answer_kind
        self.oracle = oracle
        self.hacking = None         # the Hacking found, once

    def measure(self, trainer: Any) -> dict[str, float]:
        """eval_proxy_kl (live teacher) and eval_golden_* (+ its standard error) for the model now."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        key = GOLDEN_KEYS[self.spec.golden]
        collate = trainer.data_collator
        try:
            logs: dict[str, float] = {}
            if self.spec.golden == "oracle_kl":
                self.oracle.to(trainer.args.device).eval()
                scores = per_example_scores(model, trainer.eval_dataset, collate, reference=self.oracle)
                logs[key], logs[key + SE_SUFFIX] = _mean_se(scores["kl"])
            elif self.spec.golden == "gold_nll":
                scores = per_example_scores(model, self.gold, collate)
                logs[key], logs[key + SE_SUFFIX] = _mean_se(scores["nll"])
            else:
                acc = greedy_accuracy(model, trainer.processing_class, self.prompts, self.answers,
                                      kind=self.answer_kind, max_new_tokens=self.spec.max_new_tokens)
                logs[key] = acc["accuracy"]
                logs[key + SE_SUFFIX] = (acc["ci_high"] - acc["ci_low"]) / (2 * 1.96)
                logs[key + "_ci_low"], logs[key + "_ci_high"] = acc["ci_low"], acc["ci_high"]
            if trainer.teacher is not None:
                proxy = per_example_scores(model, trainer.eval_dataset, collate, reference=trainer.teacher)
                logs[PROXY_KEY] = _mean_se(proxy["kl"])[0]
        finally:
            model.train(was_training)
        return logs

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> Any:
        # state.log_history already holds this evaluation (logged before on_evaluate): after a
        # resume it holds the earlier ones too, so the detector sees the whole run
        golden, proxy, evals = evaluations(state.log_history)
        if self.hacking is not None or golden is None:
            return control
        self.hacking = detect_hacking(evals, self.spec.patience)
        if self.hacking is not None:
            print(describe(self.hacking, golden, proxy or FALLBACK_PROXY), file=sys.stderr, flush=True)
            if self.spec.on_hacking == "stop":
                control.should_training_stop = True
        return control
