"""Tokenizer families the byte-level tiny tokenizer does not exercise, built on the spot:
SentencePiece-style (Metaspace, prepend_scheme "first": Llama 2 / Mistral / TinyLlama) and lossy
ones (an <unk> for unseen characters, lowercase and NFKC normalizers).

A response must be tokenised as it follows its prompt (no word-start marker the same text never
gets there), for dataset rows and on-policy samples; chunks that spell different text on the two
sides must get no loss, be counted, and a pair where most would be masked is refused."""
from __future__ import annotations

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llmkd.data.collate import chat_prompt_ids, chat_prompt_text, tokenize_rows
from llmkd.methods.cross_tokenizer import CrossTokenizer, CrossTokenizerParams
from llmkd.models.tiny import _corpus

# TinyLlama / Zephyr style: the assistant's text follows "<|assistant|>\n"
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ROWS = {"prompt": ["What is 12 + 30?", "Ann has 3 pens. How many now?", "Name a colour."],
        "response": ["The answer is 42.", "So the answer is 9 pens.", "Blue is a colour."]}


def sentencepiece_tokenizer(normalizer: normalizers.Normalizer | None = None, *,
                            byte_fallback: bool = True) -> PreTrainedTokenizerFast:
    """BPE under a Metaspace pre-tokenizer/decoder with prepend_scheme "first" (Llama 2 style);
    without byte fallback, unseen characters become <unk>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=byte_fallback))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    parts = [decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    tok.decoder = decoders.Sequence(parts + [decoders.ByteFallback(), decoders.Fuse()] if byte_fallback else parts)
    alphabet = [f"<0x{i:02X}>" for i in range(256)] if byte_fallback else []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=60)
    texts = _corpus(400, seed=3) + [f"<|assistant|>\n{r}</s>" for r in ROWS["response"]] * 20
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="module")
def byte_level(tiny_pair) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(tiny_pair[0])


def in_context(tok: PreTrainedTokenizerFast, prompt: str, response: str) -> list[int]:
    """The response's ids inside the whole rendered text: what the model reads and writes."""
    full = tok(chat_prompt_text(tok, prompt) + response, add_special_tokens=False)["input_ids"]
    head = chat_prompt_ids(tok, prompt)
    assert full[: len(head)] == head
    return full[len(head):]


def test_sentencepiece_response_has_no_word_start_marker_in_rows() -> None:
    tok = sentencepiece_tokenizer()
    alone = tok("The answer is 42.", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone)[0].startswith("▁")       # what a lone string gets
    feats = tokenize_rows(Dataset.from_dict(ROWS), tok, response="response", max_length=128)
    for row, prompt, response in zip(feats, ROWS["prompt"], ROWS["response"]):
        resp = row["input_ids"][row["prompt_len"]:]
        assert resp == in_context(tok, prompt, response) + [tok.eos_token_id]
        assert not tok.convert_ids_to_tokens(resp)[0].startswith("▁")


def test_sentencepiece_vs_byte_level_first_chunk_pairs_the_same_text(byte_level) -> None:
    sp = sentencepiece_tokenizer()
    method = CrossTokenizer(CrossTokenizerParams())
    method.setup(sp, byte_level)
    feats = method.features(Dataset.from_dict(ROWS), response="response", max_length=128)
    for row, prompt, response in zip(feats, ROWS["prompt"], ROWS["response"]):
        ps = row["prompt_len"]
        assert row["input_ids"][ps:] == in_context(sp, prompt, response) + [sp.eos_token_id]
        a0, a1, b0, b1 = row["chunk_spans"][0]
        assert (a0, b0) == (ps, row["teacher_prompt_len"])
        s_text = sp.decode(row["input_ids"][a0:a1])
        t_text = byte_level.decode(row["teacher_input_ids"][b0:b1])
        assert s_text == t_text and response.startswith(t_text)
        assert row["unpaired_chunks"] == 0


