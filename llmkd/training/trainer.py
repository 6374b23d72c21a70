"""DistillationTrainer: a `transformers.Trainer` that delegates the loss to a method plug-in.

It overrides as little as it can: `get_batch_samples` (on-policy / sequence-level sampling, then
the loss items of the whole accumulated window), `compute_loss` (teacher targets -> method loss,
normalised over those items), `training_step` / `_maybe_log_save_evaluate` (the step's loss goes to
the method; non-finite steps stop before anything is saved), `prediction_step` (eval loss = the KD
divergence), `log` (eval logs gain the monitor's golden metric), and atomic checkpointing with the
method's state (`_save_checkpoint`, `_save`, `train` for resume and signals).
Every TrainingArguments feature (grad accumulation, bf16, gradient checkpointing, report_to,
checkpoint resume, DeepSpeed, PEFT) stays the Trainer's own.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from llmkd.training.config import DistillationConfig
from llmkd.methods import get_method
from llmkd.methods.base import Method, pad_id
from llmkd.models.head import forward_head, lm_head_of, verify_head
from llmkd.generation.sampling import HFSampler, Sampler, make_sampler
from llmkd.generation.spec import eos_ids
from llmkd.teachers import Teacher, as_teacher

METHOD_STATE = "llmkd_method_state.json"


class DistillationTrainer(Trainer):
    """Trains `model` (the student) to match `teacher` with `args.method`."""

    # compute_loss divides by the accumulated window's item count (or by GA itself): GA-scaled
    loss_is_scaled_for_ga = True

    def __init__(self, model: PreTrainedModel, args: DistillationConfig,
                 teacher: Teacher | PreTrainedModel | None = None, method: Method | None = None,
                 processing_class: PreTrainedTokenizerBase | None = None,
                 teacher_processing_class: PreTrainedTokenizerBase | None = None,
                 monitor: TrainerCallback | None = None, **kwargs: Any) -> None:
        if method is None:
            method = build_method(args.method.name, args.method.params, processing_class,
                                  teacher_processing_class)
        kwargs.setdefault("data_collator", method.collate)
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        self.method = method
        # a `llmkd.teachers.Teacher` of any kind; a model = live, None = offline
        self.teacher_source = as_teacher(teacher)
        self.teacher = self.teacher_source.model      # the live model (seq-KD samples), else None
        # We want `num_items_in_batch` (loss items of the accumulated batch) in compute_loss.
        self.model_accepts_loss_kwargs = True
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._step_loss = 0.0
        self._last_loss = 0.0        # the finished optimizer step's loss (all ranks agree)
        self._sampler: Sampler | None = None
        for member in self.teacher_source.members():
            if member.model is not None:
                member.model = self._place_teacher(member.model, keep_off_device=member.offload is not None)
        self.teacher = self.teacher_source.model
        self.method.attach(self.teacher_source, model, chunked_head_ok=self._chunked_head_ok(model))
        self.add_callback(_MethodStepCallback(self))
        # golden metric + teacher-hacking detection (`llmkd.eval.golden.GoldenMonitor`)
        self.monitor = monitor
        if monitor is not None:
            self.add_callback(monitor)

    # -- models -------------------------------------------------------------------------------
    def _place_teacher(self, teacher: PreTrainedModel, keep_off_device: bool = False) -> PreTrainedModel:
        teacher.eval()
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled and _zero_stage(self.args) == 3:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        if not keep_off_device:     # offloaded (model.teachers.NAME.offload): visits per forward
            teacher = teacher.to(self.args.device)
        if self.is_deepspeed_enabled and (self.args.bf16 or self.args.fp16):
            # DeepSpeed runs the student in 16-bit without autocast: a float32 teacher would
            # keep its forward and the loss's lm_head matmuls in float32
            teacher = teacher.to(torch.bfloat16 if self.args.bf16 else torch.float16)
        return teacher

    def _chunked_head_ok(self, student: PreTrainedModel) -> bool:
        """The chunked loss reads lm_head weights outside the forward: not under ZeRO-3 / FSDP
        (partitioned), and only for heads `LMHead` reproduces (checked once on a real input)."""
        if _zero_stage(self.args) == 3 or self.is_fsdp_enabled:
            return False
        probe = {"input_ids": torch.tensor([[0, 1, 2, 3]], device=self.args.device)}
        for model in (student, *(t.model for t in self.teacher_source.members() if t.offload is None)):
            if model is None:
                continue
            head = lm_head_of(model)
            if head is None:
                continue        # forward_head falls back to full logits for this side on its own
            was_training = model.training
            model.eval()
            try:
                if not verify_head(model.to(self.args.device), head, probe):
                    return False
            finally:
                model.train(was_training)
        return True

    # -- responses: dataset, or sampled before the window's items are counted --------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device
                          ) -> tuple[list, torch.Tensor | None]:
        """Fetch the accumulation window, replace sampled responses first, then count the loss
        items of the whole window (all ranks): on-policy 1x8 and 4x2 give the same update."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = [self._with_responses(self._prepare_inputs(b), i) for i, b in enumerate(batches)]
        if not batches:
            return batches, None
        count = torch.tensor(sum(self.method.count_items(b) for b in batches), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

    def _with_responses(self, batch: dict[str, Any], micro: int) -> dict[str, Any]:
        # Seeded by (seed, step, micro-batch): all ranks agree on the source (ZeRO-3 needs it),
        # and a resumed run draws what the uninterrupted one drew (the Trainer restores its own
        # RNG state only after this window is fetched).
        key = f"{self.args.seed}:{self.state.global_step}:{micro}"
        source = self.method.response_source(random.Random(key))
        if source != "dataset":
            generator = self.model_wrapped if source == "student" else self.teacher
            seed = random.Random(f"{key}:{self.args.process_index}").randrange(2**31)
            batch = self._sample_responses(generator, batch, seed)
        batch["_source"] = source
        return batch

    @torch.no_grad()
    def _sample_responses(self, generator: torch.nn.Module, batch: dict[str, Any], seed: int) -> dict[str, Any]:
        """Sample responses for the batch's prompts; the method builds the batch from the rows
        (student-token ids; prompt rows' extra keys carried over)."""
        from trl.models.utils import unwrap_model_for_generation

        spec = dataclasses.replace(self.method.sampling(), seed=seed)
        prompt, pmask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        prompts = [prompt[i][pmask[i].bool()].tolist() for i in range(prompt.shape[0])]
        eos = eos_ids(self.processing_class, self.accelerator.unwrap_model(generator))
        limit = getattr(getattr(self.args, "data", None), "max_length", None)
        if self._sampler is None:
            self._sampler = make_sampler(getattr(self.method.params, "sampler", "hf"),
                                         pad_id(self.processing_class),
                                         **getattr(self.method.params, "vllm", {}))
        sampler = self._sampler if generator is self.model_wrapped else HFSampler(pad_id(self.processing_class))
        # ZeRO-3: gather the partitioned parameters for generate (a no-op otherwise)
        with unwrap_model_for_generation(generator, self.accelerator) as unwrapped:
            was_training = unwrapped.training
            unwrapped.eval()
            started = time.perf_counter()
            responses = sampler.sample(unwrapped, prompts, spec, eos)
            self._metrics["sample_s"].append(time.perf_counter() - started)   # weight push included
            unwrapped.train(was_training)
        keep = {k: v for k, v in batch.items() if k not in _SEQUENCE_KEYS and not k.startswith("_")}
        rows = []
        for i, (ids, resp) in enumerate(zip(prompts, responses)):
            if limit is not None:
                resp = resp[: max(0, limit - len(ids))]      # data.max_length bounds sampled rows too
            rows.append({"input_ids": ids + resp, "labels": [-100] * len(ids) + resp,
                         "prompt_len": len(ids)}
                        | {k: (v[i].tolist() if torch.is_tensor(v) else v[i]) for k, v in keep.items()})
        new = self.method.sampled_batch(rows)
        return {k: v.to(prompt.device) if torch.is_tensor(v) else v for k, v in new.items()}

    # -- loss ---------------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        source = inputs.pop("_source", "dataset")
        if not self.method.uses_num_items or not model.training:
            num_items_in_batch = None       # per-micro-batch means (see Method.uses_num_items)
        # bf16/fp16 mixed precision covers the teacher and the loss's lm_head matmuls too, not only
        # the student's forward (which accelerate wraps)
        with self.accelerator.autocast():
            targets = self.method.teacher_targets(inputs)
            student = forward_head(model, inputs, hidden=self.method.wants_hidden(),
                                   vocab=self.method.vocab_size,
                                   head_owner=self.accelerator.unwrap_model(model))
            loss, metrics = self.method.loss(student, targets, inputs, num_items_in_batch)
        if num_items_in_batch is None and model.training:
            loss = loss / self.current_gradient_accumulation_steps
        elif self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes   # DDP averages; num_items is global
        prefix = "" if model.training else "eval_"
        for key, value in metrics.items():       # plain means: no GA / rank rescaling
            self._metrics[prefix + key].append(value)
        if model.training:
            self._metrics["on_policy"].append(float(source == "student"))
        return (loss, student) if return_outputs else loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- logging and method state ---------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        eval_log = any(k.startswith("eval_") for k in logs)
        if eval_log and self.monitor is not None:
            # `logs` is the dict evaluate() returns: metric_for_best_model can name these keys
            logs.update(self.monitor.measure(self))
        for key in [k for k in self._metrics if k.startswith("eval_") == eval_log]:
            values = self._metrics.pop(key)
            logs[key] = sum(values) / max(len(values), 1)
        super().log(logs, start_time)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss += float(loss)
        return loss

    def _finish_step(self) -> None:
        """After the optimizer step: the step's loss (summed over micro-batches, averaged over
        ranks: the same number everywhere) goes to the method."""
        value = torch.tensor(self._step_loss, dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            value = self.accelerator.reduce(value, reduction="mean")
        self._step_loss = 0.0
        self._last_loss = float(value)
        self.method.on_step_end(self.state.global_step, float(value))

    def _maybe_log_save_evaluate(self, tr_loss: torch.Tensor, grad_norm: Any, model: torch.nn.Module,
                                 *args: Any, **kwargs: Any) -> None:
        """Stop before logging or saving a step whose numbers are not finite: an exploding run
        otherwise trains on to NaN weights, overwrites good checkpoints and exits 0."""
        norm = float(grad_norm) if grad_norm is not None else 0.0
        skipped = getattr(self.accelerator, "optimizer_step_was_skipped", False)   # fp16 overflow: no update
        if not math.isfinite(self._last_loss):
            self._stop_non_finite(f"the loss is {self._last_loss}")
        if not (math.isfinite(norm) or skipped):
            self._stop_non_finite(f"the gradient norm is {norm}")
        if self.control.should_save and not self._weights_finite(model):   # the update itself overflowed
            self._stop_non_finite("the updated weights are not finite")
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

    def _weights_finite(self, model: torch.nn.Module) -> bool:
        ok = torch.tensor(float(all(bool(torch.isfinite(p).all()) for p in model.parameters())),
                          device=self.args.device)
        if self.args.world_size > 1:      # every rank checks its own shard; all must agree
            ok = self.accelerator.reduce(ok, reduction="mean")
        return bool(ok.item() == 1.0)

    def _stop_non_finite(self, what: str) -> None:
        from llmkd.training.checkpoint import RunFailed, find_checkpoint

        found, _ = find_checkpoint(self.args.output_dir)
        kept = (f"the newest good checkpoint is {found}; to continue from it with a lower learning_rate: "
                "--set resume_from_checkpoint=true --set allow_config_change=true" if found
                else "no checkpoint was saved; lower learning_rate (or set max_grad_norm) and start over")
        raise RunFailed(f"step {self.state.global_step}: {what}; training stopped without saving this "
                        f"step; {kept}")

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Atomic: written to a staging dir (method state included), renamed when complete."""
        from llmkd.training.checkpoint import save_checkpoint

        from llmkd.training.teachers import MANIFEST, teacher_manifest

        extra = {METHOD_STATE: json.dumps(self.method.state_dict())}
        if hasattr(self.args, "model"):      # the teacher set, checked when a run resumes
            extra[MANIFEST] = json.dumps(teacher_manifest(self.args.model), indent=1)
        save_checkpoint(self, model, trial, super()._save_checkpoint, extra_files=extra)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Model dirs hold no pickle: the Trainer's training_args.bin becomes readable JSON."""
        super()._save(output_dir, state_dict)
        out = Path(output_dir or self.args.output_dir)
        if self.args.should_save and (out / "training_args.bin").exists():
            (out / "training_args.bin").unlink()
            (out / "training_args.json").write_text(self.args.to_json_string())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The checkpoint's optimizer/scheduler state, under this config's hyperparameters."""
        from llmkd.training.checkpoint import optimizer_settings, reapply_settings

        fresh = optimizer_settings(self.optimizer) if checkpoint and self.optimizer is not None else None
        super()._load_optimizer_and_scheduler(checkpoint)
        if fresh is not None and not self.is_deepspeed_enabled:
            reapply_settings(self.optimizer, self.lr_scheduler, fresh)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """`resume_from_checkpoint=True` takes the newest *complete* checkpoint; SIGINT/SIGTERM
        finish the step, save it and raise `llmkd.training.interrupt.TrainingInterrupted`."""
        from llmkd.training.checkpoint import resolve_resume
        from llmkd.training.interrupt import stop_on_signal

        if resume_from_checkpoint is None and self.args.resume_from_checkpoint:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        resume_from_checkpoint = resolve_resume(self.args, resume_from_checkpoint, self.model)
        if resume_from_checkpoint:
            state_file = Path(resume_from_checkpoint) / METHOD_STATE
            if state_file.exists():
                self.method.load_state_dict(json.loads(state_file.read_text()))
        with stop_on_signal(self):
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def build_method(name: str, params: dict[str, Any], student_tokenizer: PreTrainedTokenizerBase | None,
                 teacher_tokenizer: PreTrainedTokenizerBase | None = None) -> Method:
    """The configured method, set up with both tokenizers (checks the pair before any weights)."""
    cls = get_method(name)
    method = cls(cls.Params.from_dict(params))
    method.setup(student_tokenizer, teacher_tokenizer)
    return method


class _MethodStepCallback(TrainerCallback):
    """The method's hooks at the Trainer's own points: the run's length before the first step,
    on_step_end after each optimizer step."""

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.method.on_train_begin(state.max_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._finish_step()


_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "prompt_input_ids", "prompt_attention_mask",
                  "teacher_topk_ids", "teacher_topk_logprobs", "position_ids")


def _zero_stage(args: DistillationConfig) -> int:
    ds = getattr(args, "hf_deepspeed_config", None)
    return int(ds.config.get("zero_optimization", {}).get("stage", 0)) if ds else 0
