"""From a validated DistillationConfig to a ready DistillationTrainer: tokenizer -> data -> models.

The order is deliberate: the cheap things that can fail on user input (tokenizer, dataset
columns, vocab match) run before the expensive model loads.
"""
from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmkd.config import DistillationConfig
from llmkd.data.collate import tokenize_rows
from llmkd.data.recipes import load_recipe
from llmkd.methods import get_method
from llmkd.models.embedded import resolve_model_name


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def is_generated_dir(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").exists()


def build_datasets(cfg: DistillationConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[Dataset, Dataset]:
    """Train/eval splits as token features. Generated dirs are split by their last rows."""
    d = cfg.data
    if d.path and is_generated_dir(d.path):
        from llmkd.generation.writer import load_generated

        rows = load_generated(d.path)
        train, evals = split_by_prompt(rows, d.num_train, d.num_eval)
        response = "response"
    else:
        recipe = load_recipe(d.recipe or "arithmetic", path=d.path)
        train = recipe.load(d.num_train, seed=d.seed)
        evals = recipe.load(d.num_eval, seed=d.seed, offset=d.num_train)
        response = d.response
        if response == "gold":
            add = lambda ds: ds.map(lambda r: {"response": recipe.gold_response(r["answer"])})  # noqa: E731
            train, evals, response = add(train), add(evals), "response"
    method = get_method(cfg.method.name)
    params = method.Params.from_dict(cfg.method.params)
    train, evals = (method.build_examples(params, ds) for ds in (train, evals))
    return (tokenize_rows(train, tokenizer, response=response, max_length=d.max_length),
            tokenize_rows(evals, tokenizer, response=response, max_length=d.max_length))


def split_by_prompt(rows: Dataset, num_train: int, num_eval: int) -> tuple[Dataset, Dataset]:
    """Split generated rows by *prompt* (every sample of a prompt on one side), so held-out
    prompts never leak into training: the first `num_train` prompt indices train, the next
    `num_eval` are held out (the quickstart evaluates exactly those). With too few prompts, the
    last fifth is held out. The prompt index is the middle field of a recipe id (name-INDEX-hash).
    """
    index = [int(i.rsplit("-", 2)[1]) for i in rows["id"]]
    prompts = sorted(set(index))
    if len(prompts) > num_train:
        train_p, eval_p = set(prompts[:num_train]), set(prompts[num_train:num_train + num_eval])
    else:
        n_eval = max(1, len(prompts) // 5)
        train_p, eval_p = set(prompts[:-n_eval]), set(prompts[-n_eval:])
    if not train_p:
        raise ValueError(f"the generated data has {len(prompts)} prompt(s): too few to split into "
                         "train and held-out; generate more (num_prompts) or lower data.num_eval")
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
    if m.teacher is not None and (m.teacher_mode == "live" or m.student is None):
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
    if m.teacher_mode == "offline":
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
    from llmkd.trainer import DistillationTrainer

    m = cfg.model
    tok_path = resolve_model_name(m.student if m.student is not None else m.teacher)
    tokenizer = load_tokenizer(tok_path)
    train, evals = build_datasets(cfg, tokenizer)
    teacher, student = build_models(cfg)
    return DistillationTrainer(model=student, args=cfg, teacher=teacher, processing_class=tokenizer,
                               train_dataset=train, eval_dataset=evals)
