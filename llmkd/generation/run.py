"""`llmkd generate`: recipe prompts -> teacher completions (+ top-k log-probs) -> parquet shards.

Everything that can be checked without the teacher (config keys and types, model dir, recipe and
its columns, output dir ownership) is checked before the engine starts. Generation runs batch by
batch and each batch is flushed to disk, so a killed run loses at most one batch and a rerun with
the same config continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkd.generation.backends import BACKENDS, DTYPES, Completion, SamplingSpec

if TYPE_CHECKING:
    import pyarrow as pa

    from llmkd.data.recipes import Recipe
    from llmkd.generation.rationales import YieldCounter

MODES = ("response", "rationale")
CACHES = ("lossless", "compact")
TARGETS = ("topk", "hidden")


@dataclass
class GenerationConfig:
    """One generation job. Unknown keys are rejected with the nearest valid one."""

    model: str = "embedded"              # model dir, or "embedded" (SmolLM2-135M-Instruct)
    backend: str = "vllm"                # vllm | hf
    dtype: str = "float32"
    max_model_len: int = 1024
    tensor_parallel_size: int = 1        # vLLM: GPUs one engine shards the teacher over
    engine: dict = field(default_factory=dict)   # extra engine kwargs (kv_cache_memory_bytes, ...)
    recipe: str = "chain_sum"            # data_recipes name or recipe YAML path
    data_path: str | None = None         # local data file overriding the recipe's source
    num_prompts: int = 64
    offset: int = 0
    seed: int = 0
    mode: str = "response"               # response: answer the prompt; rationale: few-shot CoT
    chat_template: bool = True
    n: int = 1                           # completions per prompt
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    topk: int = 20                       # teacher top-k log-probs kept per token (0 = none)
    cache: str = "lossless"              # top-k storage: lossless float32 | compact (llmkd.generation.codec)
    targets: str = "topk"                # topk: top-k log-probs | hidden: final hidden states + head
    hidden_dtype: str = "bfloat16"       # targets=hidden: bfloat16 | float16 storage
    keep_incorrect: bool | None = None   # None: keep all in response mode, only correct in rationale
    output_dir: str = "outputs/generations/run"
    shard_size: int = 256                # rows per parquet shard
    batch_size: int | None = None        # prompts per generation batch; None: shard_size // n
    workers: int = 1                     # processes (GPUs, nodes) sharing this run's prompts
    worker: int = 0                      # which of them this is: prompt i goes to i % workers

    def __post_init__(self) -> None:
        for name, value, allowed in (("backend", self.backend, BACKENDS), ("mode", self.mode, MODES),
                                     ("dtype", self.dtype, DTYPES), ("cache", self.cache, CACHES),
                                     ("targets", self.targets, TARGETS)):
            if value not in allowed:
                raise ValueError(f"config: {name}={value!r} is unknown; use one of {allowed}")
        for name in ("num_prompts", "shard_size", "max_model_len", "workers", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"config: {name}={getattr(self, name)} must be >= 1")
        if self.offset < 0 or self.topk < 0:
            raise ValueError("config: offset and topk must be >= 0")
        if self.cache == "compact" and not self.topk:
            raise ValueError("config: cache=compact stores top-k log-probs but topk=0; set topk > 0 "
                             "or cache=lossless")
        if self.targets == "hidden":
            from llmkd.generation.hidden import check_config

            check_config(self)
        if not 0 <= self.worker < self.workers:
            raise ValueError(f"config: worker={self.worker} must be in [0, workers={self.workers}); "
                             "number workers 0 .. workers-1 (e.g. --set worker=$SLURM_PROCID)")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError(f"config: tensor_parallel_size={self.tensor_parallel_size} needs "
                             "backend=vllm; the hf backend runs one model per process")
        if "tensor_parallel_size" in self.engine:
            raise ValueError("config: engine.tensor_parallel_size: set the top-level "
                             "tensor_parallel_size instead")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"config: batch_size={self.batch_size} must be >= 1 (or null)")
        if self.max_new_tokens >= self.max_model_len:
            raise ValueError(f"config: max_new_tokens={self.max_new_tokens} leaves no room for the "
                             f"prompt in max_model_len={self.max_model_len}; raise max_model_len")
        self.sampling  # validates n / temperature / top_p

    @property
    def sampling(self) -> SamplingSpec:
        return SamplingSpec(n=self.n, temperature=self.temperature, top_p=self.top_p,
                            max_new_tokens=self.max_new_tokens,
                            logprobs=self.topk if self.targets == "topk" else 0, seed=self.seed)

    @property
    def keep_all(self) -> bool:
        return self.mode == "response" if self.keep_incorrect is None else self.keep_incorrect

    @property
    def prompts_per_batch(self) -> int:
        return self.batch_size or max(1, self.shard_size // self.n)

    def fingerprint_fields(self, model_dir: Path) -> dict[str, Any]:
        """What the rows depend on. Not num_prompts/offset (a rerun may extend the set), not
        output/shard/batch sizes, workers or engine settings (layout and speed only)."""
        d = dataclasses.asdict(self)
        for key in ("num_prompts", "offset", "output_dir", "shard_size", "batch_size", "engine",
                    "tensor_parallel_size", "workers", "worker"):
            d.pop(key)
        if d["cache"] == "lossless":   # the default: dirs written before the key existed still match
            d.pop("cache")
        if d["targets"] == "topk":     # likewise for dirs written before hidden-state targets
            d.pop("targets")
            d.pop("hidden_dtype")
        return {**d, "model": str(model_dir), "keep_incorrect": self.keep_all}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> GenerationConfig:
    """YAML file (optional) + `key=value` overrides -> validated GenerationConfig."""
    from llmkd.validation import check_keys, coerce
    from llmkd.yaml_reader import apply_overrides, read_yaml_mapping

    raw = read_yaml_mapping(path, "generation config") if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    check_keys("", raw, [f.name for f in dataclasses.fields(GenerationConfig)])
    return GenerationConfig(**coerce("", raw, GenerationConfig))


def resolve_model(model: str) -> Path:
    """A local model dir; "embedded" is materialised on first use by `llmkd.models.embedded`."""
    from llmkd.generation.backends import check_model_dir
    from llmkd.models.embedded import resolve_model_name

    return Path(check_model_dir(resolve_model_name(model))).resolve()


def _schema(cfg: GenerationConfig) -> pa.Schema:
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    cols = [("id", pa.string()), ("sample", pa.int32()), ("prompt", pa.string()),
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


def run_generation(cfg: GenerationConfig, *, progress: bool = True) -> Path:
    """Generate what is missing in `cfg.output_dir` and return that directory."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from llmkd.data.recipes import load_recipe
    from llmkd.generation.backends import check_engine_options, make_backend
    from llmkd.generation.codec import id_bytes
    from llmkd.generation.hidden import head_path, hidden_rows, save_head
    from llmkd.generation.rationales import YieldCounter
    from llmkd.generation.writer import ShardWriter
    from llmkd.preflight import model_vocab_size

    # 1. Everything checkable without the teacher, before the engine starts.
    model_dir = resolve_model(cfg.model)
    check_engine_options(cfg.backend, cfg.engine)
    vocab = model_vocab_size(model_dir)
    if vocab is not None and cfg.topk > vocab:
        raise ValueError(f"config: topk={cfg.topk} is more than the teacher's vocabulary ({vocab} tokens, "
                         f"{model_dir / 'config.json'}); lower topk (e.g. 20)")
    recipe = load_recipe(cfg.recipe, path=cfg.data_path)
    data = recipe.load(cfg.num_prompts, seed=cfg.seed, offset=cfg.offset)
    records = data.select_columns(["id", "prompt", "answer"]).to_list()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    prompt_ids = build_prompts(cfg, recipe, tokenizer, [r["prompt"] for r in records])
    writer = ShardWriter(cfg.output_dir, cfg.fingerprint_fields(model_dir), _schema(cfg),
                         shard_size=cfg.shard_size, worker=cfg.worker, workers=cfg.workers)

    # 2. What is left: this worker's prompts that fit, minus (id, sample) pairs on disk (written
    #    by any worker, so a rerun with another worker count still skips finished prompts).
    limit = cfg.max_model_len - cfg.max_new_tokens
    counter = YieldCounter(keep_incorrect=cfg.keep_all)
    done = writer.done_keys()
    todo: list[tuple[int, set[int]]] = []
    for i, ids in enumerate(prompt_ids):
        if i % cfg.workers != cfg.worker:
            continue
        if len(ids) > limit:
            counter.skipped_too_long += 1
            continue
        missing = {s for s in range(cfg.n) if (records[i]["id"], s) not in done}
        if missing:
            todo.append((i, missing))

    # 3. Generate batch by batch; every batch lands on disk before the next starts.
    spec = cfg.sampling
    engine = dict(cfg.engine)
    if cfg.tensor_parallel_size > 1:
        engine["tensor_parallel_size"] = cfg.tensor_parallel_size
    head_missing = cfg.targets == "hidden" and not head_path(cfg.output_dir).exists()
    backend = make_backend(cfg.backend, str(model_dir), dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                           **engine) if todo or (head_missing and writer.done_keys()) else None
    new_tokens, gen_seconds = 0, 0.0
    bar = tqdm(total=len(todo), desc=f"generate ({cfg.backend})", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(todo), cfg.prompts_per_batch):
            batch = todo[start:start + cfg.prompts_per_batch]
            t0 = time.perf_counter()
            outs = backend.generate([prompt_ids[i] for i, _ in batch], spec, progress=False)
            gen_seconds += time.perf_counter() - t0
            for (i, missing), comps in zip(batch, outs):
                new_tokens += sum(len(c.token_ids) for c in comps)
                states = None if cfg.targets == "topk" else hidden_rows(
                    backend.model, prompt_ids[i], [c.token_ids for c in comps], cfg.hidden_dtype)
                rows, dropped = _rows_for(cfg, records[i], prompt_ids[i], comps, missing,
                                         recipe.answer_kind, counter, id_width=id_bytes(len(tokenizer)),
                                         hidden=states)
                writer.add(rows, dropped)
            writer.flush()
            if head_missing:   # once per dir, beside the first shard
                save_head(backend.model, cfg.output_dir, vocab=len(tokenizer), hidden_dtype=cfg.hidden_dtype)
                head_missing = False
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{new_tokens / max(gen_seconds, 1e-9):.0f}", kept=counter.kept)
        if head_missing and backend is not None:   # shards of a run killed before its head
            save_head(backend.model, cfg.output_dir, vocab=len(tokenizer), hidden_dtype=cfg.hidden_dtype)
    finally:
        bar.close()
        if backend is not None:
            backend.close()

    # 4. Manifest: this run's counters (per worker too) plus totals over everything on disk.
    def totals() -> dict[str, Any]:
        rows_on_disk = writer.read_column("correct")
        dropped_on_disk = len(writer.dropped_keys())
        generated = len(rows_on_disk) + dropped_on_disk
        return {"completions": generated, "rows": len(rows_on_disk), "dropped": dropped_on_disk,
                "correct": sum(bool(c) for c in rows_on_disk),
                "yield": len(rows_on_disk) / generated if generated else None}

    prompts = {"requested": len(prompt_ids), "skipped_too_long": counter.skipped_too_long,
               "generated_this_run": len(todo)}
    last_run = {**counter.summary(), "new_tokens": new_tokens, "generate_seconds": round(gen_seconds, 3),
                "tokens_per_second": round(new_tokens / gen_seconds, 2) if gen_seconds else None}
    per_worker = {"workers": {str(cfg.worker): {"prompts": prompts, "last_run": last_run}}} \
        if cfg.workers > 1 else {}
    from llmkd.data.collate import tokenizer_fingerprint

    writer.close(
        totals=totals, **per_worker,
        teacher={"name": model_dir.name, "path": str(model_dir), "backend": cfg.backend, "dtype": cfg.dtype,
                 "tokenizer": tokenizer_fingerprint(tokenizer)},
        sampling=dataclasses.asdict(spec), recipe={"name": recipe.name, "answer_kind": recipe.answer_kind,
                                                   "num_prompts": cfg.num_prompts, "offset": cfg.offset},
        mode=cfg.mode, chat_template=cfg.chat_template, prompts=prompts, last_run=last_run)
    return Path(cfg.output_dir)
