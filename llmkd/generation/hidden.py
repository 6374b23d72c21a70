"""Hidden-state targets (generate config `targets: hidden`): exact full-vocabulary teacher targets.

Instead of k log-probs per position, a generation dir holds the teacher's final hidden state (the
input of its lm_head, after the final norm) per response token, in bfloat16 or float16, and once
per dir the teacher's output head (weight, bias, logit scale, soft-cap: `llmkd.models.head.LMHead`)
in `teacher_head.safetensors` beside the manifest. Training applies that head chunk by chunk in
the chunked loss, so every divergence sees the whole vocabulary and the teacher's body never loads.

Row layout: column `teacher_hidden`, one binary value per row, the (T, H) states of its T response
tokens as raw 16-bit values, row j being the state whose logits give response token j (the state
at the position before it). `lay_hidden` places them on the positions that predict those tokens.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkd.data.hidden import COLUMN  # noqa: F401  (the row column, re-exported)

if TYPE_CHECKING:
    from llmkd.models.head import LMHead

HEAD_FILE = "teacher_head.safetensors"
HIDDEN_DTYPES = ("bfloat16", "float16")


def check_config(cfg: Any) -> None:
    """Settings hidden-state targets cannot serve, as one-line config errors.

    vLLM is not supported: its generate API returns tokens and log-probs only; per-token hidden
    states come from its pooling runner, a second engine over the same weights, which would
    double the teacher's memory. The hf backend runs one extra forward per completion instead."""
    if cfg.backend != "hf":
        raise ValueError(f"config: targets=hidden needs backend=hf (found {cfg.backend!r}): vLLM's "
                         "generate returns no hidden states; set backend=hf, or targets=topk")
    if cfg.cache not in ("auto", "lossless"):
        raise ValueError(f"config: cache={cfg.cache!r} compresses top-k log-probs, which targets=hidden "
                         "does not store; drop cache or set targets=topk")
    if getattr(cfg, "mixture", None):
        raise ValueError("config: targets=hidden stores one teacher's output head per dataset, but mixture "
                         "names several teachers; generate each teacher into its own output_dir")
    if cfg.hidden_dtype not in HIDDEN_DTYPES:
        raise ValueError(f"config: hidden_dtype={cfg.hidden_dtype!r} is unknown; use one of {HIDDEN_DTYPES}")


def head_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / HEAD_FILE


def hidden_rows(model: Any, prompt: list[int], responses: list[list[int]], dtype: str) -> list[bytes]:
    """The final hidden states of `model` that produced each response's tokens, one forward per
    completion (prompt + response, as training sees them), as raw `dtype` bytes."""
    import torch

    from llmkd.models.head import forward_head

    out = []
    device = next(model.parameters()).device
    for resp in responses:
        if not resp:
            out.append(b"")
            continue
        ids = torch.tensor([prompt + resp[:-1]], device=device)   # the last token predicts nothing
        with torch.no_grad():
            h = forward_head(model, {"input_ids": ids}, hidden=True).hidden
        if h is None:
            raise ValueError("targets=hidden: the teacher's lm_head cannot be applied outside its "
                             "forward (LoRA, quantized or custom head); use targets=topk")
        states = h[0, len(prompt) - 1:].to(getattr(torch, dtype)).contiguous().cpu()
        out.append(states.view(torch.int16).numpy().tobytes())
    return out


def save_head(model: Any, out_dir: str | Path, *, vocab: int, hidden_dtype: str) -> Path:
    """Write the teacher's `LMHead` (as `lm_head_of` reads it) beside the manifest, atomically."""
    return write_head(model, head_path(out_dir), vocab=vocab, hidden_dtype=hidden_dtype)


