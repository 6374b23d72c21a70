"""Tokenizer-pair alignment: property tests on random unicode text with two different byte-level
BPE tokenizers trained here, checked against an independent byte-level oracle, plus TRL GOLD's
byte-offset groups as a peer."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llmkd.data.alignment import ChunkAligner, align_chunks, chunks_from_offsets, encode_with_offsets

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# pieces that stress the alignment: multi-byte characters, emoji (4 bytes, ZWJ sequences),
# combining marks, runs of whitespace, digit runs, special-token strings
PIECES = ["a", "the", " the", "  ", "   ", "\n", "\n\n", "\t", " \t\n", "0", "12", "123456", " 42",
          "é", "ß", "日本語", "中", "😀", "👍🏽", "👨‍👩‍👧", "e\u0301", "\u200b", "Ω≈ç", "<|end|>",
          "<|user|>", "<s>", "ab cd", "Hello, world!", "\r\n", "ǅ", "ﬁ", "\U0001f9d1"]


def _corpus(seed: int, n: int = 400) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "answer", "is", "cat", "naïve", "café", "日本", "語", "😀", "😃", "🙂", "👍",
             "über", "straße", "1234", "56", "7", "x", "ы", "ж", "€", "→", "\n", "  "]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def bpe_tokenizer(vocab_size: int, *, seed: int, use_regex: bool = True, trim_offsets: bool = False,
                  specials: tuple[str, ...] = ("<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"),
                  chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small mixed-script corpus (deterministic, < 1 s)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], eos_token=specials[1])
    fast.chat_template = chat_template
    return fast


TEMPLATE_A = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TEMPLATE_B = ("{% for m in messages %}[{{ m['role'] | upper }}]: {{ m['content'] | trim }}\n\n{% endfor %}"
              "{% if add_generation_prompt %}[ASSISTANT]:{% endif %}")


@pytest.fixture(scope="module")
def pair() -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """Two genuinely different tokenizers: different corpora, vocab sizes, pre-tokenization
    (B merges across spaces), offset trimming (B is GPT-2 style) and special tokens."""
    a = bpe_tokenizer(700, seed=1, chat_template=TEMPLATE_A)
    b = bpe_tokenizer(1100, seed=2, use_regex=False, trim_offsets=True,
                      specials=("<pad>", "</s>", "<s>"), chat_template=TEMPLATE_B)
    return a, b


# -- an independent oracle for byte-level BPE: token bytes -> common UTF-8 character boundaries --

def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_DECODER = _byte_decoder()


def token_bytes(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> list[bytes]:
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    out = []
    for i in ids:
        piece = tokenizer.convert_ids_to_tokens(i)
        out.append(piece.encode() if i in special else bytes(BYTE_DECODER[c] for c in piece))
    return out


def oracle_chunks(text: str, tok_a, tok_b) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Chunks from first principles: cut where both byte streams have a token boundary that is
    also a character boundary of the UTF-8 text."""
    char_bounds = {0}
    pos = 0
    for ch in text:
        pos += len(ch.encode())
        char_bounds.add(pos)

    def bounds(tok):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out, pos = {}, 0
        for t, piece in enumerate(token_bytes(tok, ids), start=1):
            pos += len(piece)
            if pos in char_bounds:
                out.setdefault(pos, t)
        return out, len(ids)

    (ba, na), (bb, nb) = bounds(tok_a), bounds(tok_b)
    common = [(ba[p], bb[p]) for p in sorted(ba) if p in bb and p < len(text.encode())]
    edges = [(0, 0)] + common + [(na, nb)]
    return [((a0, a1), (b0, b1)) for (a0, b0), (a1, b1) in zip(edges, edges[1:])]


def check_chunks(text: str, tok_a, tok_b, chunks) -> None:
    ids_a = tok_a(text, add_special_tokens=False)["input_ids"]
    ids_b = tok_b(text, add_special_tokens=False)["input_ids"]
    if not text:
        assert chunks == []
        return
    # complete, in order, non-empty on both sides
    assert chunks[0][0][0] == 0 and chunks[0][1][0] == 0
    assert chunks[-1][0][1] == len(ids_a) and chunks[-1][1][1] == len(ids_b)
    for (sa, ea), (sb, eb) in chunks:
        assert ea > sa and eb > sb
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev[0][1] == nxt[0][0] and prev[1][1] == nxt[1][0]
    # each chunk decodes to the same characters on both sides, and the chunks spell the text
    pieces = []
    for (sa, ea), (sb, eb) in chunks:
        da = tok_a.decode(ids_a[sa:ea], clean_up_tokenization_spaces=False)
        db = tok_b.decode(ids_b[sb:eb], clean_up_tokenization_spaces=False)
        assert da == db
        pieces.append(da)
    assert "".join(pieces) == text


