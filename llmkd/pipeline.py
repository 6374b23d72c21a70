"""From a validated DistillationConfig to a ready DistillationTrainer: tokenizer -> data -> models.

The order is deliberate: the cheap things that can fail on user input (tokenizer, dataset
columns, vocab match) run before the expensive model loads.
"""
from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmkd.config import DistillationConfig, teacher_mode
from llmkd.data.recipes import load_recipe
from llmkd.methods.base import Method
from llmkd.models.embedded import resolve_model_name


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def is_generated_dir(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").exists()


def build_datasets(cfg: DistillationConfig, method: Method) -> tuple[Dataset, Dataset]:
    """Train/eval splits as the method's features. Generated dirs are split by prompt."""
    d = cfg.data
    if d.path and is_generated_dir(d.path):
        from llmkd.generation.writer import load_generated

        rows = load_generated(d.path)
        train, evals = split_by_prompt(rows, d.num_train, d.num_eval, allow_fewer=d.allow_fewer,
                                       source=f"data.path={d.path!r}")
        response = "response"
    else:
        recipe = load_recipe(d.recipe or "arithmetic", path=d.path)
        train, evals = recipe.load_split(d.num_train, d.num_eval, seed=d.seed, allow_fewer=d.allow_fewer)
        response = d.response
        if response == "gold":
            add = lambda ds: ds.map(lambda r: {"response": recipe.gold_response(r["answer"])})  # noqa: E731
            train, evals, response = add(train), add(evals), "response"
    train, evals = (method.build_examples(method.params, ds) for ds in (train, evals))
    return (method.features(train, response=response, max_length=d.max_length),
            method.features(evals, response=response, max_length=d.max_length))


def split_by_prompt(rows: Dataset, num_train: int, num_eval: int, *, allow_fewer: bool = False,
                    source: str = "the generated data") -> tuple[Dataset, Dataset]:
    """Split generated rows by *prompt* (every sample of a prompt on one side), so held-out
    prompts never leak into training: the first `num_train` prompt indices train, the next
    `num_eval` are held out (the quickstart evaluates exactly those). Fewer prompts than asked
    fail unless `allow_fewer` (`plan_split`). The prompt index is the middle field of a recipe
    id (name-INDEX-hash).
    """
    from llmkd.data.recipes import plan_split

    index = [int(i.rsplit("-", 2)[1]) for i in rows["id"]]
    prompts = sorted(set(index))
    n_train, n_eval = plan_split(len(prompts), num_train, num_eval, allow_fewer=allow_fewer,
                                 source=source, unit="prompts")
    train_p, eval_p = set(prompts[:n_train]), set(prompts[n_train:n_train + n_eval])
    return (rows.select([r for r, i in enumerate(index) if i in train_p]),
            rows.select([r for r, i in enumerate(index) if i in eval_p]))


def build_models(cfg: DistillationConfig) -> tuple[PreTrainedModel | None, PreTrainedModel]:
    """(teacher or None when offline, student). The student is derived from the teacher when
    model.student is unset."""
    import torch

    from llmkd.models.student import derive_student, load_causal_lm, wrap_peft

    m = cfg.model
    zero3 = _start_zero3_comm()
    teacher = None
    live = teacher_mode(m) == "live"
    if m.teacher is not None and (live or m.student is None):
        teacher = load_causal_lm(resolve_model_name(m.teacher), dtype=m.teacher_dtype)
    if m.student is not None:
        student = load_causal_lm(resolve_model_name(m.student), dtype=m.student_dtype)
    elif zero3:
        # the teacher was partitioned while loading: gather it, and build the student whole
        # (deepspeed.initialize partitions it later)
        import deepspeed
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        with deepspeed.zero.GatheredParameters(list(teacher.parameters())):
            unset_hf_deepspeed_config()
            try:
                student = derive_student(teacher, m.student_layers).to(getattr(torch, m.student_dtype))
            finally:
                set_hf_deepspeed_config(cfg.hf_deepspeed_config)
    else:
        student = derive_student(teacher, m.student_layers).to(getattr(torch, m.student_dtype))
    if not live:          # offline / served: the teacher was only loaded to derive the student
        teacher = None
    if m.lora:
        student = wrap_peft(student, m.lora)
    return teacher, student


def _start_zero3_comm() -> bool:
    """Under ZeRO-3, `from_pretrained` partitions weights while loading (deepspeed.zero.Init),
    which needs DeepSpeed's communicator. accelerate starts it only for GPU runs; with
    use_cpu=True it would first start inside deepspeed.initialize, after the models load.
    Start it now: it wraps the (gloo) process group accelerate already formed."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return False
    import deepspeed
    import torch

    if torch.distributed.is_initialized():
        deepspeed.init_distributed()
    return True


def build_trainer(cfg: DistillationConfig):
    """Everything a `llmkd distill` run needs, validated in cheap-to-expensive order."""
    from llmkd.trainer import DistillationTrainer, build_method

    m = cfg.model
    student_tok = load_tokenizer(resolve_model_name(m.student if m.student is not None else m.teacher))
    teacher_tok = None
    if m.teacher is not None and teacher_mode(m) == "live":
        teacher_tok = load_tokenizer(resolve_model_name(m.teacher))
    method = build_method(cfg.method.name, cfg.method.params, student_tok, teacher_tok)
    if m.teacher_server:
        if not hasattr(method, "teacher_server"):
            raise ValueError(f"config: model.teacher_server is set but method.name={cfg.method.name!r} "
                             "needs the teacher's full logits; use token_kd / distillspec, or a live teacher")
        from llmkd.teacher_server import ServedTeacher

        method.teacher_server = ServedTeacher(m.teacher_server, m.teacher_topk)
    if cfg.data.path and is_generated_dir(cfg.data.path) and method.uses_generated_token_ids:
        check_generated_tokenizer(cfg.data.path, student_tok)
    if cfg.data.path and is_generated_dir(cfg.data.path) and teacher_mode(m) == "offline":
        from llmkd.generation.hidden import attach_offline_head

        attach_offline_head(cfg.data.path, method, len(student_tok))   # targets=hidden dirs only
    train, evals = build_datasets(cfg, method)
    teacher, student = build_models(cfg)
    return DistillationTrainer(model=student, args=cfg, teacher=teacher, method=method,
                               processing_class=student_tok, teacher_processing_class=teacher_tok,
                               train_dataset=train, eval_dataset=evals)


def check_generated_tokenizer(path: str | Path, student_tok: PreTrainedTokenizerBase) -> None:
    """Generated shards hold the teacher's token ids: a student with another tokenizer would
    train on garbage. Compare the tokenizer recorded at generation with the student's."""
    from llmkd.data.collate import tokenizer_fingerprint
    from llmkd.generation.writer import read_manifest

    recorded = read_manifest(path).get("metadata", {}).get("teacher", {}).get("tokenizer")
    if recorded is None:
        return      # written before tokenizers were recorded: nothing to compare
    ours = tokenizer_fingerprint(student_tok)
    if recorded != ours:
        raise ValueError(
            f"data.path={str(path)!r} was generated with a tokenizer of {recorded['size']} tokens "
            f"(sha {recorded['sha'][:12]}) but the student's has {ours['size']} (sha "
            f"{ours['sha'][:12]}): the stored token ids would not mean the same tokens. Use a student "
            "with the teacher's tokenizer, or regenerate the data with a matching teacher")
