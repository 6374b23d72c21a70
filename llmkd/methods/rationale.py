"""Rationale distillation: Distilling Step-by-Step (Hsieh et al., ACL Findings 2023) for
decoder-only students.

Each example with a teacher rationale becomes two training rows told apart by a task prefix in
the prompt: `[label] question -> "The answer is A."` (task 0) and `[rationale] question ->
"<rationale> So the answer is A."` (task 1). The loss is alpha * L_label + (1 - alpha) *
L_rationale, each a token-mean cross-entropy over its own task's label tokens, so a long
rationale does not drown the short label. At inference the label prefix gives a fast answer-only
model; the rationale prefix gives chain-of-thought ending in a parseable "So the answer is".

Optional token KD on the rationale rows (kd_weight > 0) needs a LIVE teacher: the teacher top-k
columns that `llmkd generate` writes belong to the teacher's few-shot CoT response, whose prompt
and tokens differ from the rebuilt two-task rows, so they are dropped here rather than misaligned.
The live teacher scores the student's own `[rationale]` rows.

Normalisation: two per-task means cannot be formed from one global token count, so this method
ignores `num_items` (`uses_num_items = False`) and returns per-micro-batch task means; the Trainer
divides them by the grad-accumulation steps. A micro-batch holding only one task contributes only
that task's weighted term (weights are not renormalised, so the expected loss stays the same).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from llmkd.losses import divergence
from llmkd.losses.divergences import compute_dtype
from llmkd.methods.base import HeadOutput, Method, TeacherTargets
from llmkd.methods.params import LABEL, RATIONALE, RationaleParams   # torch-free: configs validate before torch loads
from llmkd.methods.common import shifted_mask

if TYPE_CHECKING:
    from datasets import Dataset

GENERATE_HINT = ("run `llmkd generate configs/generate/rationale.yaml` (mode: rationale) and point "
                 "data.path at its output, or give a data file with a `rationale` column")


def _usable(rationale: Any, correct: bool | None, keep_incorrect: bool) -> bool:
    """A row trains the student when it has a rationale and (unless asked) a correct answer;
    rows without a `correct` column (e.g. human-written rationales) count as correct."""
    if rationale is None or not str(rationale).strip():
        return False
    return keep_incorrect or correct is not False


class Rationale(Method):
    name = "rationale"
    Params = RationaleParams
    uses_num_items = False

    # -- data -------------------------------------------------------------------------------
    @classmethod
    def build_examples(cls, params: RationaleParams, rows: "Dataset") -> "Dataset":
        """One (question, rationale, answer) row -> a [label] row and a [rationale] row.

        The label row's answer is the gold answer (`gold` column of a generated dir, else
        `answer`); the rationale row ends in the teacher's own parsed answer when there is one
        (equal to gold for the correct rationales kept by default). Generated token ids and
        top-k columns are dropped: the responses are rebuilt as text.
        """
        missing = {"prompt", "rationale"} - set(rows.column_names)
        if missing:
            raise ValueError(f"method rationale: dataset columns {rows.column_names} lack "
                             f"{sorted(missing)}; {GENERATE_HINT}")
        has_gold = "gold" in rows.column_names
        if not has_gold and "answer" not in rows.column_names:
            raise ValueError(f"method rationale: dataset columns {rows.column_names} lack 'answer' "
                             f"(or 'gold'); {GENERATE_HINT}")
        # only the text columns: generated dirs also hold large token-id and top-k columns
        needed = [c for c in ("id", "prompt", "rationale", "answer", "gold", "correct")
                  if c in rows.column_names]
        rows = rows.select_columns(needed)
        correct = rows["correct"] if "correct" in needed else [None] * len(rows)
        keep = [i for i, (r, c) in enumerate(zip(rows["rationale"], correct))
                if _usable(r, c, params.keep_incorrect)]
        if not keep:
            wrong = sum(c is False for c in correct)
            raise ValueError(
                f"method rationale: none of {len(rows)} rows has a usable rationale ({wrong} have an "
                "incorrect answer, the rest none); generate more (num_prompts, n) or set "
                "method.keep_incorrect=true")
        tasks = params.tasks

        def expand(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"task": [], "prompt": [], "response": []} | (
                {"id": []} if "id" in needed else {})
            for i, prompt in enumerate(batch["prompt"]):
                gold = str(batch["gold" if has_gold else "answer"][i]).strip()
                own = batch["answer"][i] if has_gold else None
                own = gold if own is None or not str(own).strip() else str(own).strip()
                texts = {LABEL: (params.label_prefix, params.answer_template.format(answer=gold)),
                         RATIONALE: (params.rationale_prefix, params.rationale_template.format(
                             rationale=str(batch["rationale"][i]).strip(), answer=own))}
                for t in tasks:
                    prefix, response = texts[t]
                    if "id" in out:
                        out["id"].append(str(batch["id"][i]))
                    out["task"].append(t)
                    out["prompt"].append(prefix + prompt)
                    out["response"].append(response)
            return out

        return rows.select(keep).map(expand, batched=True, remove_columns=needed,
                                     desc="rationale: two tasks per example")

    # -- loss -------------------------------------------------------------------------------
    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> TeacherTargets:
        rows = _task(batch) == RATIONALE
        if self.params.kd_weight == 0 or not rows.any():
            return TeacherTargets()
        sub = {k: batch[k][rows] for k in ("input_ids", "attention_mask")}
        return self.source.targets(sub, hidden=False, vocab=self.vocab_size)

    def loss(self, student: HeadOutput, targets: TeacherTargets, batch: dict[str, torch.Tensor],
             num_items: torch.Tensor | int | None) -> tuple[torch.Tensor, dict[str, float]]:
        """alpha * CE(label rows) + (1 - alpha) * CE(rationale rows) [+ kd_weight * KD(rationale rows)];
        per-micro-batch task means, `num_items` unused (see the module docstring)."""
        p = self.params
        labels, task = batch["labels"], _task(batch)
        logits = student.logits[:, :-1]
        mask = shifted_mask(labels)
        ce = F.cross_entropy(logits.flatten(0, 1).to(compute_dtype(logits)), labels[:, 1:].flatten(),
                             ignore_index=-100, reduction="none").view_as(mask)
        total = logits.new_zeros((), dtype=ce.dtype)
        metrics: dict[str, float] = {}
        for t, weight, key in ((LABEL, p.alpha, "label_ce"), (RATIONALE, 1 - p.alpha, "rationale_ce")):
            rows = task == t
            count = mask[rows].sum()
            if count == 0:
                continue
            task_ce = ce[rows].sum() / count
            total = total + weight * task_ce
            metrics[key] = task_ce.item()
        if targets.output is not None:
            rows = task == RATIONALE
            kd = divergence(student.logits[rows, :-1], targets.output.logits[:, :-1], p.kind,
                            beta=p.beta, lam=p.lam, temperature=p.temperature, mask=mask[rows])
            total = total + p.kd_weight * kd
            metrics["kd"] = kd.item()
        return total, metrics


def _task(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "task" not in batch:
        raise ValueError("method rationale: the batch has no 'task' column; its rows must come from "
                         "Rationale.build_examples (llmkd.training.pipeline.build_datasets calls it)")
    return batch["task"]
