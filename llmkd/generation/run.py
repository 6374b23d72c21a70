"""`llmkd generate`: recipe prompts -> teacher completions (+ top-k log-probs) -> parquet shards.

With `mixture` (several teachers) each source's prompts are answered by its own teacher (model
dir) into one dataset whose rows carry that teacher's name in a `teacher` column: the data of
offline multi-teacher distillation (`model.teachers.NAME: {teacher_mode: offline}` + `data.path`).

Everything that can be checked without the teacher (config keys and types, model dir, recipe and
its columns, output dir ownership) is checked before the engine starts. Generation runs batch by
batch and each batch is flushed to disk, so a killed run loses at most one batch and a rerun with
the same config continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkd.generation.spec import Completion
from llmkd.generation.settings import (  # noqa: F401  (importers use these names from here)
    GenerationConfig, load_config, resolve_model)

if TYPE_CHECKING:
    import pyarrow as pa

    from llmkd.data.recipes import Recipe
    from llmkd.generation.rationales import YieldCounter

def _schema(cfg: GenerationConfig) -> pa.Schema:
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    cols = [("teacher", pa.string())] if cfg.mixture else []
    cols += [("id", pa.string()), ("sample", pa.int32()), ("prompt", pa.string()),
            ("prompt_token_ids", ids), ("response", pa.string()), ("response_token_ids", ids),
            ("finish_reason", pa.string()), ("answer", pa.string()), ("gold", pa.string()),
            ("correct", pa.bool_())]
    if cfg.mode == "rationale":
        cols.append(("rationale", pa.string()))
    if cfg.targets == "hidden":
        cols.append(("teacher_hidden", pa.binary()))
    elif cfg.topk and cfg.cache == "compact":
        from llmkd.generation.codec import COLUMNS

        cols += [(c, pa.binary()) for c in COLUMNS]
    elif cfg.topk:
        cols += [("teacher_topk_ids", pa.list_(ids)),
                 ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32()))),
                 ("teacher_tail_mass", pa.list_(pa.float32()))]
    return pa.schema(cols)


def build_prompts(cfg: GenerationConfig, recipe: Recipe, tokenizer: Any,
                  questions: list[str]) -> list[list[int]]:
    """Token ids of each full prompt (chat template with generation prompt, or plain text)."""
    from llmkd.generation.rationales import fewshot_messages, fewshot_text

    system = recipe.system_prompt
    if not cfg.chat_template:
        texts = [fewshot_text(q, recipe.fewshot, system) if cfg.mode == "rationale"
                 else (f"{system}\n\n{q}" if system else q) for q in questions]
        return [tokenizer(t).input_ids for t in texts]
    if not tokenizer.chat_template:
        raise ValueError(f"config: chat_template=true but the tokenizer of {cfg.model!r} has no chat "
                         "template; set chat_template=false to prompt with plain text")
    out = []
    for q in questions:
        msgs = (fewshot_messages(q, recipe.fewshot, system) if cfg.mode == "rationale" else
                ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}])
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False).input_ids)  # the template has BOS
    return out


def _rows_for(cfg: GenerationConfig, row: dict, prompt_ids: list[int], comps: list[Completion],
              todo: set[int], kind: str, counter: YieldCounter, *, id_width: int = 4,
              hidden: list[bytes] | None = None) -> tuple[list[dict], list[tuple]]:
    """Parquet rows for one prompt's completions (only the sample indices in `todo`)."""
    from llmkd.generation.codec import encode_row
    from llmkd.generation.rationales import check, parse_rationale, parse_response

    rows, dropped = [], []
    for s, c in enumerate(comps):
        if s not in todo:
            continue
        rationale = None
        if cfg.mode == "rationale":
            rationale, pred = parse_rationale(c.text, kind)
        else:
            pred = parse_response(c.text, kind)
        correct = check(pred, row["answer"], kind)
        if not counter.keep(row["id"], pred, correct):
            dropped.append((row["id"], s))
            continue
        out = {"id": row["id"], "sample": s, "prompt": row["prompt"], "prompt_token_ids": prompt_ids,
               "response": c.text, "response_token_ids": c.token_ids, "finish_reason": c.finish_reason,
               "answer": pred, "gold": row["answer"], "correct": correct}
        if cfg.mode == "rationale":
            out["rationale"] = rationale
        if hidden is not None:
            out["teacher_hidden"] = hidden[s]
        elif cfg.topk and cfg.cache == "compact":
            out.update(encode_row(c.topk_ids, c.topk_logprobs, width=id_width))
        elif cfg.topk:
            out["teacher_topk_ids"] = c.topk_ids
            out["teacher_topk_logprobs"] = c.topk_logprobs
            out["teacher_tail_mass"] = [max(0.0, 1.0 - math.fsum(math.exp(v) for v in lps))
                                        for lps in c.topk_logprobs]
        rows.append(out)
    return rows, dropped


