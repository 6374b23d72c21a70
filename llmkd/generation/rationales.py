"""Few-shot chain-of-thought prompts, answer parsing and the correctness filter (Distilling
Step-by-Step: the teacher's rationale is kept only when its final answer is right).

Format of a demonstration: "Q: <question>\\nA: <rationale> So the answer is <answer>." With a chat
template the demonstrations become user/assistant turns instead, which small instruct models follow
more reliably than one long user message.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MARKER = "So the answer is"
_MARKER_RE = re.compile(r"so the answer is", re.IGNORECASE)


def _check_fewshot(fewshot: list[dict[str, Any]]) -> None:
    if not fewshot:
        raise ValueError("mode rationale needs few-shot demonstrations: add `fewshot: [{question, "
                         "rationale, answer}, ...]` to the recipe (see data_recipes/gsm_symbolic.yaml)")
    for i, ex in enumerate(fewshot):
        missing = {"question", "rationale", "answer"} - set(ex)
        if missing:
            raise ValueError(f"recipe fewshot[{i}] lacks {sorted(missing)}; each entry needs "
                             "question, rationale and answer")


def demonstration(ex: dict[str, Any]) -> str:
    """The assistant side of one demonstration: '<rationale> So the answer is <answer>.'"""
    return f"{str(ex['rationale']).strip()} {MARKER} {str(ex['answer']).strip()}."


def fewshot_messages(question: str, fewshot: list[dict[str, Any]],
                     system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages: demonstrations as alternating user/assistant turns, then the question."""
    _check_fewshot(fewshot)
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for ex in fewshot:
        msgs += [{"role": "user", "content": str(ex["question"]).strip()},
                 {"role": "assistant", "content": demonstration(ex)}]
    return msgs + [{"role": "user", "content": question.strip()}]


def fewshot_text(question: str, fewshot: list[dict[str, Any]], system_prompt: str | None = None) -> str:
    """Plain-text prompt for models without a chat template; ends in 'A:' for the model to fill."""
    _check_fewshot(fewshot)
    blocks = [system_prompt.strip()] if system_prompt else []
    blocks += [f"Q: {str(ex['question']).strip()}\nA: {demonstration(ex)}" for ex in fewshot]
    return "\n\n".join(blocks + [f"Q: {question.strip()}\nA:"])


def parse_rationale(text: str, kind: str) -> tuple[str, str | None]:
    """Split a CoT completion into (rationale, answer) at the FIRST "So the answer is".

    The first marker is the one for this question: a model that keeps going usually invents the
    next "Q: ... A: ..." demonstration. Without a marker the whole text is the rationale and the
    answer falls back to `extract_answer(text, kind)`.
    """
    from llmkd.data.answers import extract_answer

    hit = _MARKER_RE.search(text)
    if hit is None:
        return text.strip(), extract_answer(text, kind)
    rest = text[hit.end():].split("\n", 1)[0]
    return text[:hit.start()].strip(), extract_answer(f"{MARKER}{rest}", kind)


def parse_response(text: str, kind: str) -> str | None:
    """The answer stated in a plain (non-CoT) response, cut at a continuation 'Q:' if any."""
    from llmkd.data.answers import extract_answer

    return extract_answer(re.split(r"\n\s*Q:", text, maxsplit=1)[0], kind)


def check(pred: str | None, gold: str, kind: str) -> bool:
    from llmkd.data.answers import is_correct

    return is_correct(pred, gold, kind)


@dataclass
class YieldCounter:
    """Counts for the manifest: how many completions parsed, were correct, were kept."""

    keep_incorrect: bool = False
    total: int = 0
    parsed: int = 0
    correct: int = 0
    kept: int = 0
    skipped_too_long: int = 0
    per_prompt_correct: dict[str, int] = field(default_factory=dict)

    def keep(self, prompt_id: str, pred: str | None, correct: bool) -> bool:
        """Record one completion; True when it should be written."""
        self.total += 1
        self.parsed += pred is not None
        self.correct += correct
        if correct:
            self.per_prompt_correct[prompt_id] = self.per_prompt_correct.get(prompt_id, 0) + 1
        kept = correct or self.keep_incorrect
        self.kept += kept
        return kept

    def summary(self) -> dict[str, Any]:
        n = max(self.total, 1)
        return {"completions": self.total, "parsed": self.parsed, "correct": self.correct,
                "kept": self.kept, "skipped_too_long": self.skipped_too_long,
                "parse_rate": self.parsed / n, "accuracy": self.correct / n, "yield": self.kept / n,
                "prompts_with_a_correct_sample": len(self.per_prompt_correct)}
