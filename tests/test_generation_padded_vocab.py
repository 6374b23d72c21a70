"""A teacher whose embedding has more rows than its tokenizer (a padded vocab_size, as Qwen2's):
`llmkd generate` must never sample a padding id and never store one in the top-k, and the stored
top-k is the distribution over the tokenizer's tokens (the padding's mass removed, so the tail
`1 - sum(top-k)` is the real tokens' remaining mass). The padding rows of lm_head point along the
model's own hidden states, so an unmasked sampler picks them almost always. The hf backend masks
them; vLLM (which normalises log-probs before any mask) loads a view of the model without them
(`llmkd.models.vocab_trim`), checked here too, also for a head with a bias (Phi)."""
from __future__ import annotations

import json
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


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_vllm_backend_never_samples_or_stores_padding_ids(padded_teacher, greedy, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("LLMKD_CACHE", str(tmp_path))
    model_dir, vocab = padded_teacher
    backend = make_backend("vllm", str(model_dir), max_model_len=128)
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(model_dir)("What is 3 + 4?")["input_ids"]
    spec = SamplingSpec(n=1 if greedy else 4, temperature=0.0 if greedy else 1.0, top_p=1.0,
                        max_new_tokens=8, logprobs=5, seed=0)
    comps = backend.generate([prompt], spec, progress=False)[0]
    backend.close()
    _check(comps, vocab, 5)
    for c in comps:
        ref_lp, ref_ids = _reference(model_dir, vocab, prompt, c.token_ids, 5)
        assert c.topk_ids == ref_ids.tolist()
        assert torch.allclose(torch.tensor(c.topk_logprobs, dtype=torch.float64), ref_lp, atol=1e-4)


def test_vocab_view_cuts_only_the_vocabulary_tensors_and_is_reused(tmp_path):
    """A Phi-style head (bias) with padded rows: the view's logits equal the original's on the
    tokenizer's rows; embedding, head weight and bias are cut, nothing else; shards without them
    are links; a second call reuses the view; a dir whose vocab fits is returned as is."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, PhiConfig, PhiForCausalLM

    from llmkd.models.tiny import tiny_tokenizer
    from llmkd.models.vocab_trim import vocab_tensors, vocab_trimmed

    tok = tiny_tokenizer()
    vocab = len(tok)
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=vocab + 40, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))
    with torch.no_grad():
        model.lm_head.bias.normal_()
    src = tmp_path / "phi"
    model.save_pretrained(src, max_shard_size="60KB")       # several shards: most hold no vocab tensor
    tok.save_pretrained(src)
    assert vocab_tensors(src) == {"model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"}
    view = vocab_trimmed(src, cache=tmp_path / "views")
    assert view != src and vocab_trimmed(src, cache=tmp_path / "views") == view
    shards = sorted(view.glob("*.safetensors"))
    assert len(shards) > 2 and any(f.is_symlink() for f in shards)
    for f in shards:
        with safe_open(f, "pt") as st:
            for name in st.keys():
                if name in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
                    assert st.get_slice(name).get_shape()[0] == vocab and not f.is_symlink(), name
    cut_model = AutoModelForCausalLM.from_pretrained(view)
    assert cut_model.config.vocab_size == vocab
    ids = torch.tensor([tok("a small test of the view")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(cut_model(ids).logits, model(ids).logits[..., :vocab])
    fits = tmp_path / "fits"
    PhiForCausalLM(PhiConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4)).save_pretrained(fits)
    tok.save_pretrained(fits)
    assert vocab_trimmed(fits, cache=tmp_path / "views") == fits


def test_serve_teacher_serves_top_k_from_the_view(padded_teacher, tmp_path, capsys, monkeypatch):
    """`llmkd serve-teacher` (top-k) loads the view and keeps the user's dir as the served name;
    in hidden-state mode (the states do not depend on the head) it loads the dir itself."""
    import yaml

    from llmkd.cli.serve import main

    monkeypatch.setenv("LLMKD_CACHE", str(tmp_path))
    model_dir, _ = padded_teacher
    for targets in ("topk", "hidden"):
        keys = {"teacher_targets": "hidden", "teacher_head": str(tmp_path / "head.safetensors")} \
            if targets == "hidden" else {}
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": {"teacher": str(model_dir), **keys}}))
        assert main([str(tmp_path / "cfg.yaml"), "--dry-run"]) == 0
        argv = capsys.readouterr().out.split()
        loaded = Path(argv[argv.index("--model") + 1])
        assert argv[argv.index("--served-model-name") + 1] == str(model_dir)
        assert (loaded.parent == tmp_path / "vocab_trimmed") == (targets == "topk"), loaded


def test_vocab_view_refuses_what_it_cannot_cut(tmp_path):
    """A checkpoint saved from the bare base model (no `model.` prefix: nothing matches the
    causal-LM names) and a nested multimodal vocab_size are one clear error each, nothing cached;
    a temp dir left by a killed build is removed."""
    from transformers import Qwen2Config, Qwen2Model

    from llmkd.models.tiny import tiny_tokenizer
    from llmkd.models.vocab_trim import _key, loaded_tokenizer_size, vocab_trimmed

    tok = tiny_tokenizer()
    bare = tmp_path / "bare"
    config = Qwen2Config(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    Qwen2Model(config).save_pretrained(bare)
    tok.save_pretrained(bare)
    views = tmp_path / "views"
    stale = views / (_key(bare, loaded_tokenizer_size(bare)) + ".tmp999999999")   # no such pid: a killed build
    stale.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no checkpoint tensor is named .*lm_head\.weight"):
        vocab_trimmed(bare, cache=views)
    assert list(views.iterdir()) == []               # the stale dir and the failed build's are gone
    nested = tmp_path / "nested"
    nested.mkdir()
    tok.save_pretrained(nested)
    (nested / "config.json").write_text(json.dumps({"model_type": "llava",
                                                    "text_config": {"vocab_size": len(tok) + 8}}))
    with pytest.raises(ValueError, match=r"text_config\.vocab_size .* use the hf backend"):
        vocab_trimmed(nested, cache=views)
