"""ChunkAligner against a naive reference written here from the definitions: chunk boundaries,
chunk ends and the paired mask (each chunk decoded on its own, on both sides) must be identical,
on batches of random texts, for byte-level BPE pairs and SentencePiece-style tokenizers (Metaspace),
including lossy ones (<unk>, lowercase and NFKC normalizers) where some chunks are unpaired."""
from __future__ import annotations

import random

import pytest
from tokenizers import normalizers
from transformers import PreTrainedTokenizerFast

from llmkd.data.alignment import ChunkAligner, encode_in_context, offsets_backend
from test_alignment import PIECES, TEMPLATE_A, TEMPLATE_B, bpe_tokenizer
from test_tokenizer_families import sentencepiece_tokenizer

# words that lossy tokenizers spell differently (case, NFKC, characters they never saw: <unk>)
LOSSY = ["He", "Hello", "BOB", "①", "½", "ﬁve", "❄", "☃", "Ǆ", "x²", "Ⅻ", "ＡＢ", "Straße"]
WORDS = ["the", "answer", "is", "42", "cat", "naïve", "café", "so", ".", ",", "?", "\n"]


def reference(text: str, ctx_a: str, ctx_b: str, tok_a: PreTrainedTokenizerFast,
              tok_b: PreTrainedTokenizerFast) -> tuple[list, list[bool], list[int]]:
    """(chunks, paired, ends) from first principles, quadratic and one decode per chunk."""
    (ids_a, off_a), = encode_in_context(tok_a, [ctx_a], [text])
    (ids_b, off_b), = encode_in_context(tok_b, [ctx_b], [text])
    if not ids_a:
        return [], [], []

    def cuts(off: list[tuple[int, int]]) -> dict[int, int]:
        out: dict[int, int] = {}
        for t in range(len(off) + 1):     # cut before token t: everything before ends, nothing after starts
            end = max([e for s, e in off[:t] if e > s], default=0)
            if all(s >= end for s, e in off[t:] if e > s) and end not in out:
                out[end] = t
        return out

    ca, cb = cuts(off_a), cuts(off_b)
    inner = [(ca[c], cb[c]) for c in sorted(ca) if c in cb and 0 < ca[c] < len(ids_a) and 0 < cb[c] < len(ids_b)]
    points = [(0, 0), *inner, (len(ids_a), len(ids_b))]
    chunks = [((a0, a1), (b0, b1)) for (a0, b0), (a1, b1) in zip(points, points[1:]) if a1 > a0 and b1 > b0]
    ends: list[int] = []
    for (a0, a1), _ in chunks:
        ends.append(max([ends[-1] if ends else 0] + [e for s, e in off_a[a0:a1] if e > s]))
    dec_a, dec_b = offsets_backend(tok_a), offsets_backend(tok_b)
    paired = []
    for ((a0, a1), (b0, b1)), start, end in zip(chunks, [0, *ends], ends):
        spelled = ["".join(s.split()) for s in (dec_a.decode(ids_a[a0:a1], skip_special_tokens=False),
                                                text[start:end],
                                                dec_b.decode(ids_b[b0:b1], skip_special_tokens=False))]
        paired.append(spelled[0] == spelled[1] == spelled[2])
    return chunks, paired, ends


def random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    pool = PIECES + LOSSY + WORDS
    texts = ["", " ", "Hello world", "HELLO THERE"]
    for _ in range(n):
        parts = [rng.choice(pool) for _ in range(rng.randint(1, 14))]
        texts.append("".join(p if rng.random() < 0.4 else " " + p for p in parts))
    return texts


def sp(kind: str) -> PreTrainedTokenizerFast:
    if kind == "unk":                     # no byte fallback: unseen characters become <unk>
        return sentencepiece_tokenizer(byte_fallback=False)
    return sentencepiece_tokenizer({"plain": None, "lowercase": normalizers.Lowercase(),
                                    "nfkc": normalizers.NFKC()}[kind])


TOKENIZERS = {
    "bpe_a": lambda: bpe_tokenizer(700, seed=1, chat_template=TEMPLATE_A),
    "bpe_b": lambda: bpe_tokenizer(1100, seed=2, use_regex=False, trim_offsets=True,
                                   specials=("<pad>", "</s>", "<s>"), chat_template=TEMPLATE_B),
    "sp": lambda: sp("plain"), "sp_lowercase": lambda: sp("lowercase"), "sp_nfkc": lambda: sp("nfkc"),
    "sp_unk": lambda: sp("unk"),
}
PAIRS = [("bpe_a", "bpe_b"), ("sp", "bpe_a"), ("bpe_b", "sp"), ("sp_lowercase", "bpe_a"),
         ("sp_nfkc", "bpe_b"), ("sp_unk", "bpe_a"), ("sp_lowercase", "sp_unk")]


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    return {name: make() for name, make in TOKENIZERS.items()}


@pytest.mark.parametrize("names", PAIRS, ids=["-".join(p) for p in PAIRS])
@pytest.mark.parametrize("in_context", [False, True])
def test_aligner_equals_naive_reference(tokenizers, names: tuple[str, str], in_context: bool) -> None:
    tok_a, tok_b = tokenizers[names[0]], tokenizers[names[1]]
    texts = random_texts(seed=len(names[0]) * 31 + len(names[1]) + in_context, n=120)
    ctx_a = [f"<|user|>\nQ{i}<|end|>\n<|assistant|>\n" if in_context else "" for i in range(len(texts))]
    ctx_b = [f"[USER]: Q{i}\n\n[ASSISTANT]:" if in_context else "" for i in range(len(texts))]
    rows = ChunkAligner(tok_a, tok_b)(texts, ctx_a, ctx_b)
    unpaired = 0
    for text, a, b, row in zip(texts, ctx_a, ctx_b, rows):
        chunks, paired, ends = reference(text, a, b, tok_a, tok_b)
        assert (row.chunks, row.paired, row.ends) == (chunks, paired, ends), text
        unpaired += paired.count(False)
    # the SentencePiece-style ones exercise the unpaired branch: besides their normalizers, their
    # byte fallback has no <0x..> tokens to fall back to (the trainer's alphabet is characters),
    # so characters they never saw become <unk>
    assert (unpaired > 0) == any(n.startswith("sp") for n in names)
