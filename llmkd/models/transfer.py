"""Tokenizer transfer (the ALM paper's main use): `train_tokenizer` trains a new byte-level BPE
tokenizer and `transfer_student` gives a teacher's layers that tokenizer, each new embedding the
mean of the teacher embeddings of the token's pieces."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast


def train_tokenizer(texts: list[str], vocab_size: int, like: PreTrainedTokenizerBase) -> PreTrainedTokenizerFast:
    """A new byte-level BPE tokenizer trained on `texts`, keeping `like`'s special and added
    tokens (same strings, so its chat template renders the same way) and its chat template.
    Digits are not split one by one and merges follow `texts`: a different tokenization."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    added = [t.content for _, t in sorted(like.added_tokens_decoder.items())]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=added, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    names = {k: getattr(like, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
             if getattr(like, k, None) is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.chat_template = like.chat_template
    return fast


def teacher_pieces(new_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> list[list[int]]:
    """For each token of `new_tok`, the teacher token ids spelling the same bytes (a token with
    the same string where one exists; byte-level pieces through the teacher's own BPE model, so
    a token holding part of a character still maps; otherwise its decoded text re-encoded)."""
    t_vocab = teacher_tok.get_vocab()
    backend = teacher_tok.backend_tokenizer
    byte_level = all("ByteLevel" in repr(t.backend_tokenizer.pre_tokenizer) for t in (new_tok, teacher_tok))
    out = []
    for i in range(len(new_tok)):
        piece = new_tok.convert_ids_to_tokens(i)
        if piece in t_vocab:
            out.append([t_vocab[piece]])
        elif byte_level:
            out.append([t_vocab[t.value] for t in backend.model.tokenize(piece)])
        else:
            out.append(teacher_tok(new_tok.decode([i]), add_special_tokens=False)["input_ids"])
    return out


def transfer_student(teacher: PreTrainedModel, teacher_tok: PreTrainedTokenizerBase,
                     new_tok: PreTrainedTokenizerBase, layers: str | int | list[int] = "all") -> PreTrainedModel:
    """The teacher's layers (all, "every_other", a count or a list) under `new_tok`: each new
    embedding row (and lm_head row, when untied) is the mean of the teacher rows of its pieces."""
    import torch

    from llmkd.models.student import derive_student

    n_layers = len(teacher.get_decoder().layers)
    student = derive_student(teacher, list(range(n_layers)) if layers == "all" else layers)
    pieces = teacher_pieces(new_tok, teacher_tok)

    def mean_rows(weight: torch.Tensor) -> torch.Tensor:
        fallback = weight.mean(0)
        return torch.stack([weight[ids].mean(0) if ids else fallback for ids in pieces])

    tied = getattr(student.config, "tie_word_embeddings", False)
    with torch.no_grad():
        new_in = mean_rows(teacher.get_input_embeddings().weight)
        new_out = None if tied else mean_rows(teacher.get_output_embeddings().weight)
        student.resize_token_embeddings(len(new_tok), mean_resizing=False)
        student.get_input_embeddings().weight.copy_(new_in)
        if new_out is not None:
            student.get_output_embeddings().weight.copy_(new_out)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(new_tok, key)
        setattr(student.config, key, value)
        setattr(student.generation_config, key, value)
    return student
