"""The method protocol: every distillation method is a small plug-in on this interface.

Losses know tensors, methods know batches, the Trainer knows neither formula. A method owns its
tokenizer rules, its features and collation (both tokenizers are available), where a batch's
responses come from, the teacher's targets, the loss, and state that follows the optimizer steps.
Adding a method is one module in this package plus its YAML; the trainer does not change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from llmkd.generation.spec import SamplingSpec
from llmkd.models.output import HeadOutput, TeacherTargets
from llmkd.validation import check_keys, coerce

if TYPE_CHECKING:   # the protocol imports no model library: configs validate without them
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmkd.teachers import Teacher


@dataclass
class MethodParams:
    """Base for a method's parameters: strict keys and types, validated on construction."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MethodParams":
        check_keys("method.", raw, [f.name for f in dataclasses.fields(cls)] + ["name"])
        return cls(**coerce("method.", {k: v for k, v in raw.items() if k != "name"}, cls))

    def unsupported_teachers(self) -> dict[str, str]:
        """The teacher kinds ('live', 'offline', 'served') this configuration cannot use, each with
        the one-line reason and fix; checked before any weights load and on attach
        (`llmkd.teachers.check_teacher_kind`). By default a method needs a live teacher."""
        return {kind: f"config: this method needs a live teacher (model.teacher and "
                      f"model.teacher_mode=live), not a {kind} one" for kind in ("offline", "served")}