texts = st.one_of(st.text(max_size=60), st.lists(st.sampled_from(PIECES), max_size=14).map("".join))


@SETTINGS
@given(text=texts)
def test_chunks_cover_both_sides_and_decode_alike(pair, text: str) -> None:
    a, b = pair
    chunks = align_chunks(text, a, b)
    check_chunks(text, a, b, chunks)
    if text:
        assert chunks == oracle_chunks(text, a, b)   # and they are the shortest such chunks


@SETTINGS
@given(text=texts)
def test_identical_tokenizers_give_one_token_chunks(pair, text: str) -> None:
    """Same tokenizer: chunks are single tokens, except the byte tokens of one character."""
    a, _ = pair
    chunks = align_chunks(text, a, a)
    assert all(c[0] == c[1] for c in chunks)
    assert chunks == oracle_chunks(text, a, a) if text else chunks == []
    ids = a(text, add_special_tokens=False)["input_ids"]
    for (s, e), _ in chunks:
        if e - s > 1:   # then its first token ends inside a multi-byte character
            assert "\ufffd" in a.decode(ids[s:s + 1]) and "\ufffd" not in a.decode(ids[s:e])


@SETTINGS
@given(text=st.text(alphabet=st.characters(max_codepoint=127), max_size=60))
def test_identical_tokenizers_ascii_every_chunk_is_one_token(pair, text: str) -> None:
    a, _ = pair
    n = len(a(text, add_special_tokens=False)["input_ids"])
    assert align_chunks(text, a, a) == [((i, i + 1), (i, i + 1)) for i in range(n)]


def test_ids_are_the_tokenizers_own(pair) -> None:
    a, b = pair
    text = "  Hello,   wörld 😀\n\n123 <|end|></s>"
    for tok in (a, b):
        (ids, offsets), = encode_with_offsets(tok, [text])
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == enc["input_ids"]
    # B trims leading spaces out of its offsets (GPT-2 style); the alignment sees untrimmed ones
    trimmed = b(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(e == s for s, e in trimmed)          # zero-width trimmed space tokens exist
    assert all(e > s for s, e in encode_with_offsets(b, [text])[0][1])


def test_known_chunks_for_a_multibyte_split() -> None:
    """A character split across byte-level tokens (offsets repeat) never ends a chunk."""
    # side a: 'é' is one token; side b: two byte tokens both reporting the character (1, 2)
    off_a = [(0, 1), (1, 2), (2, 4)]
    off_b = [(0, 1), (1, 2), (1, 2), (2, 3), (3, 4)]
    assert chunks_from_offsets(off_a, off_b) == [((0, 1), (0, 1)), ((1, 2), (1, 3)), ((2, 3), (3, 5))]
    # a token overlapping its neighbour (a merge across half a character) fuses chunks
    off_c = [(0, 2), (1, 4)]
    assert chunks_from_offsets(off_a, off_c) == [((0, 3), (0, 2))]


def test_batched_aligner_equals_single(pair) -> None:
    a, b = pair
    batch = ["Hello world", "", "😀 é 123", "<|end|> x  y"]
    out = ChunkAligner(a, b)(batch)
    for text, row in zip(batch, out):
        assert row.chunks == align_chunks(text, a, b)
        assert row.ids_a == a(text, add_special_tokens=False)["input_ids"]
        assert row.ids_b == b(text, add_special_tokens=False)["input_ids"]


def test_slow_tokenizer_fails_with_the_fix(pair) -> None:
    from transformers import ByT5Tokenizer

    with pytest.raises(ValueError, match="use_fast=True"):
        align_chunks("abc", ByT5Tokenizer(), pair[0])


@pytest.fixture(scope="module")
def gold_pair() -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """Two byte-level tokenizers with untrimmed offsets (GOLD reads the backend's offsets)."""
    return bpe_tokenizer(600, seed=3), bpe_tokenizer(900, seed=4, use_regex=False)


@SETTINGS
@given(text=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
def test_chunks_equal_trl_gold_groups_on_ascii(gold_pair, text: str) -> None:
    """TRL GOLD aligns by byte offsets; on ASCII text our chunks are exactly its groups."""
    from trl.experimental.gold.gold_trainer import ULDLoss
    from trl.experimental.utils import encode_with_byte_offsets

    a, b = gold_pair
    ours = align_chunks(text, a, b)
    (_, offs_a), = encode_with_byte_offsets(a.backend_tokenizer, [text])
    (_, offs_b), = encode_with_byte_offsets(b.backend_tokenizer, [text])
    groups_a, groups_b = ULDLoss._align_by_byte_offsets(offs_a, offs_b)
    assert [list(range(*c[0])) for c in ours] == groups_a
    assert [list(range(*c[1])) for c in ours] == groups_b
