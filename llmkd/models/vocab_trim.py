"""A teacher whose `vocab_size` exceeds its tokenizer (Qwen2's 152,064 rows for 151,665 tokens,
Phi-3's 32,064 for 32,011) has output rows no text can hold. vLLM normalises its log-probs over
all of them before any mask applies (`allowed_token_ids` only reaches sampling), so its stored
or served top-k would be a distribution over ids the student cannot see, and it could sample one.

The exact fix is a view of the model without those rows: the embedding and output-head tensors
cut to the tokenizer's size, `vocab_size` set to match, every other file linked, not copied.
Inputs never hold a padding id, so the view computes the same logits on the real rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def loaded_tokenizer_size(model_dir: str | Path) -> int:
    """len() of the tokenizer as transformers loads it: the count the hf backend masks from, so
    both backends agree. Not `preflight.tokenizer_size` (ids read from tokenizer.json without
    importing transformers): a loader may add special tokens that file lacks, and a view cut
    below them would drop rows the tokenizer can produce."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False))


def vocab_tensors(model_dir: Path) -> set[str]:
    """Checkpoint names of the input embedding and the output head (weight, bias): found on a
    meta-device copy of the architecture, so no weight loads and no name list is guessed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    ours = {id(t) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            for t in (m.weight, getattr(m, "bias", None)) if t is not None}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in ours}


VIEW_FORMAT = 1    # part of the cache key: a view built by older code is never reused


def _key(model_dir: Path, vocab: int) -> str:
    h = hashlib.sha256(f"{VIEW_FORMAT}|{model_dir.resolve()}|{vocab}".encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def vocab_trimmed(model_dir: str | Path, vocab: int | None = None, cache: Path | None = None) -> Path:
    """`model_dir` itself when its vocab_size fits its tokenizer, else a view cut to the
    tokenizer's `vocab` rows, built once under `cache` (default: LLMKD_CACHE/vocab_trimmed);
    shards without a vocabulary tensor are symlinked."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmkd.models.embedded import cache_root
    from llmkd.preflight import model_vocab_size

    src = Path(model_dir)
    config = json.loads((src / "config.json").read_text())
    rows = model_vocab_size(src)
    vocab = loaded_tokenizer_size(src) if vocab is None else vocab
    if rows is None or rows <= vocab:
        return src
    if not isinstance(config.get("vocab_size"), int):
        raise ValueError(f"model={str(src)!r}: its text_config.vocab_size ({rows}) has rows beyond its "
                         f"tokenizer ({vocab} tokens), which vLLM would sample and count; a nested "
                         "(multimodal) config cannot be trimmed: use the hf backend")
    root = cache or cache_root() / "vocab_trimmed"
    out = root / _key(src, vocab)
    if (out / "config.json").is_file():
        return out
    for old in root.glob(out.name + ".tmp*"):          # left by a build that was killed
        if not _alive(old.name.rpartition(".tmp")[2]):
            shutil.rmtree(old, ignore_errors=True)
    names = vocab_tensors(src)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cut_any = False
    for f in src.iterdir():
        if not f.is_file() or f.name == "config.json":
            continue
        if f.suffix == ".safetensors":
            with safe_open(f, "pt") as st:
                cut = [n for n in st.keys() if n in names and st.get_slice(n).get_shape()[0] == rows]
                if cut:
                    tensors = {n: st.get_tensor(n)[:vocab].contiguous() if n in cut else st.get_tensor(n)
                               for n in st.keys()}
                    save_file(tensors, tmp / f.name, metadata=st.metadata() or {"format": "pt"})
                    cut_any = True
                    continue
        (tmp / f.name).symlink_to(f.resolve())
    if not cut_any:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"model={str(src)!r}: vocab_size {rows} exceeds its tokenizer ({vocab} tokens), but "
                         f"no checkpoint tensor is named {sorted(names)} to cut; save the model with "
                         "save_pretrained from its *ForCausalLM class, or use the hf backend")
    (tmp / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}, indent=1))
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():      # not another process that built it first
            raise
    return out