@dataclass
class _Source:
    """One source of a run, prepared before any engine starts."""

    teacher: str | None
    cfg: GenerationConfig
    model_dir: Path
    recipe: Any
    records: list[dict]
    prompt_ids: list[list[int]]
    tokenizer: Any


def _prepare(cfg: GenerationConfig, teacher: str | None) -> _Source:
    """Model dir, top-k against its vocabulary, recipe rows and prompt ids: no engine yet."""
    from transformers import AutoTokenizer

    from llmkd.data.recipes import load_recipe
    from llmkd.preflight import model_vocab_size

    model_dir = resolve_model(cfg.model)
    vocab = model_vocab_size(model_dir)
    if vocab is not None and cfg.topk > vocab:
        raise ValueError(f"config: topk={cfg.topk} is more than the teacher's vocabulary ({vocab} tokens, "
                         f"{model_dir / 'config.json'}); lower topk (e.g. 20)")
    recipe = load_recipe(cfg.recipe, path=cfg.data_path)
    data = recipe.load(cfg.num_prompts, seed=cfg.seed, offset=cfg.offset)
    records = data.select_columns(["id", "prompt", "answer"]).to_list()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    prompt_ids = build_prompts(cfg, recipe, tokenizer, [r["prompt"] for r in records])
    return _Source(teacher, cfg, model_dir, recipe, records, prompt_ids, tokenizer)


def _one_tokenizer(sources: list[_Source]) -> dict[str, Any]:
    """The tokenizer fingerprint all sources share: the stored token ids (and offline top-k) are
    read as the student's ids in training, so one dataset holds one tokenizer."""
    from llmkd.data.collate import tokenizer_fingerprint

    prints = {s.teacher: tokenizer_fingerprint(s.tokenizer) for s in sources}
    first = next(iter(prints.values()))
    other = next((n for n, f in prints.items() if f != first), None)
    if other is not None:
        raise ValueError(f"config: mixture teacher {other!r} tokenizes differently from {sources[0].teacher!r}; "
                         "one generated dataset holds one tokenizer's ids: generate it into its own output_dir")
    return first


