"""Hidden-state targets for `cache_size.py`: the same rows written as `targets: hidden` shards."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cache_size import disk_bytes


def hidden_entry(model_dir: str, src: Path, dst: Path, t_logp: Any, dtype: str = "bfloat16") -> dict[str, Any]:
    """The rows of `src` written as `llmkd generate` writes targets=hidden (the teacher's final
    hidden state per response token + its head file), their bytes/token, and KL(full teacher ||
    the stored states through the stored head): what the 16-bit storage loses."""
    import pyarrow.parquet as pq
    import torch

    from llmkd.generation.hidden import HEAD_FILE, hidden_rows, load_head, save_head
    from llmkd.generation.run import GenerationConfig, _schema
    from llmkd.generation.writer import ShardWriter, read_manifest
    from llmkd.models.student import load_causal_lm

    teacher = load_causal_lm(model_dir).eval()
    config = {k: v for k, v in read_manifest(src)["config"].items() if k not in ("topk", "cache")}
    config.update(topk=0, targets="hidden", hidden_dtype=dtype)
    rows = []
    for shard in sorted(src.glob("shard-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            rest = {c: v for c, v in row.items() if not c.startswith("teacher_")}
            state, = hidden_rows(teacher, row["prompt_token_ids"], [row["response_token_ids"]], dtype)
            rows.append({**rest, "teacher_hidden": state})
    writer = ShardWriter(dst, config, _schema(GenerationConfig(backend="hf", targets="hidden",
                                                               hidden_dtype=dtype)))
    writer.add(rows)
    writer.close()
    vocab = t_logp.shape[-1]
    save_head(teacher, dst, vocab=vocab, hidden_dtype=dtype)
    head, _ = load_head(dst, vocab)
    states = torch.cat([torch.frombuffer(bytearray(r["teacher_hidden"]), dtype=torch.int16)
                        .view(len(r["response_token_ids"]), -1) for r in rows]).view(getattr(torch, dtype))
    kl = torch.cat([(t.exp() * (t - head.logits(h.float()).log_softmax(-1))).sum(-1)
                    for t, h in zip(t_logp.split(512), states.split(512))])
    disk = disk_bytes(dst)
    head_bytes = (dst / HEAD_FILE).stat().st_size
    return {"disk": disk, "hidden_dtype": dtype, "hidden_size": states.shape[-1],
            "hidden_bytes_per_token": disk["column_bytes_per_token"]["teacher_hidden"],
            "head_file_bytes": head_bytes, "kl_full_vs_stored_mean": float(kl.mean()),
            "kl_full_vs_stored_max": float(kl.max())}


def main() -> None:
    """`python benchmarks/cache_hidden.py --shards DIR`: the hidden-state entry alone, for the rows
    of an `llmkd generate` dir (e.g. the one `cache_size.py --shards` reads), without the top-k part."""
    import argparse
    import json
    import os
    import tempfile

    import pyarrow.parquet as pq

    from cache_size import RESULTS, teacher_positions
    from llmkd.models.embedded import resolve_model_name

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--output", type=Path, default=RESULTS.with_name("cache_hidden.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = resolve_model_name(args.model)
    rows = [r for s in sorted(args.shards.glob("shard-*.parquet")) for r in pq.read_table(s).to_pylist()]
    t_logp, _ = teacher_positions(model_dir, rows)
    with tempfile.TemporaryDirectory() as tmp:
        entry = hidden_entry(model_dir, args.shards, Path(tmp) / "hidden", t_logp, args.dtype)
    entry = {"model": args.model, "rows": len(rows), **entry}
    print(json.dumps({k: v for k, v in entry.items() if k != "disk"}, indent=1),
          f"\nshard {entry['disk']['bytes_per_token']:.1f} B/token")
    args.output.write_text(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
