"""Several teachers, one student: any method, each teacher behind its own instance of it.

`route` (method.teacher_mix): every row carries its source's teacher (the `teacher` column of a
`data.mixture`); a micro-batch is split by teacher, each part scored by its teacher through its
own method instance (set up with that teacher's tokenizer and kind: live, offline or served), and
the parts' losses are summed. Losses that divide by the accumulated window's item count
(`uses_num_items`) therefore give exactly the loss of one batch: gradient accumulation and ranks
behave as with one teacher. Per-micro-batch means (`uses_num_items=False`) are weighted by rows.

`mean`: every row is scored against the weighted average of the (live, same-tokenizer) teachers'
distributions, p = sum_i w_i softmax(z_i), given to the method as log-probabilities (its
temperature then applies to the mixture).

Logs: the method's metrics per teacher (`kd_<name>`), `rows_<name>`, `<name>_loss` (the part's
loss as a per-item mean: `eval_<name>_loss` in evaluation), and the method's own keys over all rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmkd.data.mixture import TEACHER_COLUMN
from llmkd.methods.base import HeadOutput, Method, TeacherTargets

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel

    from llmkd.teachers import TeacherSet


@dataclass
class MixedTargets(TeacherTargets):
    """route: (teacher name, its rows, its targets) per teacher present in the batch."""

    parts: list[tuple[str, Any, TeacherTargets]] = field(default_factory=list)


class TeacherMix(Method):
    """The configured method once per teacher (`methods`: name -> set-up instance)."""

    def __init__(self, methods: dict[str, Method], *, mix: str = "route",
                 weights: dict[str, float] | None = None) -> None:
        first = next(iter(methods.values()))
        super().__init__(first.params)
        self.methods, self.first, self.mix = methods, first, mix
        self.name = first.name
        self.Params = first.Params
        self.uses_num_items = first.uses_num_items
        self.uses_generated_token_ids = first.uses_generated_token_ids
        self.student_tokenizer, self.teacher_tokenizer = first.student_tokenizer, first.teacher_tokenizer
        w = weights or {n: 1.0 for n in methods}
        self.weights = {n: w[n] / sum(w.values()) for n in methods}
        self.index = {n: i for i, n in enumerate(methods)}

    def attach(self, teacher: TeacherSet, student: PreTrainedModel, *, chunked_head_ok: bool) -> None:
        for name, method in self.methods.items():
            method.attach(teacher.teachers[name], student, chunked_head_ok=chunked_head_ok)
        self.source, self.chunked_head_ok = teacher, chunked_head_ok

    # -- data: the first instance's rules (all share the student tokenizer), plus the teacher tag --
    def build_examples(self, params: Any, rows: Dataset) -> Dataset:   # type: ignore[override]
        return type(self.first).build_examples(params, rows)

    def features(self, rows: Dataset, *, response: str, max_length: int) -> Dataset:
        return self.first.features(rows, response=response, max_length=max_length)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        # rows with an offline teacher's top-k first: the collator sizes k from the first row
        rows = sorted(rows, key=lambda r: not r.get("teacher_topk_ids"))
        tags = [r.get(TEACHER_COLUMN) for r in rows]
        only = next(iter(self.methods)) if len(self.methods) == 1 else None
        ids = [self.index[t] if isinstance(t, str) else int(t) if t is not None else self.index[only]
               for t in tags]
        batch = self.first.collate([{k: v for k, v in r.items() if k != TEACHER_COLUMN
                                     and not (k.startswith("teacher_topk") and v is None)} for r in rows])
        batch[TEACHER_COLUMN] = torch.tensor(ids, dtype=torch.long)
        return batch

    def sampled_batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collate(rows)

    def response_source(self, rng: Any) -> str:
        return self.first.response_source(rng)

    def sampling(self) -> Any:
        return self.first.sampling()

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return self.first.count_items(batch)

    # -- the step -------------------------------------------------------------------------------
    def wants_hidden(self) -> bool:
        return self.mix == "route" and all(m.wants_hidden() for m in self.methods.values())

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> TeacherTargets:
        if self.mix == "mean":
            return TeacherTargets(output=HeadOutput(logits=self._mean_logprobs(batch)))
        parts = []
        for name, method in self.methods.items():
            rows = (batch[TEACHER_COLUMN] == self.index[name]).nonzero().flatten()
            if len(rows):
                parts.append((name, rows, method.teacher_targets(take_rows(batch, rows))))
        return MixedTargets(parts=parts)

    def _mean_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log sum_i w_i softmax(z_i): the mixture as log-probabilities (float32)."""
        import math

        import torch

        from llmkd.methods.token_kd import head_logits

        terms = []
        for name, method in self.methods.items():
            if self.weights[name] == 0:
                continue
            out = method.source.targets(batch, hidden=False, vocab=method.vocab_size).output
            terms.append(torch.log_softmax(head_logits(out).float(), -1) + math.log(self.weights[name]))
        return torch.logsumexp(torch.stack(terms), 0)

    def loss(self, student: HeadOutput, targets: TeacherTargets, batch: dict[str, torch.Tensor],
             num_items: torch.Tensor | int | None) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(targets, MixedTargets):          # mean: one mixture target for every row
            return self.first.loss(student, targets, batch, num_items)
        total, metrics, counts, sums = None, {}, {}, {}
        width = batch["input_ids"].shape[0]
        for name, rows, part in targets.parts:
            method, sub = self.methods[name], take_rows(batch, rows)
            loss, own = method.loss(take_head(student, rows), part, sub, num_items)
            items = max(method.count_items(sub), 1)
            per_item = float(loss.detach()) * (float(num_items) / items if num_items is not None else 1.0)
            if not self.uses_num_items:
                loss = loss * (len(rows) / width)        # per-micro-batch means: weighted by rows
            total = loss if total is None else total + loss
            metrics[f"rows_{name}"], metrics[f"{name}_loss"] = float(len(rows)), per_item
            for key, value in own.items():
                metrics[f"{key}_{name}"] = value
                sums[key] = sums.get(key, 0.0) + value * items
                counts[key] = counts.get(key, 0) + items
        metrics.update({k: sums[k] / counts[k] for k in sums})     # over all rows, item-weighted
        return total, metrics

    # -- state ----------------------------------------------------------------------------------
    def on_train_begin(self, total_steps: int) -> None:
        for m in self.methods.values():
            m.on_train_begin(total_steps)

    def on_step_end(self, step: int, step_loss: float) -> None:
        for m in self.methods.values():
            m.on_step_end(step, step_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"teachers": {n: m.state_dict() for n, m in self.methods.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("teachers", {})
        for n, m in self.methods.items():
            if saved.get(n):
                m.load_state_dict(saved[n])


def take_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The batch restricted to `rows` (every tensor whose first dimension is the batch's)."""
    import torch

    width = batch["input_ids"].shape[0]
    return {k: v[rows.to(v.device)] if torch.is_tensor(v) and v.dim() and v.shape[0] == width else v
            for k, v in batch.items()}


def take_head(out: HeadOutput, rows: torch.Tensor) -> HeadOutput:
    return HeadOutput(logits=None if out.logits is None else out.logits[rows],
                      hidden=None if out.hidden is None else out.hidden[rows], head=out.head)
