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


def save_tiny_pair(root: str | Path, *, teacher_layers: int = 2, student_layers: int = 1,
                   teacher_std: float = 0.2) -> tuple[Path, Path]:
    """Write a tiny teacher and student (same tokenizer) as safetensors model dirs."""
    root = Path(root)
    tok = tiny_tokenizer()
    paths = []
    for name, layers, std, seed in (("teacher", teacher_layers, teacher_std, 1),
                                    ("student", student_layers, 0.02, 2)):
        path = root / name
        tiny_model(tok, layers=layers, std=std, seed=seed).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
