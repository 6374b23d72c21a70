"""Turn (prompt, response) rows into token features and pad them into training batches.

Prompts go through the tokenizer's chat template; prompt tokens are masked out of the loss
(labels -100). Rows produced by `llmkd generate` carry the teacher's exact response token ids
and top-k log-probs, which are used as-is so offline targets line up token for token.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from llmkd.data import hidden

TOPK_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs")


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a one-turn user prompt followed by the assistant header."""
    if tokenizer.chat_template is None:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def chat_prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text `chat_prompt_ids` encodes: what a response follows."""
    if tokenizer.chat_template is None:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)


def response_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> list[int]:
    """The response's token ids as they follow the rendered prompt: tokenised on its own, a
    SentencePiece-style tokenizer would start it with a word-start marker ("▁The") that the
    same text after the prompt does not get."""
    from llmkd.data.alignment import encode_in_context

    (ids, _), = encode_in_context(tokenizer, [chat_prompt_text(tokenizer, prompt)], [response])
    return ids


def tokenize_rows(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, *, response: str,
                  max_length: int) -> Dataset:
    """Add input_ids / labels / prompt_len; `response` names the column holding the response text.

    A row with `response_token_ids` (from `llmkd generate`) keeps those ids exactly.
    """
    if "prompt" not in dataset.column_names:
        raise ValueError(f"dataset columns {dataset.column_names} lack 'prompt'; use a recipe or a "
                         "`llmkd generate` output")
    exact = "response_token_ids" in dataset.column_names
    if not exact and response not in dataset.column_names:
        raise ValueError(f"dataset columns {dataset.column_names} lack the response column "
                         f"{response!r}; set data.response to one of them (or 'gold')")
    eos = tokenizer.eos_token_id

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        # generated rows carry the exact prompt the teacher saw (chat template, system prompt)
        prompt = list(row["prompt_token_ids"]) if exact and row.get("prompt_token_ids") else \
            chat_prompt_ids(tokenizer, row["prompt"])
        if exact:
            resp = list(row["response_token_ids"])
        else:
            resp = response_ids(tokenizer, row["prompt"], str(row[response])) + [eos]
        keep = max(0, min(len(resp), max_length - len(prompt)))
        out = {"input_ids": prompt + resp[:keep], "labels": [-100] * len(prompt) + resp[:keep],
               "prompt_len": len(prompt)}
        if exact and "teacher_topk_ids" in row and row["teacher_topk_ids"] is not None:
            out["teacher_topk_ids"] = [list(x) for x in row["teacher_topk_ids"][:keep]]
            out["teacher_topk_logprobs"] = [list(x) for x in row["teacher_topk_logprobs"][:keep]]
        if exact and row.get(hidden.COLUMN) is not None:   # targets: hidden
            out[hidden.COLUMN] = hidden.truncate(row[hidden.COLUMN], len(resp), keep)
        return out

    out = dataset.map(encode, desc="tokenize")
    too_long = sum(1 for n in out["prompt_len"] if n >= max_length)
    if too_long == len(out):
        raise ValueError(f"every prompt is >= data.max_length={max_length} tokens; raise data.max_length")
    return out.filter(lambda r: r["prompt_len"] < max_length, desc="drop over-long prompts")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Size + hash of the token -> id map: two tokenizers that map every token alike agree."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items())
    return {"size": len(tokenizer), "sha": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()}


class DistillCollator:
    """Right-pads sequences (training), left-pads prompts (for on-policy generation) and lays the
    teacher's top-k columns on the label positions they belong to."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        p = max(r["prompt_len"] for r in rows)
        b = len(rows)
        batch = {
            "input_ids": torch.full((b, n), self.pad, dtype=torch.long),
            "attention_mask": torch.zeros((b, n), dtype=torch.long),
            "labels": torch.full((b, n), -100, dtype=torch.long),
            "prompt_input_ids": torch.full((b, p), self.pad, dtype=torch.long),
            "prompt_attention_mask": torch.zeros((b, p), dtype=torch.long),
        }
        if "task" in rows[0]:   # method-defined task id per row (e.g. rationale vs label)
            batch["task"] = torch.tensor([int(r["task"]) for r in rows], dtype=torch.long)
        has_topk = "teacher_topk_ids" in rows[0]
        if has_topk:
            k = len(rows[0]["teacher_topk_ids"][0])
            batch["teacher_topk_ids"] = torch.zeros((b, n, k), dtype=torch.long)
            # padding positions get a finite uniform distribution; the loss mask drops them
            batch["teacher_topk_logprobs"] = torch.full((b, n, k), -math.log(k), dtype=torch.float32)
        if hidden.COLUMN in rows[0]:
            batch[hidden.COLUMN] = hidden.lay_hidden(rows, n)
        for i, r in enumerate(rows):
            ids, pl = r["input_ids"], r["prompt_len"]
            batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
            batch["attention_mask"][i, : len(ids)] = 1
            batch["labels"][i, : len(ids)] = torch.tensor(r["labels"])
            batch["prompt_input_ids"][i, p - pl:] = torch.tensor(ids[:pl])
            batch["prompt_attention_mask"][i, p - pl:] = 1
            if has_topk and r["teacher_topk_ids"]:
                m = len(r["teacher_topk_ids"])
                batch["teacher_topk_ids"][i, pl: pl + m] = torch.tensor(r["teacher_topk_ids"])
                batch["teacher_topk_logprobs"][i, pl: pl + m] = torch.tensor(r["teacher_topk_logprobs"])
        return batch
