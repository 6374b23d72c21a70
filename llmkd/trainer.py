"""DistillationTrainer: a `transformers.Trainer` that delegates the loss to a method plug-in.

It overrides as little as it can: `compute_loss` (teacher targets -> method loss, normalised over
the tokens of the whole accumulated batch), `_prepare_inputs` (on-policy / sequence-level
sampling), `prediction_step` (eval loss = the KD divergence), and checkpointing of method state.
Every TrainingArguments feature (grad accumulation, bf16, gradient checkpointing, report_to,
checkpoint resume, DeepSpeed, PEFT) stays the Trainer's own.
"""
from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer
from transformers.trainer_utils import get_last_checkpoint

from llmkd.config import DistillationConfig
from llmkd.data.collate import DistillCollator
from llmkd.methods import get_method
from llmkd.methods.base import Method
from llmkd.models.head import forward_head

METHOD_STATE = "llmkd_method_state.json"


class DistillationTrainer(Trainer):
    """Trains `model` (the student) to match `teacher` with `args.method`."""

    # compute_loss returns sum / num_items_in_batch for dataset batches: already GA-scaled
    loss_is_scaled_for_ga = True

    def __init__(self, model: PreTrainedModel, args: DistillationConfig,
                 teacher: PreTrainedModel | None = None, method: Method | None = None,
                 processing_class: PreTrainedTokenizerBase | None = None, **kwargs: Any) -> None:
        if teacher is not None:
            check_vocab(teacher, model)
        if method is None:
            cls = get_method(args.method.name)
            method = cls(cls.Params.from_dict(args.method.params), teacher)
        kwargs.setdefault("data_collator", DistillCollator(_pad_id(processing_class, model)))
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        self.method = method
        # ZeRO-3 partitions the lm_head weight: the chunked loss cannot read it, use full logits
        self.method.hidden_ok = _zero_stage(args) != 3
        self.teacher = teacher
        # We want `num_items_in_batch` (label tokens of the accumulated batch) in compute_loss.
        self.model_accepts_loss_kwargs = True
        self._metrics: dict[str, list[float]] = defaultdict(list)
        if teacher is not None:
            self._place_teacher()

    # -- teacher placement ------------------------------------------------------------------
    def _place_teacher(self) -> None:
        teacher = self.teacher
        teacher.eval()
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled and _zero_stage(self.args) == 3:
            from trl.models.utils import prepare_deepspeed

            self.teacher = prepare_deepspeed(teacher, self.accelerator)
        else:
            self.teacher = teacher.to(self.args.device)
        self.method.teacher = self.teacher

    # -- on-policy / sequence-level sampling ------------------------------------------------
    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = super()._prepare_inputs(inputs)
        if not self.model.training:
            return inputs
        source = self.method.response_source(random)  # the Trainer checkpoints `random`'s state
        inputs["_source"] = source
        if source == "dataset":
            return inputs
        generator = self.model if source == "student" else self.teacher
        return self._sample_responses(generator, inputs) | {"_source": source}

    @torch.no_grad()
    def _sample_responses(self, generator: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """Sample responses for the batch's prompts and re-pack them right-padded like dataset
        batches, so the loss code path is the same for every source."""
        p = self.method.params
        unwrapped = self.accelerator.unwrap_model(generator)
        was_training = unwrapped.training
        unwrapped.eval()
        prompt, pmask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        out = unwrapped.generate(
            input_ids=prompt, attention_mask=pmask, do_sample=True, temperature=p.gen_temperature,
            top_p=p.top_p, max_new_tokens=p.max_new_tokens, pad_token_id=self._pad,
            eos_token_id=unwrapped.generation_config.eos_token_id, use_cache=True)
        unwrapped.train(was_training)
        gen = out[:, prompt.shape[1]:]
        eos = unwrapped.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        rows = []
        for i in range(prompt.shape[0]):
            ids = prompt[i][pmask[i].bool()].tolist()
            resp = []
            for tok in gen[i].tolist():
                resp.append(tok)
                if tok in eos_ids:
                    break
            rows.append({"input_ids": ids + resp, "labels": [-100] * len(ids) + resp,
                         "prompt_len": len(ids)})
        new = self.data_collator(rows)
        return {k: v.to(prompt.device) for k, v in new.items()}

    @property
    def _pad(self) -> int:
        return self.data_collator.pad

    # -- loss ---------------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        source = inputs.pop("_source", "dataset")
        if source != "dataset" or not self.method.uses_num_items:
            # Sampled batches have their own token count, and some methods normalise per
            # micro-batch (Method.uses_num_items): then divide by the grad-accumulation steps.
            num_items_in_batch = None
        targets = self.method.teacher_targets(inputs)
        hidden = self.method.wants_hidden()
        student = forward_head(model, inputs, hidden=hidden,
                               head_owner=self.accelerator.unwrap_model(model))
        loss, metrics = self.method.loss(student, targets, inputs, num_items_in_batch)
        if num_items_in_batch is None and model.training:
            loss = loss / self.current_gradient_accumulation_steps
        elif self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes   # DDP averages; num_items is global
        prefix = "" if model.training else "eval_"
        # A loss over num_items (the global accumulated batch) is 1/(GA x ranks) of a mean per
        # micro-batch: scale the logged components back to per-token means.
        scale = 1
        if num_items_in_batch is not None and model.training:
            scale = self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices:   # num_items is then the global count
                scale *= self.accelerator.num_processes
        for key, value in metrics.items():
            self._metrics[prefix + key].append(value * scale)
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
        for key in [k for k in self._metrics if k.startswith("eval_") == eval_log]:
            values = self._metrics.pop(key)
            logs[key] = sum(values) / max(len(values), 1)
        super().log(logs, start_time)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # once per optimizer step (the last micro-batch of an accumulation window)
        if self.accelerator.sync_gradients:
            self.method.on_step_end(self.state.global_step + 1, float(loss.detach()))
        return loss

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            tmp = folder / (METHOD_STATE + ".tmp")
            tmp.write_text(json.dumps(self.method.state_dict()))
            os.replace(tmp, folder / METHOD_STATE)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Model dirs hold no pickle: the Trainer's training_args.bin becomes readable JSON."""
        super()._save(output_dir, state_dict)
        out = Path(output_dir or self.args.output_dir)
        if self.args.should_save and (out / "training_args.bin").exists():
            (out / "training_args.bin").unlink()
            (out / "training_args.json").write_text(self.args.to_json_string())

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        if resume_from_checkpoint is None and self.args.resume_from_checkpoint:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=true but {self.args.output_dir} has no checkpoint")
        if resume_from_checkpoint:
            state_file = Path(resume_from_checkpoint) / METHOD_STATE
            if state_file.exists():
                self.method.load_state_dict(json.loads(state_file.read_text()))
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)


def check_vocab(teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    """Token KD needs one vocabulary: compare output sizes before anything runs."""
    # under ZeRO-3 the local tensor is an empty shard; ds_shape is the full shape
    vt = _full_shape(teacher.get_output_embeddings().weight)[0]
    vs = _full_shape(student.get_output_embeddings().weight)[0]
    if vt != vs:
        raise ValueError(
            f"teacher vocab ({vt}) != student vocab ({vs}): token_kd needs a shared tokenizer; "
            "pairs with different tokenizers need cross-tokenizer distillation (method "
            "cross_tokenizer, designed but not built yet)")


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def _pad_id(tokenizer: PreTrainedTokenizerBase | None, model: PreTrainedModel) -> int:
    for cand in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                 model.config.pad_token_id):
        if cand is not None:
            return int(cand)
    return 0


def _zero_stage(args: DistillationConfig) -> int:
    ds = getattr(args, "hf_deepspeed_config", None)
    return int(ds.config.get("zero_optimization", {}).get("stage", 0)) if ds else 0
