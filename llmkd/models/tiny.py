"""Tiny Llama models and a locally trained byte-level BPE tokenizer, for tests and fixtures.

Nothing here touches a hub. The shapes respect vLLM's CPU kernels (head_dim 32), so the same
tiny models run through the vLLM backend in tests.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Small arithmetic/word-problem corpus: enough for BPE merges on digits and words."""
    rng = random.Random(seed)
    names = ["Ann", "Bob", "Cleo", "Dev", "Eve", "Finn"]
    items = ["apples", "books", "coins", "marbles", "pens", "stickers"]
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice(["+", "-", "*"])
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        who, what = rng.choice(names), rng.choice(items)
        out.append(f"What is {a} {op} {b}? The answer is {val}.")
        out.append(f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now? "
                   f"So the answer is {a + b}.")
    return out


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in corpus (deterministic, < 1 s)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, *, layers: int = 2, hidden: int = 64, seed_std: float = 0.02,
                max_positions: int = 512) -> LlamaConfig:
    """A Llama config small enough for a CPU test; head_dim 32 keeps vLLM happy."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
        max_position_embeddings=max_positions, initializer_range=seed_std,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def tiny_model(tokenizer: PreTrainedTokenizerFast, *, layers: int = 2, hidden: int = 64,
               std: float = 0.02, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama; a larger `std` gives a peakier (more teacher-like) model."""
    torch.manual_seed(seed)
    cfg = tiny_config(len(tokenizer), layers=layers, hidden=hidden, seed_std=std)
    cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def pretrain(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, *, steps: int = 150,
             batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> LlamaForCausalLM:
    """A few seconds of language modelling on the built-in corpus, written as chat turns, so the
    tiny teacher has real structure (its samples look like answers, not noise)."""
    rng = random.Random(seed)
    texts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {a}."}],
        tokenize=False) for q, a in _qa_pairs(rng, 2000)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        enc = tokenizer(rng.sample(texts, batch_size), return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _qa_pairs(rng: random.Random, n: int) -> list[tuple[str, int]]:
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 99)
        op = rng.choice(["+", "-", "*"])
        out.append((f"Calculate {b} {op} {a}. Reply with just the number.",
                    {"+": b + a, "-": b - a, "*": b * a}[op]))
    return out


def save_tiny_pair(root: str | Path, *, teacher_layers: int = 2, student_layers: int = 1,
                   pretrain_steps: int = 150) -> tuple[Path, Path]:
    """Write a tiny teacher (briefly pretrained) and a random student with the same tokenizer."""
    root = Path(root)
    tok = tiny_tokenizer()
    teacher = tiny_model(tok, layers=teacher_layers, seed=1)
    if pretrain_steps:
        pretrain(teacher, tok, steps=pretrain_steps)
    student = tiny_model(tok, layers=student_layers, seed=2)
    paths = []
    for name, model in (("teacher", teacher), ("student", student)):
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
