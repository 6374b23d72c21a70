"""Checks of what a run will read and write, done from file headers before any weights load.

Everything here reads JSON and a few bytes of safetensors headers; nothing imports a model
library, so `llmkd distill` and `llmkd eval` reject a broken model directory, a tokenizer that
does not fit its model or an output_dir that cannot be written in well under a second, instead
of failing minutes later (a truncated weights file, an IndexError in the embedding).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

SAFE_INDEX = "model.safetensors.index.json"
SAFE_WEIGHTS = ("model.safetensors", "adapter_model.safetensors")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def safetensors_problem(path: Path) -> str | None:
    """None if the file's header parses and the file is as long as the header says; else why
    not (a copy or save cut short leaves a file whose header promises more bytes than exist)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
            if size < 8 or 8 + n > size:
                return f"{path} is truncated ({size} bytes, shorter than its own header)"
            header = json.loads(f.read(n))
    except OSError as err:
        return f"{path} cannot be read ({err.strerror})"
    except (ValueError, UnicodeDecodeError):
        return f"{path} is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path} is not a safetensors file (its header is a JSON {type(header).__name__}, not an object)"
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            return (f"{path} has a damaged header (tensor {name!r}: data_offsets={offsets!r}, not two "
                    "ordered integers)")
        ends.append(offsets[1])
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"{path} is truncated ({size} bytes; its header needs {need})"
    return None


def json_problem(path: Path) -> str | None:
    """None if `path` is absent or holds valid JSON; else where it breaks (a copy cut short
    leaves e.g. tokenizer.json ending mid-string, which tokenizers reports without a file name)."""
    if not path.exists():
        return None
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        return f"{path} cannot be read ({err.strerror})"
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text"
    except json.JSONDecodeError as err:
        return (f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}: "
                "cut short or edited?)")
    return None


def weights_problem(model_dir: Path) -> str | None:
    """None if the directory holds complete safetensors weights (one file, or every shard of an
    index); else what is wrong. Pickle weights are refused: llmkd loads safetensors only."""
    index = model_dir / SAFE_INDEX
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index} is not a valid safetensors index (no weight_map)"
        for shard in shards:
            if not (model_dir / shard).exists():
                return f"{model_dir / shard} is missing (listed in {SAFE_INDEX})"
            problem = safetensors_problem(model_dir / shard)
            if problem:
                return problem
        return None
    for name in SAFE_WEIGHTS:
        if (model_dir / name).exists():
            return safetensors_problem(model_dir / name)
    pickles = [name for name in PICKLE_WEIGHTS if (model_dir / name).exists()]
    if pickles:
        return (f"{model_dir} holds only {pickles[0]} (pickle); llmkd loads safetensors only: re-save "
                "the model with save_pretrained(dir) (safetensors is the default)")
    return f"{model_dir} has no weights (model.safetensors or {SAFE_INDEX})"


def tokenizer_size(model_dir: Path) -> int | None:
    """Largest token id + 1 the directory's tokenizer can produce, from tokenizer.json (or
    vocab.json + added_tokens.json); None when neither exists (e.g. sentencepiece only)."""
    ids: list[int] = []
    tj = model_dir / "tokenizer.json"
    try:
        if tj.exists():
            data = json.loads(tj.read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                ids += [int(i) for i in vocab.values()]
            elif isinstance(vocab, list):          # Unigram: [[piece, score], ...]
                ids.append(len(vocab) - 1)
            ids += [int(t["id"]) for t in data.get("added_tokens") or []]
        elif (model_dir / "vocab.json").exists():
            ids += [int(i) for i in json.loads((model_dir / "vocab.json").read_text(encoding="utf-8")).values()]
            added = model_dir / "added_tokens.json"
            if added.exists():
                ids += [int(i) for i in json.loads(added.read_text(encoding="utf-8")).values()]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None     # an unusual layout: the tokenizer loader reports real problems itself
    return max(ids) + 1 if ids else None


def model_vocab_size(model_dir: Path) -> int | None:
    """vocab_size from config.json (or its text_config for multimodal configs)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (cfg, cfg.get("text_config") or {}):
        if isinstance(section.get("vocab_size"), int):
            return section["vocab_size"]
    return None


def check_model_dir(path: str | Path, field: str = "model") -> str:
    """A local model directory a run will load: config.json, complete safetensors weights,
    tokenizer files, and a tokenizer whose ids fit the model's vocabulary. `field` names the
    config key in the message (e.g. model.teacher). Returns the path."""
    d = Path(path).expanduser()
    where = f"{field}={str(path)!r}"
    if not d.is_dir():
        raise FileNotFoundError(f"{where}: model directory {str(d)!r} does not exist; give a local "
                                "model dir (config.json + safetensors) or embedded")
    if not (d / "config.json").exists() and (d / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{where}: {str(d)!r} holds a LoRA adapter, not a whole model; merge it into its base "
            "first (peft: AutoPeftModelForCausalLM.from_pretrained(dir).merge_and_unload()"
            ".save_pretrained(out), and save the tokenizer into out) and pass the merged dir")
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{where}: {str(d)!r} is not a model directory (no config.json); give "
                                "a dir written by save_pretrained, or embedded")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        problem = json_problem(d / name)
        if problem:
            raise ValueError(f"{where}: {problem}; copy or save the model again")
    problem = weights_problem(d)
    if problem:
        raise ValueError(f"{where}: {problem}; copy or save the model again")
    if not any((d / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{where} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                                "save the tokenizer into it with tokenizer.save_pretrained(dir)")
    n_tok, n_vocab = tokenizer_size(d), model_vocab_size(d)
    if n_tok is not None and n_vocab is not None and n_tok > n_vocab:
        raise ValueError(
            f"{where}: its tokenizer produces token ids up to {n_tok - 1} but config.json has "
            f"vocab_size={n_vocab}, so the model cannot embed them; use the tokenizer saved with "
            "this model, or resize the model's embeddings to the tokenizer and save it again")
    return str(d)


def check_output_dir(path: str | Path, field: str = "output_dir") -> None:
    """The directory can be created (or is a directory) and written, without creating it:
    a run that fails here leaves nothing behind."""
    p = Path(path).expanduser()
    where = f"{field}={str(path)!r}"
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"{where} is a file, not a directory; choose another {field}")
    existing = p.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{where}: {existing} is a regular file, so no directory can be "
                                 f"created under it; choose another {field}")
    if not (os.access(existing, os.W_OK | os.X_OK) if existing == p.absolute() else _writable(existing)):
        raise PermissionError(f"{where}: {existing} is not writable (permission or read-only file "
                              f"system); choose a writable {field}")


def _writable(directory: Path) -> bool:
    """Can a directory be created in `directory`? Really try, as the run would (root passes
    os.access on places like /proc); the probe is removed at once."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".llmkd-probe-", dir=directory))
    except OSError:
        return False
    return True
