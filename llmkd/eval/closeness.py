"""Closeness of a student to its teacher on held-out text: per-token KL(teacher || student),
top-1 agreement, and the analytic speculative-decoding acceptance 1 - TVD."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from llmkd.eval.speculative import acceptance_rate
from llmkd.losses import per_token_divergence


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
