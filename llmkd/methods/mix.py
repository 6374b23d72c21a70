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
from llmkd.methods.base import HeadOutput, Method, TeacherTargets, pad_id

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
    """The configured method once per teacher (`methods`: name -> set-up instance; a teacher's
    instance may be another method, e.g. cross_tokenizer for a teacher of another tokenizer).

    route batches hold one block per teacher, `NAME/KEY` (B rows, only that teacher's rows
    meaningful): exactly what its own method's `collate` made of its rows, so each teacher keeps
    its own features (teacher-side ids, chunk layouts, top-k). The shared `input_ids`,
    `attention_mask`, `labels` and prompt keys are those blocks right- (prompts: left-) padded to
    one width, for the student's single forward; rows are grouped by teacher."""

    def __init__(self, methods: dict[str, Method], *, mix: str = "route",
                 weights: dict[str, float] | None = None) -> None:
        first = next(iter(methods.values()))
        super().__init__(first.params)
        if len({m.uses_num_items for m in methods.values()}) > 1:
            raise ValueError("config: model.teachers.*.method: methods that normalise by the window's item "
                             "count and per-micro-batch means cannot share a step; use one kind for all teachers")
        self.methods, self.first, self.mix = methods, first, mix
        self.name = first.name
        self.Params = first.Params
        self.uses_num_items = first.uses_num_items
        self.uses_generated_token_ids = first.uses_generated_token_ids
        self.student_tokenizer, self.teacher_tokenizer = first.student_tokenizer, first.teacher_tokenizer
        w = weights or {n: 1.0 for n in methods}
        self.weights = {n: w[n] / sum(w.values()) for n in methods}
        self.index = {n: i for i, n in enumerate(methods)}

    @classmethod
    def of(cls, methods: dict[str, Method], *, mix: str = "route",
           weights: dict[str, float] | None = None) -> Method:
        """The teachers' methods as one method: a set of one teacher is its method itself (route
        and mean of one teacher are that teacher), so a single teacher runs exactly as before."""
        if len(methods) == 1:
            return next(iter(methods.values()))
        return cls(methods, mix=mix, weights=weights)

    def attach(self, teacher: TeacherSet, student: PreTrainedModel, *, chunked_head_ok: bool) -> None:
        for name, method in self.methods.items():
            method.attach(teacher.teachers[name], student, chunked_head_ok=chunked_head_ok)
        self.source, self.chunked_head_ok = teacher, chunked_head_ok

    # -- data: route rows get their own teacher's features (the pipeline asks its instance) -----
    def build_examples(self, params: Any, rows: Dataset) -> Dataset:   # type: ignore[override]
        return type(self.first).build_examples(params, rows)

    def features(self, rows: Dataset, *, response: str, max_length: int) -> Dataset:
        return self.first.features(rows, response=response, max_length=max_length)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self._batch(rows, lambda m, group: m.collate(group))

    def sampled_batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Student samples, each rebuilt by its teacher's method (its own teacher-side features
        from the prompt row's block), then merged as in `collate`."""
        return self._batch(rows, lambda m, group: m.sampled_batch(group), sampled=True)

    def _batch(self, rows: list[dict[str, Any]], build: Any, *, sampled: bool = False) -> dict[str, torch.Tensor]:
        import torch

        names = list(self.methods)
        tags = [r.get(TEACHER_COLUMN) for r in rows]
        ids = [self.index[t] if isinstance(t, str) else int(t) for t in tags]
        if self.mix == "mean":          # one target for every row: the shared features
            batch = build(self.first, [_clean(r, None, sampled) for r in rows])
            batch[TEACHER_COLUMN] = torch.tensor(ids, dtype=torch.long)
            return batch
        parts = []
        for i, name in enumerate(names):
            group = [_clean(r, name, sampled) for r, t in zip(rows, ids) if t == i]
            if group:
                parts.append((i, name, build(self.methods[name], group)))
        return merge(parts, pad_id(self.student_tokenizer))

    def response_source(self, rng: Any) -> str:
        return self.first.response_source(rng)

    def sampling(self) -> Any:
        return self.first.sampling()

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        if self.mix == "mean":
            return self.first.count_items(batch)
        return sum(self.methods[name].count_items(part) for name, _, part in self.parts(batch))

    def parts(self, batch: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        """(name, its rows, its own block) per teacher with rows in a route batch."""
        out = []
        for name in self.methods:
            rows = (batch[TEACHER_COLUMN] == self.index[name]).nonzero().flatten()
            if len(rows):
                prefix = f"{name}/"
                out.append((name, rows, {k[len(prefix):]: v[rows.to(v.device)] for k, v in batch.items()
                                         if k.startswith(prefix)}))
        return out

    # -- the step -------------------------------------------------------------------------------
    def wants_hidden(self) -> bool:
        return self.mix == "route" and all(m.wants_hidden() for m in self.methods.values())

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> TeacherTargets:
        if self.mix == "mean":
            return TeacherTargets(output=HeadOutput(logits=self._mean_logprobs(batch)))
        return MixedTargets(parts=[(name, rows, self.methods[name].teacher_targets(part))
                                   for name, rows, part in self.parts(batch)])

    def _mean_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log sum_i w_i softmax(z_i): the mixture as log-probabilities (float32)."""
        import math

        import torch

        from llmkd.methods.common import head_logits

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
        blocks = {name: sub for name, _, sub in self.parts(batch)}
        if num_items is None and self.uses_num_items:
            # evaluation: one per-item mean over every teacher's rows, as in training (the parts'
            # own means, summed, would count a batch of k teachers k times)
            num_items = max(self.count_items(batch), 1)
        for name, rows, part in targets.parts:
            method, sub = self.methods[name], blocks[name]
            loss, own = method.loss(take_head(student, rows, sub["input_ids"].shape[1]), part, sub, num_items)
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


def _clean(row: dict[str, Any], name: str | None, sampled: bool) -> dict[str, Any]:
    """A row as its teacher's method knows it: no teacher tag, no empty columns of other sources;
    a sampled row takes its prompt row's own block (`NAME/KEY`) minus what sampling replaced."""
    out = {}
    for k, v in row.items():
        if k == TEACHER_COLUMN or v is None or (sampled and "/" in k and not k.startswith(f"{name}/")):
            continue
        if sampled and name is not None and k.startswith(f"{name}/"):
            k = k[len(name) + 1:]
            if k in ("input_ids", "labels", "prompt_len", "attention_mask") or k.startswith("prompt_"):
                continue
        out[k] = v
    return out


def merge(parts: list[tuple[int, str, dict[str, torch.Tensor]]], pad: int) -> dict[str, torch.Tensor]:
    """One batch from per-teacher batches (index, name, batch): the student keys padded to one
    width (right; prompts left), every key of each also kept whole as a `NAME/KEY` block."""
    import torch

    b = sum(len(sub["input_ids"]) for _, _, sub in parts)
    n = max(sub["input_ids"].shape[1] for _, _, sub in parts)
    p = max(sub["prompt_input_ids"].shape[1] for _, _, sub in parts)
    out = {"input_ids": torch.full((b, n), pad, dtype=torch.long),
           "attention_mask": torch.zeros((b, n), dtype=torch.long),
           "labels": torch.full((b, n), -100, dtype=torch.long),
           "prompt_input_ids": torch.full((b, p), pad, dtype=torch.long),
           "prompt_attention_mask": torch.zeros((b, p), dtype=torch.long),
           TEACHER_COLUMN: torch.zeros(b, dtype=torch.long)}
    start = 0
    for index, name, sub in parts:
        end, width, q = start + len(sub["input_ids"]), sub["input_ids"].shape[1], sub["prompt_input_ids"].shape[1]
        for key in ("input_ids", "attention_mask", "labels"):
            out[key][start:end, :width] = sub[key]
        for key in ("prompt_input_ids", "prompt_attention_mask"):
            out[key][start:end, p - q:] = sub[key]
        out[TEACHER_COLUMN][start:end] = index
        for key, value in sub.items():
            block = torch.zeros((b, *value.shape[1:]), dtype=value.dtype)
            block[start:end] = value
            out[f"{name}/{key}"] = block
        start = end
    return out


def take_head(out: HeadOutput, rows: torch.Tensor, width: int) -> HeadOutput:
    """The student's output on `rows`, cut to their own block's width (right padding: the
    positions before it are the same whatever the batch's width)."""
    return HeadOutput(logits=None if out.logits is None else out.logits[rows, :width],
                      hidden=None if out.hidden is None else out.hidden[rows, :width], head=out.head)
