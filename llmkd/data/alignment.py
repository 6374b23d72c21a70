"""Tokenizer-pair alignment: cut two tokenizations of one text into chunks that cover the same
characters, so a teacher and a student with different tokenizers can be compared chunk by chunk.

Both tokenizers must be fast (Rust) tokenizers: their character offsets are what makes the
alignment exact. A cut between two tokens is *valid* when no character is shared across it (a
byte-level token holding half of a multi-byte character overlaps its neighbour, so it can never
end a chunk). Chunks are the shortest spans between the character positions where both
tokenizations have a valid cut. Everything here works on plain lists: no torch, computed once per
example when features are built.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]
Chunk = tuple[Span, Span]        # ((start_a, end_a), (start_b, end_b)), token indices, end exclusive

# Offset-only copies of each tokenizer's Rust backend, made once per tokenizer object.
_BACKENDS: "weakref.WeakKeyDictionary[Any, tuple[int, Tokenizer]]" = weakref.WeakKeyDictionary()


def offsets_backend(tokenizer: "PreTrainedTokenizerBase") -> "Tokenizer":
    """The tokenizer's Rust backend without its post-processor.

    Post-processors only add special tokens (never with add_special_tokens=False) and, for
    GPT-2-style `ByteLevel(trim_offsets=True)`, shrink offsets so that leading spaces belong to no
    token; without it every character of the text belongs to exactly one token, which is what the
    alignment needs. Token ids are unchanged.
    """
    cached = _BACKENDS.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):   # re-made when tokens were added
        return cached[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')!r}) is a "
            "slow (Python) tokenizer without character offsets, which cross-tokenizer alignment "
            "needs; load a fast tokenizer instead: AutoTokenizer.from_pretrained(path, use_fast=True) "
            "(or convert it with transformers' convert_slow_tokenizer)")
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.post_processor = None
    copy.no_truncation()
    copy.no_padding()
    _BACKENDS[tokenizer] = (len(tokenizer), copy)
    return copy


def encode_with_offsets(tokenizer: "PreTrainedTokenizerBase",
                        texts: Sequence[str]) -> list[tuple[list[int], list[Span]]]:
    """(token ids, character offsets) of each text with add_special_tokens=False; the ids equal
    `tokenizer(text, add_special_tokens=False).input_ids`. Batched in Rust."""
    encs = offsets_backend(tokenizer).encode_batch(list(texts), add_special_tokens=False)
    return [(list(e.ids), [tuple(o) for o in e.offsets]) for e in encs]


def encode_in_context(tokenizer: "PreTrainedTokenizerBase", contexts: Sequence[str],
                      texts: Sequence[str]) -> list[tuple[list[int], list[Span]]]:
    """(ids, offsets within the text) of each text as the tokenizer cuts it right after its
    context (the rendered prompt), which is where the model reads and writes it.

    Tokenised alone, a text gets what the tokenizer adds at the start of a string:
    SentencePiece-style tokenizers (Metaspace, prepend_scheme "first": Llama 2, Mistral,
    TinyLlama) prepend the word-start marker, so a response "The" after a template ending in
    "\\n" would train on "▁The", a token the model never sees there. Where a token of the full
    string straddles the boundary (a merge across it), that text is tokenised alone instead.
    """
    backend = offsets_backend(tokenizer)
    full = backend.encode_batch([c + t for c, t in zip(contexts, texts)], add_special_tokens=False)
    out: list[tuple[list[int], list[Span]]] = []
    for context, text, enc in zip(contexts, texts, full):
        n, offsets = len(context), enc.offsets
        k = len(offsets)
        while k > 0 and offsets[k - 1][0] >= n:
            k -= 1
        if all(e <= n for _, e in offsets[:k]):
            out.append((list(enc.ids[k:]), [(s - n, e - n) for s, e in offsets[k:]]))
        else:
            alone = backend.encode(text, add_special_tokens=False)
            out.append((list(alone.ids), [tuple(o) for o in alone.offsets]))
    return out


def _cuts_and_reach(offsets: Sequence[Span]) -> tuple[dict[int, int], list[int]]:
    """`valid_cuts` and, per token count t, the furthest end of the tokens before t (0 for none)."""
    inf = float("inf")
    reach = list(accumulate((e if e > s else 0 for s, e in offsets), max, initial=0))
    first_start = list(accumulate((s if e > s else inf for s, e in reversed(offsets)), min, initial=inf))[::-1]
    cuts: dict[int, int] = {}
    for t, (end, start) in enumerate(zip(reach, first_start)):
        if end <= start and end not in cuts:
            cuts[end] = t
    return cuts, reach


def valid_cuts(offsets: Sequence[Span]) -> dict[int, int]:
    """Character position -> number of tokens before it, for every valid cut (smallest count
    where zero-width tokens make several counts share a position), in increasing position.

    The cut before token t sits at the furthest end of tokens < t and is valid when no later
    token starts before it. Zero-width tokens constrain nothing.
    """
    return _cuts_and_reach(offsets)[0]


def chunks_from_offsets(offsets_a: Sequence[Span], offsets_b: Sequence[Span], *,
                        region: Span | None = None, region_b: Span | None = None) -> list[Chunk]:
    """Shortest chunks whose character spans end together.

    Without `region`, the chunks cover both token sequences completely (the first starts at token
    0, the last ends at the last token on each side). With `region=(start, end)` (characters of
    side a's text) and `region_b` (the same characters in side b's text, which may be a different
    string, e.g. another chat template), only the tokens inside the region are chunked; a token
    that straddles the region's edge stays outside every chunk.
    """
    return _chunks(valid_cuts(offsets_a), valid_cuts(offsets_b), len(offsets_a), len(offsets_b),
                   region=region, region_b=region_b)


def _chunks(cuts_a: dict[int, int], cuts_b: dict[int, int], n_a: int, n_b: int, *,
            region: Span | None = None, region_b: Span | None = None) -> list[Chunk]:
    if region is None:
        shift, lo, hi = 0, 0, max(cuts_a)
    else:
        lo, hi = region
        rb = region_b if region_b is not None else region
        if rb[1] - rb[0] != hi - lo:
            raise ValueError(f"regions {region} and {rb} have different lengths")
        shift = rb[0] - lo
    common = [(t, cuts_b[c + shift]) for c, t in cuts_a.items()       # in increasing position
              if lo <= c <= hi and c + shift in cuts_b]
    if region is None:   # cover both sequences completely, whatever the edge offsets say
        common = [(0, 0)] + [p for p in common if 0 < p[0] < n_a and 0 < p[1] < n_b]
        common.append((n_a, n_b))
    chunks: list[Chunk] = []
    for (a0, b0), (a1, b1) in zip(common, common[1:]):
        if a1 > a0 and b1 > b0:
            chunks.append(((a0, a1), (b0, b1)))
    return chunks


def align_chunks(text: str, tokenizer_a: "PreTrainedTokenizerBase",
                 tokenizer_b: "PreTrainedTokenizerBase") -> list[Chunk]:
    """Token-index spans [start, end) in each tokenization of `text` (add_special_tokens=False),
    covering both completely and in order; chunks are the shortest whose character ends coincide.
    An empty text has no chunks."""
    (_, off_a), = encode_with_offsets(tokenizer_a, [text])
    (_, off_b), = encode_with_offsets(tokenizer_b, [text])
    if not off_a or not off_b:
        if off_a or off_b:
            raise ValueError(f"one tokenizer produced no tokens for {text[:40]!r}; cannot align")
        return []
    return chunks_from_offsets(off_a, off_b)


@dataclass
class AlignedText:
    """One text under both tokenizers and its chunks. `paired[k]`: chunk k spells the same text
    on both sides (False where one side has an <unk> or a lossy normalizer changed the
    characters: the likelihoods are then of different texts); `ends[k]`: its end in the text."""

    ids_a: list[int]
    ids_b: list[int]
    chunks: list[Chunk]
    paired: list[bool] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)


class ChunkAligner:
    """Aligns many texts for one tokenizer pair: batched Rust encoding, backends made once.
    Use it in `Dataset.map(batched=True)` so the alignment is computed once per example.
    With `contexts_a`/`contexts_b` (each side's rendered prompt) every text is tokenised where
    it follows its prompt (`encode_in_context`)."""

    def __init__(self, tokenizer_a: "PreTrainedTokenizerBase", tokenizer_b: "PreTrainedTokenizerBase") -> None:
        self.tokenizer_a, self.tokenizer_b = tokenizer_a, tokenizer_b
        offsets_backend(tokenizer_a)
        offsets_backend(tokenizer_b)

    def __call__(self, texts: Sequence[str], contexts_a: Sequence[str] | None = None,
                 contexts_b: Sequence[str] | None = None) -> list[AlignedText]:
        enc_a = encode_in_context(self.tokenizer_a, contexts_a or [""] * len(texts), texts)
        enc_b = encode_in_context(self.tokenizer_b, contexts_b or [""] * len(texts), texts)
        out = []
        for text, (ids_a, off_a), (ids_b, off_b) in zip(texts, enc_a, enc_b):
            if bool(ids_a) != bool(ids_b):
                raise ValueError(f"one tokenizer produced no tokens for {text[:40]!r}; cannot align")
            cuts_a, reach = _cuts_and_reach(off_a)
            chunks = _chunks(cuts_a, valid_cuts(off_b), len(off_a), len(off_b)) if ids_a else []
            # the chunks tile both sides from token 0, so a chunk ends at the furthest end of the
            # tokens before its last one (monotone, also past zero-width tokens)
            out.append(AlignedText(ids_a, ids_b, chunks, ends=[reach[a1] for (_, a1), _ in chunks]))
        spelled_alike(texts, out, self.tokenizer_a, self.tokenizer_b)
        return out


def _squash(text: str) -> str:
    return "".join(text.split())


def _spellings(tokenizer: "PreTrainedTokenizerBase", pieces: list[tuple[int, ...]]) -> list[str]:
    """Each piece of token ids decoded on its own, whitespace removed; the same piece (" the",
    "=", a number) recurs across a batch, so each distinct one is decoded once, in one Rust call."""
    distinct = list(dict.fromkeys(pieces))
    if not distinct:
        return []
    decoded = offsets_backend(tokenizer).decode_batch([list(p) for p in distinct], skip_special_tokens=False)
    spelled = {p: _squash(d) for p, d in zip(distinct, decoded)}
    return [spelled[p] for p in pieces]


def spelled_alike(texts: Sequence[str], aligned: Sequence[AlignedText], tokenizer_a: "PreTrainedTokenizerBase",
                  tokenizer_b: "PreTrainedTokenizerBase") -> None:
    """Sets each text's `paired`: per chunk, do both sides' tokens decode to the chunk's
    characters (whitespace aside)?

    Offsets map every token back to the original characters, so an <unk> or a token a lossy
    normalizer produced (lowercase, NFKC: "He" -> "he", "①" -> "1") still covers its span; only
    decoding shows that the two likelihoods would be of different texts. Each chunk is decoded
    as a whole: decoders do not concatenate (a byte-level character split over tokens, a
    SentencePiece word-start marker at the start of a string).
    """
    spelled_a = iter(_spellings(tokenizer_a, [tuple(al.ids_a[a0:a1]) for al in aligned for (a0, a1), _ in al.chunks]))
    spelled_b = iter(_spellings(tokenizer_b, [tuple(al.ids_b[b0:b1]) for al in aligned for _, (b0, b1) in al.chunks]))
    for text, al in zip(texts, aligned):
        paired, start = [], 0
        for end, x, y in zip(al.ends, spelled_a, spelled_b):
            piece = text[start:end]
            paired.append(x == y and (piece == x or _squash(piece) == x))
            start = end
        al.paired = paired


def merge_at_word_ends(text: str, al: AlignedText) -> AlignedText:
    """Join consecutive chunks so that each ends where the text's next character is whitespace
    (or at its end): there neither tokenizer can merge across, so a chunk's likelihood plus the
    probability that a new word starts next is the likelihood of the same event on both sides
    (the debiasing of tokenkit's `alm_unbiased`). A joined chunk is paired when all its parts are."""
    chunks, paired, ends = [], [], []
    first = 0
    for k, end in enumerate(al.ends):
        if end >= len(text) or text[end].isspace() or k == len(al.chunks) - 1:
            (a0, _), (b0, _) = al.chunks[first]
            (_, a1), (_, b1) = al.chunks[k]
            chunks.append(((a0, a1), (b0, b1)))
            paired.append(all(al.paired[first: k + 1]))
            ends.append(end)
            first = k + 1
    return AlignedText(al.ids_a, al.ids_b, chunks, paired, ends)


_BOUNDARY: "weakref.WeakKeyDictionary[Any, tuple[int, list[int]]]" = weakref.WeakKeyDictionary()


def boundary_token_ids(tokenizer: "PreTrainedTokenizerBase") -> list[int]:
    """Ids of the tokens that start a new word: their text begins with whitespace (space, tab,
    newline, in any spelling: "Ġ", "▁", "<0x0A>"), and the special tokens. Each token is decoded
    after a plain one, since decoders drop a leading space at the start of a string."""
    cached = _BOUNDARY.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    backend = offsets_backend(tokenizer)
    anchor = backend.encode("a", add_special_tokens=False).ids[-1:]
    prefix = backend.decode(anchor, skip_special_tokens=False)
    texts = backend.decode_batch([anchor + [i] for i in range(len(tokenizer))], skip_special_tokens=False)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = [i for i, t in enumerate(texts) if i in special or t[len(prefix):][:1].isspace()]
    _BOUNDARY[tokenizer] = (len(tokenizer), ids)
    return ids
