"""Cross-tokenizer distillation: a teacher and a student with different tokenizers.

Each response text is tokenised by both tokenizers and cut into the shortest chunks whose
characters coincide (`llmkd.data.alignment`), once per example when the features are built. The
teacher reads its own tokens (its own chat template on the same prompt); the loss compares the
two models chunk by chunk:

- `alm` (approximate likelihood matching, Minixhofer et al. 2025): per chunk, the summed
  log-likelihood of the chunk's tokens under teacher and student, binarised cross-entropy with
  temperature `tau` (`llmkd.losses.alm_loss`; 100, tokenkit's default: at 1 a chunk of
  likelihood e^-20 gets a gradient of ~2e-9). Both are likelihoods of the same characters.
- `alm_unbiased` (tokenkit's debiased ALM): chunks joined up to word ends (the next character is
  whitespace), each likelihood plus the log-probability that a new word starts next
  (`llmkd.losses.boundary_logp`), so neither tokenizer's way of cutting a word biases it.
- `uld` (universal logit distillation, Boizard et al. 2024): at the position predicting each
  chunk's first token (both models have read the same text there), the sorted-probability L1
  between their next-token distributions (`llmkd.losses.uld_loss`), weighted by `uld_weight`
  (1.5) on top of the student's CE as in the paper; `ce_weight: 0` leaves the L1 term alone
  (which a permuted teacher distribution satisfies: it needs the CE to mean anything).
- `none`: no teacher term; with `ce_weight > 0` this is the SFT baseline on the student's tokens.

Responses are tokenised where they follow each side's rendered prompt (no "▁" a SentencePiece
tokenizer would put at the start of a lone string). Chunks whose tokens spell different text on
the two sides (an <unk>, a lowercasing or NFKC normalizer) are masked and counted
(`unpaired_chunks`, the logged fraction); a pair where most chunks would be masked is refused
before the weights load.

`ce_weight` adds the student's negative log-likelihood of its own tokens. Every term is summed
per chunk and divided by the chunk count of the accumulated batch (`count_items`), so gradient
accumulation equals one big batch; the CE term is therefore the mean chunk NLL.

Memory: the student's token log-likelihoods are computed from its hidden states `chunk_size`
positions at a time (each chunk's logits recomputed in backward), the teacher's likewise without
a graph; ULD needs only one row per chunk. With a head the chunked path cannot apply, each model
builds its own full logits once.

Token and chunk log-likelihoods from a head: `llmkd.models.logps`; tokenizer transfer (a student
on a new tokenizer): `llmkd.models.transfer`; the held-out chunk gap: `llmkd.eval.chunk_gap`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmkd.data.alignment import AlignedText, ChunkAligner, boundary_token_ids, merge_at_word_ends, offsets_backend
from llmkd.methods.base import HeadOutput, Method, MethodParams, TeacherTargets, as_mean, output_rows, pad_id
from llmkd.generation.sampling import check_sampler
from llmkd.generation.spec import SamplingSpec
from llmkd.models.logps import chunk_logps, rows_at

if TYPE_CHECKING:   # torch loads lazily: configs validate these Params without it
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmkd.teachers import Teacher

LOSSES = ("alm", "alm_unbiased", "uld", "none")
MAX_UNPAIRED = 0.5      # refuse a tokenizer pair when more than this share of chunks is unpaired


@dataclass
class CrossTokenizerParams(MethodParams):
    loss: str = "alm"               # alm | alm_unbiased | uld | none (none + ce_weight: SFT baseline)
    tau: float = 100.0              # ALM: a = exp(l_T / tau), b = exp(l_S / tau) (tokenkit's default)
    temperature: float = 1.0        # ULD: both distributions at this temperature
    uld_weight: float = 1.5         # ULD: loss = ce_weight * CE + uld_weight * ULD (Boizard et al.)
    ce_weight: float | None = None  # + ce_weight * the student's NLL of its own tokens (per chunk);
                                    # default 1 for uld (the paper's CE + lambda * ULD), else 0
    lmbda: float = 0.0              # probability that a batch's responses are student samples
    max_new_tokens: int = 64        # on-policy sampling
    gen_temperature: float = 1.0
    top_p: float = 1.0
    chunk_size: int = 1024          # >0: lm_heads applied this many positions at a time; 0: full logits
    sampler: str = "hf"             # on-policy sampling backend: hf | vllm
    vllm: dict[str, Any] = field(default_factory=dict)   # vLLM sampler engine options

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"method.loss={self.loss!r} is unknown; use one of {', '.join(LOSSES)}")
        for name in ("tau", "temperature", "gen_temperature", "uld_weight"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"method.{name}={getattr(self, name)} must be a finite number > 0")
        if self.ce_weight is None:
            self.ce_weight = 1.0 if self.loss == "uld" else 0.0
        if not 0 <= self.ce_weight < float("inf"):
            raise ValueError(f"method.ce_weight={self.ce_weight} must be >= 0")
        if self.loss == "none" and self.ce_weight == 0:
            raise ValueError("method.loss=none trains on nothing unless method.ce_weight > 0 "
                             "(the SFT baseline: loss none, ce_weight 1)")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"method.lmbda={self.lmbda} is outside [0, 1]")
        if self.max_new_tokens < 1 or self.chunk_size < 0:
            raise ValueError("method.max_new_tokens must be >= 1 and method.chunk_size >= 0")
        check_sampler(self.sampler, self.vllm)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"method.top_p={self.top_p} must be in (0, 1]")

    def unsupported_teachers(self) -> dict[str, str]:
        why = ("config: method cross_tokenizer needs a live teacher (model.teacher_mode=live): top-k "
               "log-probs (offline or served) are in the teacher's vocabulary, which the student does "
               "not share")
        return {"offline": why, "served": why}


class CrossTokenizer(Method):
    name = "cross_tokenizer"
    Params = CrossTokenizerParams
    uses_generated_token_ids = False     # it aligns the response *text* under both tokenizers

    def __init__(self, params: CrossTokenizerParams) -> None:
        super().__init__(params)
        self.max_length: int | None = None     # from `features`; bounds re-tokenised samples too
        self._aligner: ChunkAligner | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, student_tokenizer: PreTrainedTokenizerBase,
              teacher_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        if teacher_tokenizer is None:
            raise ValueError("method cross_tokenizer needs the teacher's own tokenizer: a live "
                             "teacher (model.teacher and model.teacher_mode=live)")
        super().setup(student_tokenizer, teacher_tokenizer)
        self._aligner = ChunkAligner(self.student_tokenizer, self.teacher_tokenizer)

    def check_tokenizers(self) -> None:
        """Both tokenizers must give character offsets; one shared tokenizer works but is wasteful."""
        for role, tok in (("student", self.student_tokenizer), ("teacher", self.teacher_tokenizer)):
            try:
                offsets_backend(tok)
            except ValueError as err:
                raise ValueError(f"model.{role}: {err}") from None
        s, t = self.student_tokenizer, self.teacher_tokenizer
        if s is t or (len(s) == len(t) and s.get_vocab() == t.get_vocab()):
            warnings.warn("method.name=cross_tokenizer with one shared tokenizer: every chunk is a "
                          "single token, and token_kd (method.name=token_kd) compares the full "
                          "distributions exactly and is cheaper", UserWarning, stacklevel=3)

    @property
    def vocab_size(self) -> int | None:
        """The student's rows (the trainer's student forward keeps these); the teacher keeps its own."""
        return None if self.student_tokenizer is None else len(self.student_tokenizer)

    def attach(self, teacher: Teacher | PreTrainedModel | None, student: PreTrainedModel, *,
               chunked_head_ok: bool) -> None:
        from llmkd.teachers import as_teacher, check_teacher_kind

        source = as_teacher(teacher)
        check_teacher_kind(self.params, source.kind)
        teacher = source.model
        for role, model, tok in (("teacher", teacher, self.teacher_tokenizer),
                                 ("student", student, self.student_tokenizer)):
            if output_rows(model) < len(tok):
                raise ValueError(f"the {role} has {output_rows(model)} output rows but its tokenizer "
                                 f"has {len(tok)} tokens; model.{role} and its tokenizer do not "
                                 "belong together")
        self.teacher, self.source = teacher, source
        self.chunked_head_ok = chunked_head_ok

    # -- data -----------------------------------------------------------------------------------
    def features(self, rows: Dataset, *, response: str, max_length: int) -> Dataset:
        """Student and teacher token ids (each with its own chat template on the prompt) and the
        response's chunk spans, aligned once here."""
        for col in ("prompt", response):
            if col not in rows.column_names:
                raise ValueError(f"dataset columns {rows.column_names} lack {col!r}; cross_tokenizer "
                                 "reads the prompt and the response as text (data.response)")
        self.max_length = max_length

        from llmkd.data.collate import chat_prompt_text

        def encode(batch: dict[str, list]) -> dict[str, list]:
            s_tok, t_tok = self.student_tokenizer, self.teacher_tokenizer
            aligned = self._aligner([str(r) for r in batch[response]],
                                    [chat_prompt_text(s_tok, p) for p in batch["prompt"]],
                                    [chat_prompt_text(t_tok, p) for p in batch["prompt"]])
            out: dict[str, list] = {k: [] for k in FEATURE_KEYS}
            for prompt, text, al in zip(batch["prompt"], batch[response], aligned):
                row = self._row(self._prompt_ids(s_tok, prompt), self._prompt_ids(t_tok, prompt),
                                al, str(text), ended=True)
                for k in FEATURE_KEYS:
                    out[k].append(row[k])
            return out

        out = rows.map(encode, batched=True, batch_size=256, desc="tokenize + align")
        fits = [s < max_length and t < max_length
                for s, t in zip(out["prompt_len"], out["teacher_prompt_len"])]
        if not any(fits):
            raise ValueError(f"every prompt is >= data.max_length={max_length} tokens for the student "
                             "or the teacher; raise data.max_length")
        out = out.select([i for i, ok in enumerate(fits) if ok])
        self.check_pairing(out)
        return out

    def check_pairing(self, features: Dataset) -> None:
        """Refuse, before any weights load, a tokenizer pair whose chunks mostly spell different
        text on the two sides: there is almost nothing the losses could compare."""
        unpaired = sum(features["unpaired_chunks"])
        total = unpaired + sum(len(c) for c in features["chunk_spans"])
        if total and unpaired / total > MAX_UNPAIRED:
            raise ValueError(
                f"model.student / model.teacher: {unpaired} of {total} response chunks "
                f"({100 * unpaired / total:.0f} %) decode to different text under the two tokenizers "
                "(an <unk> token or a lossy normalizer such as lowercase or NFKC), so their likelihoods "
                "cannot be compared; use tokenizers that both reproduce the data's text")

    @staticmethod
    def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
        from llmkd.data.collate import chat_prompt_ids

        ids = chat_prompt_ids(tokenizer, prompt)
        if not ids:
            raise ValueError("an empty prompt tokenises to nothing; the first response chunk needs a "
                             "token before it (give the tokenizer a chat template or a BOS token)")
        return ids

    def _row(self, s_prompt: list[int], t_prompt: list[int], al: AlignedText, text: str, *,
             ended: bool) -> dict[str, Any]:
        """One example: prompt + response on each side, truncated to whole chunks that fit
        `max_length` on both sides; a finished response ends in an (eos, eos) chunk. Unpaired
        chunks stay in the text (context) but get no loss; `eos_chunk`: the last span is the eos."""
        if self.params.loss == "alm_unbiased":
            al = merge_at_word_ends(text, al)
        s_ids, t_ids, chunks, paired = list(al.ids_a), list(al.ids_b), list(al.chunks), list(al.paired)
        s_eos, t_eos = self.student_tokenizer.eos_token_id, self.teacher_tokenizer.eos_token_id
        eos = ended and s_eos is not None and t_eos is not None
        if eos:
            chunks.append(((len(s_ids), len(s_ids) + 1), (len(t_ids), len(t_ids) + 1)))
            paired.append(True)
            s_ids.append(s_eos)
            t_ids.append(t_eos)
        ps, pt = len(s_prompt), len(t_prompt)
        limit = self.max_length if self.max_length is not None else float("inf")
        n = 0
        while n < len(chunks) and ps + chunks[n][0][1] <= limit and pt + chunks[n][1][1] <= limit:
            n += 1
        eos = eos and n == len(chunks)
        chunks, paired = chunks[:n], paired[:n]
        s_end, t_end = (chunks[-1][0][1], chunks[-1][1][1]) if chunks else (0, 0)
        return {"input_ids": s_prompt + s_ids[:s_end], "labels": [-100] * ps + s_ids[:s_end],
                "prompt_len": ps, "teacher_input_ids": t_prompt + t_ids[:t_end], "teacher_prompt_len": pt,
                "chunk_spans": [[ps + a0, ps + a1, pt + b0, pt + b1]
                                for ((a0, a1), (b0, b1)), ok in zip(chunks, paired) if ok],
                "unpaired_chunks": paired.count(False), "eos_chunk": eos}

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The student batch (`DistillCollator`) plus the teacher's ids and the chunk layout:
        per token its chunk id (-1: none) on each side, per chunk its first token and a mask."""
        import torch

        from llmkd.data.collate import DistillCollator

        batch = DistillCollator(pad_id(self.student_tokenizer))(rows)
        b, n_t = len(rows), max(len(r["teacher_input_ids"]) for r in rows)
        c = max(max(len(r["chunk_spans"]) for r in rows), 1)
        t_ids = torch.full((b, n_t), pad_id(self.teacher_tokenizer), dtype=torch.long)
        t_mask = torch.zeros((b, n_t), dtype=torch.long)
        s_index = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
        t_index = torch.full((b, n_t), -1, dtype=torch.long)
        s_start, s_end = torch.zeros((b, c), dtype=torch.long), torch.zeros((b, c), dtype=torch.long)
        t_start, t_end = torch.zeros((b, c), dtype=torch.long), torch.zeros((b, c), dtype=torch.long)
        mask = torch.zeros((b, c), dtype=torch.bool)
        word_end = torch.zeros((b, c), dtype=torch.bool)    # alm_unbiased: a new word starts next
        for i, r in enumerate(rows):
            ids = r["teacher_input_ids"]
            t_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            t_mask[i, : len(ids)] = 1
            for k, (a0, a1, b0, b1) in enumerate(r["chunk_spans"]):
                s_index[i, a0:a1] = k
                t_index[i, b0:b1] = k
                s_start[i, k], t_start[i, k], mask[i, k] = a0, b0, True
                s_end[i, k], t_end[i, k] = a1 - 1, b1 - 1
            word_end[i, : len(r["chunk_spans"]) - int(r.get("eos_chunk", False))] = True
        batch.update(teacher_input_ids=t_ids, teacher_attention_mask=t_mask,
                     teacher_prompt_len=torch.tensor([r["teacher_prompt_len"] for r in rows]),
                     student_chunk_index=s_index, teacher_chunk_index=t_index,
                     student_chunk_start=s_start, teacher_chunk_start=t_start, chunk_mask=mask,
                     student_chunk_last=s_end, teacher_chunk_last=t_end, chunk_word_end=word_end,
                     unpaired_chunks=torch.tensor([r.get("unpaired_chunks", 0) for r in rows]))
        return batch

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss items are aligned chunks."""
        return int(batch["chunk_mask"].sum())

    # -- on-policy samples: re-tokenised for both sides -------------------------------------------
    def response_source(self, rng: Any) -> str:
        return "student" if self.params.lmbda > 0 and rng.random() < self.params.lmbda else "dataset"

    def sampling(self) -> SamplingSpec:
        p = self.params
        return SamplingSpec(temperature=p.gen_temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens)

    def sampled_batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Student samples -> text -> both tokenizations and chunks (the teacher's prompt ids come
        from the dataset batch). A sample cut off before its eos gets no eos chunk."""
        s_tok, t_tok = self.student_tokenizer, self.teacher_tokenizer
        special = set(s_tok.all_special_ids)
        texts, ended, s_ctx, t_ctx = [], [], [], []
        for r in rows:
            prompt, resp = list(r["input_ids"][: r["prompt_len"]]), list(r["input_ids"][r["prompt_len"]:])
            ended.append(bool(resp) and resp[-1] in special)
            s_ctx.append(_decode(s_tok, prompt))
            t_ctx.append(_decode(t_tok, list(r["teacher_input_ids"][: int(r["teacher_prompt_len"])])))
            texts.append(_decode_after(s_tok, prompt, resp[:-1] if ended[-1] else resp, s_ctx[-1]))
        out = []
        for r, al, text, end in zip(rows, self._aligner(texts, s_ctx, t_ctx), texts, ended):
            t_prompt = list(r["teacher_input_ids"][: int(r["teacher_prompt_len"])])
            out.append(self._row(list(r["input_ids"][: r["prompt_len"]]), t_prompt, al, text, ended=end))
        return self.collate(out)

    # -- the step ---------------------------------------------------------------------------------
    def word_end_logp(self, out: HeadOutput, batch: dict[str, torch.Tensor], side: str) -> torch.Tensor:
        """(B, C): log P(the token after each chunk starts a new word) for chunks that end a word
        (`chunk_word_end`), 0 for the rest (the eos chunk, padding)."""
        import torch

        from llmkd.losses import boundary_logp

        tok = self.student_tokenizer if side == "student" else self.teacher_tokenizer
        cache = self.__dict__.setdefault("_word_start_ids", {})
        if side not in cache:
            cache[side] = torch.tensor(boundary_token_ids(tok), dtype=torch.long)
        ids = cache[side].to(batch["input_ids"].device)
        logits = rows_at(out, batch[f"{side}_chunk_last"])[..., : len(tok)]
        values = boundary_logp(logits, ids)
        return torch.where(batch["chunk_word_end"], values, torch.zeros((), dtype=values.dtype, device=values.device))

    def wants_hidden(self) -> bool:
        return self.chunked_head_ok and self.params.chunk_size > 0

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> TeacherTargets:
        if self.params.loss == "none":
            return TeacherTargets()
        return TeacherTargets(output=self.teacher_output(batch))

    def teacher_output(self, batch: dict[str, torch.Tensor]) -> HeadOutput:
        """The teacher on its own tokens (no graph), restricted to its tokenizer's rows."""
        inputs = {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]}
        return self.source.targets(inputs, hidden=self.wants_hidden(), vocab=len(self.teacher_tokenizer)).output

    def loss(self, student: HeadOutput, targets: TeacherTargets, batch: dict[str, torch.Tensor],
             num_items: torch.Tensor | int | None) -> tuple[torch.Tensor, dict[str, float]]:
        import torch

        from llmkd.losses import alm_loss, uld_loss
        from llmkd.losses.divergences import reduce

        p, mask = self.params, batch["chunk_mask"]
        unpaired = int(batch["unpaired_chunks"].sum()) if "unpaired_chunks" in batch else 0
        metrics: dict[str, float] = {"unpaired_chunks": unpaired / max(unpaired + int(mask.sum()), 1)}
        s_chunks = None
        if p.loss in ("alm", "alm_unbiased") or p.ce_weight > 0:
            s_chunks = chunk_logps(student, batch["input_ids"], batch["student_chunk_index"], mask.shape[1],
                                   p.chunk_size)
        if p.loss in ("alm", "alm_unbiased"):
            with torch.no_grad():       # the teacher is a target (its weights may still require grad)
                t_chunks = chunk_logps(targets.output, batch["teacher_input_ids"], batch["teacher_chunk_index"],
                                       mask.shape[1], p.chunk_size)
            s_l, t_l = s_chunks, t_chunks
            if p.loss == "alm_unbiased":    # + log P(a new word starts next), on each side
                s_l = s_l + self.word_end_logp(student, batch, "student")
                with torch.no_grad():
                    t_l = t_l + self.word_end_logp(targets.output, batch, "teacher")
            total = alm_loss(t_l, s_l, tau=p.tau, mask=mask, num_items=num_items)
            metrics[p.loss] = as_mean(total, num_items, mask)
            gap = (t_l - s_l.detach()).abs()[mask]
            metrics["chunk_gap"] = float(gap.mean()) if gap.numel() else 0.0
        elif p.loss == "uld":
            s_rows = rows_at(student, batch["student_chunk_start"] - 1) / p.temperature
            with torch.no_grad():
                t_rows = rows_at(targets.output, batch["teacher_chunk_start"] - 1) / p.temperature
            uld = uld_loss(s_rows, t_rows, mask=mask, num_items=num_items)
            metrics["uld"] = as_mean(uld, num_items, mask)
            total = p.uld_weight * uld
        else:
            total = None
        if p.ce_weight > 0:
            ce = reduce(-s_chunks, mask, "mean", num_items)
            metrics["ce"] = as_mean(ce, num_items, mask)
            total = p.ce_weight * ce if total is None else total + p.ce_weight * ce
        return total, metrics


FEATURE_KEYS = ("input_ids", "labels", "prompt_len", "teacher_input_ids", "teacher_prompt_len", "chunk_spans",
                "unpaired_chunks", "eos_chunk")


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _decode_after(tokenizer: PreTrainedTokenizerBase, prompt: list[int], resp: list[int], context: str) -> str:
    """A sampled response's text as it reads after its prompt: decoded alone, a SentencePiece
    decoder drops the leading space of its first token ("▁The" -> "The")."""
    full = _decode(tokenizer, prompt + resp)
    return full[len(context):] if full.startswith(context) else _decode(tokenizer, resp)
