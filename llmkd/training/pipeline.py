"""From a validated DistillationConfig to a ready DistillationTrainer: tokenizer -> data -> models.

The order is deliberate: the cheap things that can fail on user input (tokenizer, dataset
columns, vocab match) run before the expensive model loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmkd.training.config import DataSpec, DistillationConfig
from llmkd.data.recipes import load_recipe
from llmkd.methods.base import Method
from llmkd.models.embedded import resolve_model_name
from llmkd.teachers import Teacher
from llmkd.training.teachers import TeacherSpec


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def is_generated_dir(path: str | Path) -> bool:
    from llmkd.generation.writer import is_generation_dir

    return is_generation_dir(path)


def build_datasets(cfg: DistillationConfig, method: Method, data: DataSpec | None = None, *,
                   teacher: str | None = None) -> tuple[Dataset, Dataset]:
    """Train/eval splits as the method's features (of `data`, one source of a mixture; default
    cfg.data). Generated dirs are split by prompt; of a dir of several teachers, `teacher`'s rows
    only (num_train / num_eval prompts each)."""
    d = data or cfg.data
    if d.path and is_generated_dir(d.path):
        from llmkd.data.mixture import TEACHER_COLUMN
        from llmkd.generation.writer import load_generated

        rows = load_generated(d.path)
        if method.uses_generated_token_ids and method.student_tokenizer is not None:
            check_token_ids(rows, len(method.student_tokenizer), d.path)
        if teacher is not None:
            rows = rows.filter(lambda t: t == teacher, input_columns=TEACHER_COLUMN).remove_columns(TEACHER_COLUMN)
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


def build_models(cfg: DistillationConfig, teachers: dict[str, Teacher]) -> PreTrainedModel:
    """The student: model.student, or derived from the teacher model.student_from names (with
    one teacher: that one), loaded only for this when it is not live."""
    import torch

    from llmkd.models.student import derive_student, load_causal_lm, wrap_peft

    m = cfg.model
    if m.student is not None:
        student = load_causal_lm(resolve_model_name(m.student), dtype=m.student_dtype)
    else:
        source = teachers[m.student_from if m.teachers else "teacher"].model
        if source is None:      # offline / served: the teacher is loaded only to derive the student
            source = load_causal_lm(resolve_model_name(m.teacher), dtype=m.teacher_dtype)
        derive = lambda: derive_student(source, m.student_layers).to(getattr(torch, m.student_dtype))  # noqa: E731
        if _zero3():
            # the teacher was partitioned while loading: gather it, and build the student whole
            # (deepspeed.initialize partitions it later)
            import deepspeed
            from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

            with deepspeed.zero.GatheredParameters(list(source.parameters())):
                unset_hf_deepspeed_config()
                try:
                    student = derive()
                finally:
                    set_hf_deepspeed_config(cfg.hf_deepspeed_config)
        else:
            student = derive()
    if m.lora:
        student = wrap_peft(student, m.lora)
    return student


def _zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _start_zero3_comm() -> bool:
    """Under ZeRO-3, `from_pretrained` partitions weights while loading (deepspeed.zero.Init),
    which needs DeepSpeed's communicator. accelerate starts it only for GPU runs; with
    use_cpu=True it would first start inside deepspeed.initialize, after the models load.
    Start it now: it wraps the (gloo) process group accelerate already formed."""
    if not _zero3():
        return False
    import deepspeed
    import torch

    if torch.distributed.is_initialized():
        deepspeed.init_distributed()
    return True


def build_trainer(cfg: DistillationConfig):
    """Everything a `llmkd distill` run needs, validated in cheap-to-expensive order: tokenizers,
    one method instance per teacher, each source's rows as its teacher's features, then the
    weights (teachers, the student last). `model.teacher` is the set of one teacher, named
    `teacher`; a set of one is the method itself (`TeacherMix.of`)."""
    from llmkd.data.mixture import concat, sources, split_sources, tag
    from llmkd.methods.mix import TeacherMix
    from llmkd.teachers import TeacherSet
    from llmkd.training.teachers import teacher_method, teacher_specs
    from llmkd.training.trainer import DistillationTrainer, build_method

    m = cfg.model
    specs = teacher_specs(m)
    first = m.student_from if m.teachers else "teacher"
    student_tok = load_tokenizer(resolve_model_name(m.student if m.student is not None else specs[first].teacher))
    clients = {name: _connect_served(name, spec, student_tok, several=bool(m.teachers))
               for name, spec in specs.items() if spec.kind == "served"}
    methods = {}
    for name, spec in specs.items():
        own = load_tokenizer(resolve_model_name(spec.teacher)) if spec.kind == "live" else None
        try:
            methods[name] = build_method(*teacher_method(cfg.method, spec), student_tok, own)
        except ValueError as err:       # e.g. a tokenizer pair the method cannot distil between
            if not m.teachers:
                raise
            raise ValueError(f"model.teachers.{name}: {err} (for this teacher alone: "
                             f"model.teachers.{name}.method: {{name: cross_tokenizer}})") from None
    method = TeacherMix.of(methods, mix=cfg.method.teacher_mix, weights={n: s.weight for n, s in specs.items()})
    mixed = isinstance(method, TeacherMix)
    parts, heads = [], {}
    for teacher, source in sources(cfg.data):
        for name, only in split_sources(teacher, source):     # a dir of several teachers: each's rows
            name = name or next(iter(specs))
            own = methods[name] if mixed and method.mix == "route" else method    # its teacher's features
            if source.path and is_generated_dir(source.path) and own.uses_generated_token_ids:
                check_generated_tokenizer(source.path, student_tok)
            if source.path and is_generated_dir(source.path) and specs[name].kind == "offline":
                from llmkd.generation.hidden import offline_head

                heads[name] = offline_head(source.path, methods[name], len(student_tok))   # targets=hidden dirs
            split = build_datasets(cfg, own, source, teacher=only)
            parts.append(tuple(tag(ds, name) for ds in split) if mixed else split)
    for name, spec in specs.items():
        if spec.kind == "served" and spec.teacher_targets == "hidden":
            from llmkd.generation.hidden import served_head

            heads[name] = served_head(spec.teacher_head, methods[name], len(student_tok))
    train, evals = (parts[0][i] if len(parts) == 1 else concat([p[i] for p in parts]) for i in (0, 1))
    if m.lora:
        check_lora_targets_early(cfg)
    monitor = build_monitor(cfg, student_tok)
    _start_zero3_comm()
    teachers = {name: _load_teacher(name, spec, heads.get(name), clients.get(name)) for name, spec in specs.items()}
    student = build_models(cfg, teachers)
    teacher = TeacherSet(teachers, mix=method.mix, weights=method.weights) if mixed else teachers[next(iter(specs))]
    return DistillationTrainer(model=student, args=cfg, teacher=teacher, method=method,
                               processing_class=student_tok, train_dataset=train, eval_dataset=evals, monitor=monitor)


def shutdown_distributed(exit_code: int | None = None) -> None:
    """Tear the process group down, last thing in a script started by torchrun, once every rank
    has finished (it waits for all of them; `llmkd distill` calls it after a run that succeeded).
    With `exit_code`, a rank of a multi-process run also ends here, the way the interpreter would
    (non-daemon threads joined, exit handlers run, streams flushed) but without finalisation:
    the DDP / DeepSpeed wrapper a Trainer keeps holds its own reference to the gloo process group,
    so gloo's threads outlive `destroy_process_group` and are torn down during finalisation, where
    they can abort a finished rank ("terminate called without an active exception", SIGABRT) and
    torchrun reports the run failed."""
    import atexit
    import os
    import sys
    import threading

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    ranks = dist.get_world_size()      # 1: e.g. the group an in-process vLLM engine made
    dist.barrier()
    dist.destroy_process_group()
    if exit_code is None or ranks == 1:
        return
    threading._shutdown()              # what Py_FinalizeEx does first, then the atexit handlers
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to lose
            pass
    os._exit(exit_code)


def build_monitor(cfg: DistillationConfig, student_tok: PreTrainedTokenizerBase):
    """The `monitor:` section's GoldenMonitor (None when unset), on the same held-out split as
    the eval set; gold answers come from the recipe (or a generated dir's `gold` column)."""
    from llmkd.eval.golden import GoldenMonitor

    spec, d = cfg.monitor, cfg.data
    if spec.golden is None:
        return None
    if spec.golden == "oracle_kl":
        from llmkd.data.collate import tokenizer_fingerprint
        from llmkd.models.student import load_causal_lm

        oracle = resolve_model_name(spec.oracle)
        if tokenizer_fingerprint(load_tokenizer(oracle)) != tokenizer_fingerprint(student_tok):
            raise ValueError(f"config: monitor.oracle={spec.oracle!r} has a different tokenizer from the "
                             "student's: oracle_kl compares next-token distributions id by id; use an "
                             "oracle with the student's tokenizer")
        return GoldenMonitor(spec, oracle=load_causal_lm(oracle, dtype=cfg.model.student_dtype))
    if d.path and is_generated_dir(d.path):
        from llmkd.generation.writer import load_generated, read_manifest

        _, held = split_by_prompt(load_generated(d.path), d.num_train, d.num_eval, allow_fewer=d.allow_fewer)
        first: dict[str, str] = {}
        for prompt, gold in zip(held["prompt"], held["gold"]):
            first.setdefault(prompt, gold)             # one row per prompt
        held = Dataset.from_dict({"prompt": list(first), "answer": list(first.values())})
        recipe = load_recipe(read_manifest(d.path).get("metadata", {}).get("recipe", {}).get("name", "arithmetic"))
        asked = held.select(range(min(spec.num_prompts, len(held))))
    else:
        recipe = load_recipe(d.recipe or "arithmetic", path=d.path)
        train, held = recipe.load_split(d.num_train, d.num_eval, seed=d.seed, allow_fewer=d.allow_fewer)
        held = held.select_columns(["prompt", "answer"])
        asked = recipe.load(spec.num_prompts, seed=d.seed, offset=len(train)) if spec.golden == "accuracy" else None
    if spec.golden == "accuracy":
        return GoldenMonitor(spec, prompts=list(asked["prompt"]), answers=list(asked["answer"]),
                             answer_kind=recipe.answer_kind)
    from llmkd.data.collate import tokenize_rows

    gold = held.map(lambda r: {"response": recipe.gold_response(r["answer"])})
    return GoldenMonitor(spec, gold=tokenize_rows(gold, student_tok, response="response", max_length=d.max_length))


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


def check_token_ids(rows: Dataset, vocab: int, path: str | Path) -> None:
    """A teacher whose embedding has more rows than its tokenizer (a padded vocab_size) can
    generate ids no token has; the student's embedding would fail on them mid-step with an
    IndexError. One line naming the row, before any weights load."""
    import pyarrow.compute as pc

    table = rows.data.table
    for column in ("prompt_token_ids", "response_token_ids", "teacher_topk_ids"):
        if column not in table.column_names:
            continue
        flat = table.column(column)
        while flat.type.num_fields:                    # list<...> -> its elements
            flat = pc.list_flatten(flat)
        if (pc.max(flat).as_py() or 0) < vocab:
            continue
        for row_id, ids in zip(rows["id"], rows[column]):
            top = max((max(x) if isinstance(x, list) else x for x in ids if x != []), default=0)
            if top >= vocab:
                raise ValueError(
                    f"data.path={str(path)!r} row id={row_id}: {column} holds token id {top}, outside "
                    f"the student's tokenizer ({vocab} tokens); the teacher's embedding has padding rows "
                    "beyond its tokenizer and generated one: regenerate with a trained teacher, or drop "
                    "that row")


def check_lora_targets_early(cfg: DistillationConfig) -> None:
    """model.lora.target_modules against the student's module names, from an empty (meta-device)
    model built from config.json: a typo fails before any weights load, not in peft after."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmkd.training.config_checks import check_lora_targets

    targets = cfg.model.lora.get("target_modules")
    if targets is None or targets == "all-linear":
        return
    m = cfg.model
    source = m.student if m.student is not None else teacher_specs(m)[m.student_from if m.teachers else "teacher"].teacher
    config = AutoConfig.from_pretrained(resolve_model_name(source), trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    check_lora_targets(cfg.model.lora, [name for name, _ in skeleton.named_modules()])


def _connect_served(name: str, spec: TeacherSpec, student_tok: PreTrainedTokenizerBase, *,
                    several: bool) -> Any:
    """A served teacher's client, in contact with its server before anything else loads: a wrong
    URL or a silent server costs seconds, not a model load and minutes of retries."""
    from llmkd.teacher_server import ServedTeacher

    client = ServedTeacher(spec.teacher_server, spec.teacher_topk, timeout=spec.teacher_timeout,
                           timeout_per_token=spec.teacher_timeout_per_token,
                           targets=spec.teacher_targets, dtype=spec.teacher_dtype)
    client.connect(student_tok, spec.teacher_wait, f"model.teachers.{name}." if several else "model.")
    return client


def _load_teacher(name: str, spec: TeacherSpec, head: tuple[Any, str] | None = None,
                  client: Any = None) -> Teacher:
    """One teacher of the set, as its kind: a loaded model, a server client (`client`, from
    `_connect_served`), or the rows' top-k."""
    if spec.kind == "served":
        from llmkd.teachers.served import Served

        return Served(client, name=name, head=head)
    if spec.kind == "offline":
        from llmkd.teachers.offline import Offline

        return Offline(name=name, head=head)
    from llmkd.models.student import load_causal_lm
    from llmkd.teachers.live import Live

    return Live(load_causal_lm(resolve_model_name(spec.teacher), dtype=spec.teacher_dtype),
                name=name, offload=spec.offload)
