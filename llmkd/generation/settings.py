"""The `llmkd generate` config: what to generate, with which teacher(s), into which directory.

Validated before any engine starts (keys, types, sampling, a mixture's sources); its
`fingerprint_fields` are what the rows depend on, so a rerun with another config is refused and
one with the same config resumes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkd.generation.backends import BACKENDS, DTYPES
from llmkd.generation.spec import SamplingSpec


MODES = ("response", "rationale")
CACHES = ("auto", "lossless", "compact")
TARGETS = ("topk", "hidden")
# the keys a mixture source sets for itself; every other key is shared by all sources
SOURCE_KEYS = ("teacher", "model", "recipe", "data_path", "num_prompts", "offset")


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
    cache: str = "auto"                  # top-k storage: auto (compact for a new dir, a resumed dir's own)
                                         # | lossless float32 | compact (llmkd.generation.codec)
    targets: str = "topk"                # topk: top-k log-probs | hidden: final hidden states + head
    hidden_dtype: str = "bfloat16"       # targets=hidden: bfloat16 | float16 storage
    keep_incorrect: bool | None = None   # None: keep all in response mode, only correct in rationale
    output_dir: str = "outputs/generations/run"
    shard_size: int = 256                # rows per parquet shard
    batch_size: int | None = None        # prompts per generation batch; None: shard_size // n
    workers: int = 1                     # processes (GPUs, nodes) sharing this run's prompts
    worker: int = 0                      # which of them this is: prompt i goes to i % workers
    mixture: list | None = None          # several teachers: [{teacher: NAME, model: DIR, recipe: R,
                                         # num_prompts: N}, ...] -> one dataset, a `teacher` column

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
        self.sources   # validates the mixture

    @property
    def sources(self) -> list[tuple[str | None, GenerationConfig]]:
        """[(teacher name or None, the config of that source)]: a mixture's sources, each its own
        keys (SOURCE_KEYS) over the shared ones; without a mixture the config is the one source."""
        if not self.mixture:
            return [(None, self)]
        from llmkd.data.mixture import mixture_entries
        from llmkd.validation import coerce

        out, seen = [], set()
        for where, name, entry in mixture_entries("mixture", self.mixture, SOURCE_KEYS):
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"config: {where}teacher={name!r}: each source names its teacher (the "
                                 "name model.teachers uses in training, no '/')")
            key = (name, entry.get("recipe", self.recipe), entry.get("data_path", self.data_path))
            if key in seen:
                raise ValueError(f"config: {where[:-1]} repeats teacher {name!r} on recipe {key[1]!r}; "
                                 "give each (teacher, recipe) pair once (raise its num_prompts instead)")
            seen.add(key)
            out.append((name, dataclasses.replace(self, mixture=None, **coerce(where, entry, GenerationConfig))))
        return out

    def with_cache(self) -> GenerationConfig:
        """This config with `cache` settled against output_dir. `auto` takes the codec of the
        shards already there, so a resumed dir never switches codec mid-dir and keeps the
        fingerprint it was written with; a new dir gets compact top-k (students trained from it
        matched lossless ones within noise) and lossless where there is no top-k to compress.
        An explicit codec other than the dir's is refused: one dir holds one codec."""
        from llmkd.generation.writer import stored_cache

        found = stored_cache(self.output_dir)
        if self.cache == "auto":
            new = "compact" if self.topk and self.targets == "topk" else "lossless"
            return dataclasses.replace(self, cache=found or new)
        if found and found != self.cache:
            raise ValueError(f"config: cache={self.cache!r} but output_dir {self.output_dir!r} holds {found} "
                             "shards, and one dir never mixes codecs; drop cache (the default keeps a dir's "
                             "codec) or choose another output_dir")
        return self

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

    def fingerprint_fields(self, model_dir: Path, source_dirs: list[Path] = ()) -> dict[str, Any]:
        """What the rows depend on. Not num_prompts/offset (a rerun may extend the set), not
        output/shard/batch sizes, workers or engine settings (layout and speed only). A mixture
        adds each source's teacher, model dir (`source_dirs`) and recipe."""
        d = dataclasses.asdict(self)
        for key in ("num_prompts", "offset", "output_dir", "shard_size", "batch_size", "engine",
                    "tensor_parallel_size", "workers", "worker", "mixture"):
            d.pop(key)
        if d["cache"] == "lossless":   # the old default: dirs written before the key existed still match
            d.pop("cache")
        if d["targets"] == "topk":     # likewise for dirs written before hidden-state targets
            d.pop("targets")
            d.pop("hidden_dtype")
        if self.mixture:
            d["mixture"] = [{"teacher": name, "model": str(m), "recipe": c.recipe, "data_path": c.data_path}
                            for (name, c), m in zip(self.sources, source_dirs)]
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