def run_generation(cfg: GenerationConfig, *, progress: bool = True) -> Path:
    """Generate what is missing in `cfg.output_dir` and return that directory."""
    from tqdm.auto import tqdm

    from llmkd.generation.backends import check_engine_options, make_backend
    from llmkd.generation.codec import id_bytes
    from llmkd.generation.hidden import head_path, hidden_rows, save_head
    from llmkd.generation.rationales import YieldCounter
    from llmkd.generation.writer import ShardWriter

    # 1. Everything checkable without the teacher(s), before any engine starts.
    cfg = cfg.with_cache()
    check_engine_options(cfg.backend, cfg.engine)
    sources = [_prepare(c, name) for name, c in cfg.sources]
    tokenizer_print = _one_tokenizer(sources)
    keys = ("teacher", "id", "sample") if cfg.mixture else ("id", "sample")
    writer = ShardWriter(cfg.output_dir, cfg.fingerprint_fields(sources[0].model_dir, [s.model_dir for s in sources]),
                         _schema(cfg), shard_size=cfg.shard_size, key_columns=keys,
                         worker=cfg.worker, workers=cfg.workers)

    # 2. What is left: this worker's prompts that fit, minus keys on disk (written by any worker,
    #    so a rerun with another worker count still skips finished prompts).
    limit = cfg.max_model_len - cfg.max_new_tokens
    counter = YieldCounter(keep_incorrect=cfg.keep_all)
    done = writer.done_keys()
    todo: list[tuple[_Source, list[tuple[int, set[int]]]]] = []
    for src in sources:
        mine = []
        for i, ids in enumerate(src.prompt_ids):
            if i % cfg.workers != cfg.worker:
                continue
            if len(ids) > limit:
                counter.skipped_too_long += 1
                continue
            head = (src.teacher,) if cfg.mixture else ()
            missing = {s for s in range(cfg.n) if (*head, src.records[i]["id"], s) not in done}
            if missing:
                mine.append((i, missing))
        todo.append((src, mine))

    # 3. Generate batch by batch, one teacher's engine at a time; every batch lands on disk
    #    before the next starts.
    spec = cfg.sampling
    engine = dict(cfg.engine)
    if cfg.tensor_parallel_size > 1:
        engine["tensor_parallel_size"] = cfg.tensor_parallel_size
    head_missing = cfg.targets == "hidden" and not head_path(cfg.output_dir).exists()
    new_tokens, gen_seconds = 0, 0.0
    bar = tqdm(total=sum(len(t) for _, t in todo), desc=f"generate ({cfg.backend})", unit="prompt",
               disable=not progress)
    try:
        for src, mine in todo:
            if not mine and not (head_missing and done):
                continue
            backend = make_backend(cfg.backend, str(src.model_dir), dtype=cfg.dtype,
                                   max_model_len=cfg.max_model_len, **engine)
            width = id_bytes(len(src.tokenizer))
            try:
                for start in range(0, len(mine), cfg.prompts_per_batch):
                    batch = mine[start:start + cfg.prompts_per_batch]
                    t0 = time.perf_counter()
                    outs = backend.generate([src.prompt_ids[i] for i, _ in batch], spec, progress=False)
                    gen_seconds += time.perf_counter() - t0
                    for (i, missing), comps in zip(batch, outs):
                        new_tokens += sum(len(c.token_ids) for c in comps)
                        states = None if cfg.targets == "topk" else hidden_rows(
                            backend.model, src.prompt_ids[i], [c.token_ids for c in comps], cfg.hidden_dtype)
                        rows, dropped = _rows_for(src.cfg, src.records[i], src.prompt_ids[i], comps, missing,
                                                  src.recipe.answer_kind, counter, id_width=width, hidden=states)
                        if cfg.mixture:
                            rows = [{"teacher": src.teacher, **r} for r in rows]
                            dropped = [(src.teacher, *k) for k in dropped]
                        writer.add(rows, dropped)
                    writer.flush()
                    if head_missing:   # once per dir, beside the first shard
                        save_head(backend.model, cfg.output_dir, vocab=len(src.tokenizer),
                                  hidden_dtype=cfg.hidden_dtype)
                        head_missing = False
                    bar.update(len(batch))
                    bar.set_postfix(tok_s=f"{new_tokens / max(gen_seconds, 1e-9):.0f}", kept=counter.kept)
                if head_missing:   # shards of a run killed before its head
                    save_head(backend.model, cfg.output_dir, vocab=len(src.tokenizer), hidden_dtype=cfg.hidden_dtype)
                    head_missing = False
            finally:
                backend.close()
    finally:
        bar.close()

    # 4. Manifest: this run's counters (per worker too) plus totals over everything on disk.
    def totals() -> dict[str, Any]:
        rows_on_disk = writer.read_column("correct")
        dropped_on_disk = len(writer.dropped_keys())
        generated = len(rows_on_disk) + dropped_on_disk
        return {"completions": generated, "rows": len(rows_on_disk), "dropped": dropped_on_disk,
                "correct": sum(bool(c) for c in rows_on_disk),
                "yield": len(rows_on_disk) / generated if generated else None}

    prompts = {"requested": sum(len(s.prompt_ids) for s in sources), "skipped_too_long": counter.skipped_too_long,
               "generated_this_run": sum(len(t) for _, t in todo)}
    last_run = {**counter.summary(), "new_tokens": new_tokens, "generate_seconds": round(gen_seconds, 3),
                "tokens_per_second": round(new_tokens / gen_seconds, 2) if gen_seconds else None}
    per_worker = {"workers": {str(cfg.worker): {"prompts": prompts, "last_run": last_run}}} \
        if cfg.workers > 1 else {}
    first = sources[0]
    teacher = {"name": first.model_dir.name, "path": str(first.model_dir), "backend": cfg.backend,
               "dtype": cfg.dtype, "tokenizer": tokenizer_print}
    recipe = {"name": first.recipe.name, "answer_kind": first.recipe.answer_kind,
              "num_prompts": first.cfg.num_prompts, "offset": first.cfg.offset}
    if cfg.mixture:     # per teacher: its model and recipe (rows: the `teacher` column)
        per_teacher = {"teachers": {s.teacher: {"name": s.model_dir.name, "path": str(s.model_dir), "recipe": {
            "name": s.recipe.name, "answer_kind": s.recipe.answer_kind, "num_prompts": s.cfg.num_prompts,
            "offset": s.cfg.offset}} for s in sources}}
    else:
        per_teacher = {}
    writer.close(
        totals=totals, **per_worker, **per_teacher, teacher=teacher,
        sampling=dataclasses.asdict(spec), recipe=recipe,
        mode=cfg.mode, chat_template=cfg.chat_template, prompts=prompts, last_run=last_run)
    return Path(cfg.output_dir)