class Method:
    """Base class for methods. Subclasses set `name`, `Params` and implement `teacher_targets`
    and `loss`; every other hook has a default that fits token-level KD on one tokenizer.

    Life cycle (the trainer and `llmkd.training.pipeline` call these, in this order):
      setup(student_tokenizer, teacher_tokenizer)   once, before any data or weights load
      build_examples -> features -> collate          data (the method owns its batch keys)
      attach(teacher, student, chunked_head_ok)      once the models are placed
      per micro-batch: response_source -> [sampling + sampled_batch] -> count_items ->
                       teacher_targets -> loss
      on_train_begin(total_steps)                    once, before the first step
      on_step_end(step, step_loss)                   after each optimizer step, same on all ranks
      state_dict / load_state_dict                   checkpoints
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    # True: `loss` divides its sums by `num_items` (grad accumulation = one big batch). False: it
    # returns a per-micro-batch mean (e.g. a weighted mean of per-task means, which no single
    # global count can give) and the Trainer divides it by the grad-accumulation steps.
    uses_num_items: ClassVar[bool] = True
    # Trains on the token ids stored in `llmkd generate` shards (so their tokenizer must be the
    # student's); False for methods that re-tokenize the response text.
    uses_generated_token_ids: ClassVar[bool] = True

    def __init__(self, params: MethodParams) -> None:
        self.params = params
        self.teacher: PreTrainedModel | None = None     # the live teacher's model, else None
        self.source: Teacher | None = None              # where the targets come from (any kind)
        self.student_tokenizer: PreTrainedTokenizerBase | None = None
        self.teacher_tokenizer: PreTrainedTokenizerBase | None = None
        # False where the lm_head weight cannot be read outside the model's forward (ZeRO-3
        # partitions it) or the head is not one the chunked loss can apply: use full logits.
        self.chunked_head_ok = True

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, student_tokenizer: PreTrainedTokenizerBase,
              teacher_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Store both tokenizers and check the pair (the method decides which pairs it serves),
        before any weights load."""
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not None else student_tokenizer
        self.check_tokenizers()

    def check_tokenizers(self) -> None:
        """Raise a clear error for a tokenizer pair this method cannot distil between."""
        check_same_tokenizer(self.teacher_tokenizer, self.student_tokenizer)

    @property
    def vocab_size(self) -> int | None:
        """Rows compared between teacher and student: the shared tokenizer's size, so padded
        embedding rows (Qwen2.5 0.5B 151,936 vs 7B 152,064) never get mass."""
        return None if self.student_tokenizer is None else len(self.student_tokenizer)

    def attach(self, teacher: Teacher | PreTrainedModel | None, student: PreTrainedModel, *,
               chunked_head_ok: bool) -> None:
        """The teacher (a `llmkd.teachers.Teacher`; a placed model = live, None = offline) and
        the student; check what needs the weights."""
        from llmkd.teachers import as_teacher, check_teacher_kind

        source = as_teacher(teacher)
        check_teacher_kind(self.params, source.kind)
        source.check(self.student_tokenizer)
        teacher = source.model
        for role, model in (("teacher", teacher), ("student", student)):
            if model is not None and self.vocab_size is not None:
                rows = output_rows(model)
                if rows < self.vocab_size:
                    raise ValueError(
                        f"the {role} has {rows} output rows but its tokenizer has {self.vocab_size} "
                        "tokens; the model and tokenizer do not belong together (check model."
                        f"{role} and the tokenizer directory)")
        self.teacher, self.source = teacher, source
        self.chunked_head_ok = chunked_head_ok

    # -- data -----------------------------------------------------------------------------------
    @classmethod
    def build_examples(cls, params: MethodParams, rows: "Dataset") -> "Dataset":
        """Reshape (prompt, response, ...) rows before tokenization (e.g. one row -> two tasks).
        Rows may carry an integer `task` column; the collator passes it through."""
        return rows

    def features(self, rows: "Dataset", *, response: str, max_length: int) -> "Dataset":
        """Token features (input_ids, labels, prompt_len, method keys) for the student."""
        from llmkd.data.collate import tokenize_rows

        return tokenize_rows(rows, self.student_tokenizer, response=response, max_length=max_length)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad feature rows into a batch. The default knows input_ids/labels/prompt ids, a
        `task` column and offline top-k columns."""
        from llmkd.data.collate import DistillCollator

        return DistillCollator(pad_id(self.student_tokenizer))(rows)

    # -- sampled responses ------------------------------------------------------------------------
    def response_source(self, rng: Any) -> str:
        """'dataset' (off-policy), 'student' (on-policy samples) or 'teacher' (sequence-level KD).
        `rng` has `.random()`; the trainer passes an RNG whose state is the same on every rank."""
        return "dataset"

    def sampling(self) -> SamplingSpec:
        """How responses are sampled when `response_source` is not 'dataset'."""
        return SamplingSpec()

    def sampled_batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A batch from sampled rows (student-token `input_ids`, `labels`, `prompt_len`, plus the
        prompt rows' own extra keys). Methods with teacher-side features rebuild them here."""
        return self.collate(rows)

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss items in a micro-batch (label tokens that predict a next token); the trainer sums
        them over the accumulation window and the ranks to normalise the loss."""
        return int((batch["labels"][:, 1:] != -100).sum())

    # -- the step ---------------------------------------------------------------------------------
    def wants_hidden(self) -> bool:
        """True when the loss applies the lm_head itself (chunked); the trainer then skips logits."""
        return False

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> TeacherTargets:
        """The attached teacher's targets for the batch, whatever its kind."""
        return self.source.targets(batch, hidden=self.wants_hidden(), vocab=self.vocab_size)

    def loss(self, student: HeadOutput, targets: TeacherTargets, batch: dict[str, torch.Tensor],
             num_items: torch.Tensor | int | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (loss, metrics to log). `num_items` = loss items of the accumulated batch over
        all ranks (`count_items`); metrics are plain means over this micro-batch."""
        raise NotImplementedError

    def on_train_begin(self, total_steps: int) -> None:
        """The run's number of optimizer steps, before the first one (e.g. a schedule's length)."""

    def on_step_end(self, step: int, step_loss: float) -> None:
        """After an optimizer step: `step_loss` is that step's loss summed over its micro-batches
        and averaged over ranks, so it is identical on every rank (e.g. TAID's schedule)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by `state_dict` (called on resume_from_checkpoint)."""


def as_mean(value: "torch.Tensor", num_items: "torch.Tensor | int | None", mask: "torch.Tensor") -> float:
    """A loss normalised by the accumulated window's `num_items` as the plain per-item mean of
    this micro-batch (`mask` marks its items), for logging: GA and ranks do not change it."""
    if num_items is None:
        return float(value.detach())
    return float(value.detach()) * float(num_items) / max(int(mask.sum()), 1)


def pad_id(tokenizer: PreTrainedTokenizerBase | None) -> int:
    for cand in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if cand is not None:
            return int(cand)
    return 0


def output_rows(model: torch.nn.Module) -> int:
    """Output vocabulary rows of a causal LM (the full shape under ZeRO-3 partitioning)."""
    weight = model.get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def check_same_tokenizer(teacher: PreTrainedTokenizerBase | None,
                         student: PreTrainedTokenizerBase | None) -> None:
    """Token-level KD compares distributions id by id: both sides must use one tokenizer."""
    if teacher is None or student is None or teacher is student:
        return
    if len(teacher) != len(student) or teacher.get_vocab() != student.get_vocab():
        raise ValueError(
            f"the teacher's tokenizer ({len(teacher)} tokens) differs from the student's "
            f"({len(student)} tokens); token-level KD needs one shared tokenizer. Use "
            "method.name=cross_tokenizer for a pair with different tokenizers")
