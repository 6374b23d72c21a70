"""Held-out closeness of a cross-tokenizer student in the units ALM trains: aligned chunks' log-likelihoods."""
from __future__ import annotations

from typing import TYPE_CHECKING

from llmkd.models.logps import chunk_logps

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel

    from llmkd.methods.cross_tokenizer import CrossTokenizer


def chunk_gap(method: CrossTokenizer, student: PreTrainedModel, features: Dataset, *,
              batch_size: int = 16) -> dict[str, float]:
    """Held-out closeness in the units ALM trains: over every aligned chunk of `features`, the
    mean |l_T - l_S| of teacher and student chunk log-likelihoods (nats), its signed mean, and
    both mean log-likelihoods. Needs `method.attach` (the teacher) done."""
    import torch

    from llmkd.models.head import forward_head

    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    sums = {"abs": 0.0, "signed": 0.0, "teacher": 0.0, "student": 0.0}
    count = 0
    with torch.no_grad():
        for lo in range(0, len(features), batch_size):
            batch = method.collate([features[i] for i in range(lo, min(lo + batch_size, len(features)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            mask, width, size = batch["chunk_mask"], batch["chunk_mask"].shape[1], method.params.chunk_size
            s_out = forward_head(student, batch, hidden=method.wants_hidden(), vocab=method.vocab_size)
            l_s = chunk_logps(s_out, batch["input_ids"], batch["student_chunk_index"], width, size)[mask]
            l_t = chunk_logps(method.teacher_output(batch), batch["teacher_input_ids"],
                              batch["teacher_chunk_index"], width, size)[mask]
            sums["abs"] += float((l_t - l_s).abs().sum())
            sums["signed"] += float((l_t - l_s).sum())
            sums["teacher"] += float(l_t.sum())
            sums["student"] += float(l_s.sum())
            count += int(mask.sum())
    student.train(was_training)
    n = max(count, 1)
    return {"chunk_gap": sums["abs"] / n, "chunk_gap_signed": sums["signed"] / n,
            "teacher_chunk_logp": sums["teacher"] / n, "student_chunk_logp": sums["student"] / n,
            "chunks": count}