def write_head(model: Any, path: str | Path, *, vocab: int, hidden_dtype: str) -> Path:
    """Write the teacher's `LMHead` to `path` (temp + rename): a generated dir's, or the one a
    served teacher's trainer reads (`model.teacher_head`, written by `llmkd serve-teacher`)."""
    from safetensors.torch import save_file

    from llmkd.models.head import lm_head_of

    head = lm_head_of(model)
    if head is None:
        raise ValueError("targets=hidden: the teacher's lm_head is not one llmkd can store (LoRA, "
                         "quantized or custom head); use targets=topk")
    tensors = {"weight": head.weight.detach().cpu().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().cpu().contiguous()
    meta = {"scale": json.dumps(head.scale), "softcap": json.dumps(head.softcap),
            "vocab": str(vocab), "hidden_dtype": hidden_dtype}
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def check_head(data_dir: str | Path, vocab: int) -> None:
    """One-line errors, before any weights load, for a hidden-state dir whose head file is
    missing or whose vocabulary is not the student's (`vocab` = the student tokenizer's size)."""
    check_head_file(head_path(data_dir), vocab, missing=(
        f"data.path={str(data_dir)!r} holds teacher hidden states but no {HEAD_FILE}; the output head "
        "is written by `llmkd generate` with targets=hidden: regenerate the dir, or copy the head "
        "file back beside manifest.json"))


def check_head_file(path: str | Path, vocab: int, *, missing: str) -> None:
    """The `missing` error when there is no file at `path`; one line when its vocabulary is not
    the student's."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(missing)
    with safe_open(str(path), framework="pt") as f:
        rows = f.get_slice("weight").get_shape()[0]
        meta = f.metadata() or {}
    head_vocab = int(meta.get("vocab", rows))
    if rows < head_vocab:
        raise ValueError(f"{path}: the teacher head has {rows} rows but its tokenizer {head_vocab} tokens; "
                         "the teacher model and its tokenizer do not belong together (resize the "
                         "model's embeddings to the tokenizer, then rewrite the head)")
    if head_vocab != vocab:
        raise ValueError(f"{path}: the teacher head covers a vocabulary of {head_vocab} tokens "
                         f"({rows} rows) but the student's tokenizer has {vocab}; hidden-state targets "
                         "need the student's vocabulary: use a student with the teacher's tokenizer")


def load_head(data_dir: str | Path, vocab: int) -> tuple[LMHead, str]:
    """(the stored head restricted to `vocab` rows, the hidden states' dtype name)."""
    check_head(data_dir, vocab)
    return read_head(head_path(data_dir), vocab)


def read_head(path: str | Path, vocab: int) -> tuple[LMHead, str]:
    """A checked head file as (its `LMHead` restricted to `vocab` rows, the states' dtype name)."""
    from safetensors import safe_open

    from llmkd.models.head import LMHead

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        bias = f.get_tensor("bias") if "bias" in f.keys() else None
        head = LMHead(weight=f.get_tensor("weight"), bias=bias, scale=float(json.loads(meta["scale"])),
                      softcap=json.loads(meta["softcap"]))
    return head.rows(vocab), meta.get("hidden_dtype", "bfloat16")


def _token_kd_only(method: Any, where: str) -> None:
    if method.name != "token_kd":
        raise ValueError(f"{where} holds teacher hidden states, which method {method.name!r} does not "
                         "read; use method.name=token_kd, or top-k targets")


def offline_head(data_dir: str | Path, method: Any, vocab: int) -> tuple[LMHead, str] | None:
    """For a dir written with targets=hidden: check its head file (one-line errors, before any
    weights load) and return (the stored head, the states' dtype); None for other dirs."""
    from llmkd.generation.writer import read_manifest

    if read_manifest(data_dir).get("config", {}).get("targets", "topk") != "hidden":
        return None
    _token_kd_only(method, f"data.path={str(data_dir)!r}")
    return load_head(data_dir, vocab)


def served_head(path: str | Path, method: Any, vocab: int) -> tuple[LMHead, str]:
    """For a served teacher with teacher_targets=hidden: the head file `model.teacher_head` names,
    checked (one-line errors, before any weights load)."""
    _token_kd_only(method, f"model.teacher_server with teacher_targets=hidden (model.teacher_head={str(path)!r})")
    check_head_file(path, vocab, missing=(
        f"config: model.teacher_head={str(path)!r} does not exist; `llmkd serve-teacher CONFIG` writes "
        "the teacher's output head there when model.teacher_targets=hidden: run it (or copy the file "
        "from the teacher's machine) before training"))
    return read_head(path, vocab)
