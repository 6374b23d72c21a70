"""A teacher whose embedding has more rows than its tokenizer (a padded vocab_size, as Qwen2's):
`llmkd generate` must never sample a padding id and never store one in the top-k, and the stored
top-k is the distribution over the tokenizer's tokens (the padding's mass removed, so the tail
`1 - sum(top-k)` is the real tokens' remaining mass). The padding rows of lm_head point along the
model's own hidden states, so an unmasked sampler picks them almost always."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llmkd.generation.backends import make_backend
from llmkd.generation.spec import SamplingSpec

PAD_ROWS = 64


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory, tiny_pair) -> tuple[Path, int]:
    """(dir, tokenizer size) of the tiny teacher with PAD_ROWS padding rows that dominate its logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32)
    vocab = len(tok)
    model.resize_token_embeddings(vocab + PAD_ROWS, mean_resizing=False)
    with torch.no_grad():
        ids = torch.tensor([tok("What is 12 + 30? The answer is 42.")["input_ids"]])
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]   # after the final norm
        direction = hidden.mean(0) / hidden.mean(0).norm() ** 2
        model.get_output_embeddings().weight[vocab:] = 50 * direction
        assert model(ids).logits[0].argmax(-1).min() >= vocab      # the padding wins unmasked
    out = tmp_path_factory.mktemp("padded") / "teacher"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert model.config.vocab_size == vocab + PAD_ROWS
    return out, vocab


def _check(comps, vocab: int, k: int) -> None:
    for c in comps:
        assert c.token_ids and max(c.token_ids) < vocab, c.token_ids
        for ids, lps in zip(c.topk_ids, c.topk_logprobs):
            assert len(ids) == k and max(ids) < vocab, ids
            assert lps == sorted(lps, reverse=True)
            assert math.fsum(math.exp(v) for v in lps) <= 1 + 1e-5


def _reference(model_dir: Path, vocab: int, prompt: list[int], response: list[int], k: int):
    """Top-k of log_softmax over the tokenizer's rows only, from a plain forward in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1, :vocab]
    return logits.log_softmax(-1).topk(k, dim=-1)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_hf_backend_never_samples_or_stores_padding_ids(padded_teacher, greedy):
    model_dir, vocab = padded_teacher
    backend = make_backend("hf", str(model_dir), max_model_len=128)
    prompt = backend.tokenizer("What is 3 + 4?")["input_ids"]
    spec = SamplingSpec(n=1 if greedy else 4, temperature=0.0 if greedy else 1.0, top_p=1.0,
                        max_new_tokens=8, logprobs=5, seed=0)
    comps = backend.generate([prompt], spec, progress=False)[0]
    _check(comps, vocab, 5)
    ref_lp, ref_ids = _reference(model_dir, vocab, prompt, comps[0].token_ids, 5)
    assert comps[0].topk_ids == ref_ids.tolist()
    assert torch.allclose(torch.tensor(comps[0].topk_logprobs, dtype=torch.float64), ref_lp, atol=1e-4)
    backend.close()