def test_sentencepiece_on_policy_sample_keeps_its_tokens(byte_level) -> None:
    """A sampled response decoded alone would lose (or, re-encoded alone, gain) the leading
    word-start marker; read after its prompt, the student's tokens come back unchanged."""
    sp = sentencepiece_tokenizer()
    method = CrossTokenizer(CrossTokenizerParams())
    method.setup(sp, byte_level)
    feats = method.features(Dataset.from_dict(ROWS), response="response", max_length=128)
    batch = method.collate([feats[i] for i in range(2)])
    samples = [in_context(sp, ROWS["prompt"][0], "The answer is 12."),
               in_context(sp, ROWS["prompt"][1], " So 9.")]     # a sample that starts with a space
    rows = [{"input_ids": f["input_ids"][: f["prompt_len"]] + s + [sp.eos_token_id], "prompt_len": f["prompt_len"],
             "labels": [-100] * f["prompt_len"] + s + [sp.eos_token_id],
             "teacher_input_ids": batch["teacher_input_ids"][i].tolist(),
             "teacher_prompt_len": int(batch["teacher_prompt_len"][i])}
            for i, (f, s) in enumerate(zip(feats, samples))]
    new = method.sampled_batch(rows)
    for i, (f, s, text) in enumerate(zip(feats, samples, ("The answer is 12.", " So 9."))):
        ps, n = f["prompt_len"], int(new["attention_mask"][i].sum())
        assert new["input_ids"][i][ps:n].tolist() == s + [sp.eos_token_id]
        tp, m = int(new["teacher_prompt_len"][i]), int(new["teacher_attention_mask"][i].sum())
        assert byte_level.decode(new["teacher_input_ids"][i][tp:m - 1]) == text


@pytest.mark.parametrize("normalizer,text,bad", [
    (normalizers.Lowercase(), "He said Hello to Bob.", ["He", "Hello", "Bob"]),
    (normalizers.NFKC(), "Step ① costs ½ of ﬁve.", ["①", "½", "ﬁve"]),
    (None, "Snow ❄ falls ☃ here.", ["❄", "☃"]),          # no byte fallback: <unk>
])
def test_chunks_spelling_different_text_are_masked_and_counted(byte_level, normalizer, text: str,
                                                               bad: list[str]) -> None:
    sp = sentencepiece_tokenizer(normalizer, byte_fallback=normalizer is not None)
    method = CrossTokenizer(CrossTokenizerParams())
    method.setup(sp, byte_level)
    rows = {"prompt": ["Tell me."], "response": [text]}
    row = method.features(Dataset.from_dict(rows), response="response", max_length=128)[0]
    assert row["unpaired_chunks"] >= len(bad)
    assert row["eos_chunk"]
    for a0, a1, b0, b1 in row["chunk_spans"][:-1]:  # every chunk left spells one text on both sides
        t_text = byte_level.decode(row["teacher_input_ids"][b0:b1])
        assert "".join(sp.decode(row["input_ids"][a0:a1]).split()) == "".join(t_text.split())
        assert not any(w in t_text for w in bad)
    batch = method.collate([row])
    want = row["unpaired_chunks"] / (row["unpaired_chunks"] + len(row["chunk_spans"]))
    assert float(batch["unpaired_chunks"].sum()) == row["unpaired_chunks"] and 0 < want < 1


def test_mostly_unpaired_pair_is_refused_at_features(byte_level) -> None:
    sp = sentencepiece_tokenizer(normalizers.Lowercase())
    method = CrossTokenizer(CrossTokenizerParams())
    method.setup(sp, byte_level)
    rows = {"prompt": ["Shout."], "response": ["HELLO THERE ALL YOU BIG LOUD PEOPLE."]}
    with pytest.raises(ValueError, match=r"model\.student / model\.teacher: \d+ of \d+ response chunks"):
        method.features(Dataset.from_dict(rows), response="response", max_length=128)
