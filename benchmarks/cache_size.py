"""Offline teacher cache: bytes per token on disk at k = 20 and k = 50, and what the stored top-k keeps.

1. `llmkd generate` (HF backend, greedy, top-k 50 log-probs) writes real shards for held-out
   prompts (`--offset` past any training prompt). The k = 20 shards are the same rows cut to
   their 20 best entries (the lists are sorted, so that is exactly what topk=20 writes) and written
   with the same `ShardWriter` and schema. Bytes/token = shard bytes / response tokens, for the
   whole shard and for the top-k columns alone (per-column compressed sizes from the parquet
   footer). DistillKit's published figure: ~114 B/token at k = 50 (its "budget" compressor:
   1 exact bf16 log-prob + a polynomial fit of the rest, ids bit-packed).
2. Fidelity on those held-out positions, from one teacher forward over prompt + response:
     kl_bins     KL(teacher collapsed onto the stored k ids + one tail bin || the stored values read
                 the way `llmkd.losses.sparse` reads them: float32, tail floored at its eps):
                 what the encoding loses (0 = lossless)
     kl_trunc    KL(full teacher || top-k with the tail spread evenly over the other ids): what
                 keeping only k entries loses, whatever the encoding
     loss_err    relative error of the sparse forward-KL loss of a student (every other teacher
                 layer) on the stored values vs on the exact bins
     grad_cos    cosine between that loss's gradient w.r.t. the student logits and the dense
                 forward-KL gradient against the full teacher
3. Candidate encodings of the same top-k data (not the on-disk format, which belongs to
   `llmkd.generation`): parquet byte-stream-split for the float columns, float16 / bfloat16
   log-probs, uint16 ids (vocab < 65536), 8-bit log-prob gaps below the top-1, no tail column.

    python benchmarks/cache_size.py            # embedded teacher, 32 gsm_symbolic prompts (~3 min)
    python benchmarks/cache_size.py --quick    # tiny random model: a smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "cache_size.json"
DISTILLKIT_K50_BYTES = 114
TOPK_COLS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_mass",
             "teacher_topk_compact_ids", "teacher_topk_compact_levels", "teacher_topk_compact_meta")
KS = (20, 50, 128)


# -- shards ------------------------------------------------------------------------------------
def generate_shards(model: str, out: Path, args: argparse.Namespace) -> Path:
    """A real `llmkd generate` run at the largest k, lossless: the exact values every cut and
    encoding below starts from."""
    from llmkd.generation.run import GenerationConfig, run_generation

    cfg = GenerationConfig(model=model, backend="hf", recipe=args.recipe, num_prompts=args.prompts,
                           offset=args.offset, temperature=0.0, max_new_tokens=args.max_new_tokens,
                           topk=max(KS), cache="lossless", max_model_len=args.max_model_len, output_dir=str(out),
                           engine={"batch_size": 16})
    return run_generation(cfg, progress=False)


def write_cut(src: Path, dst: Path, k: int, cache: str = "lossless", vocab: int = 2**31) -> Path:
    """The rows of `src` with each position's top-k list cut to its k best entries, written as
    `llmkd generate` writes them with `cache` (lossless columns or the compact codec)."""
    import pyarrow.parquet as pq

    from llmkd.generation import codec
    from llmkd.generation.run import GenerationConfig, _schema
    from llmkd.generation.writer import ShardWriter, read_manifest

    config = dict(read_manifest(src)["config"], topk=k, cache=cache)
    rows = []
    for shard in sorted(src.glob("shard-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            ids = [x[:k] for x in row["teacher_topk_ids"]]
            lps = [x[:k] for x in row["teacher_topk_logprobs"]]
            if cache == "compact":
                rest = {c: v for c, v in row.items() if c not in codec.DECODED}
                rows.append({**rest, **codec.encode_row(ids, lps, width=codec.id_bytes(vocab))})
                continue
            rows.append({**row, "teacher_topk_ids": ids, "teacher_topk_logprobs": lps,
                         "teacher_tail_mass": [max(0.0, 1.0 - math.fsum(math.exp(v) for v in lp))
                                               for lp in lps]})
    writer = ShardWriter(dst, config, _schema(GenerationConfig(topk=k, cache=cache)))
    writer.add(rows)
    writer.close()
    return dst


def disk_bytes(out: Path) -> dict[str, Any]:
    """Shard bytes in total and per column (compressed, from the parquet footers)."""
    import pyarrow.parquet as pq

    shards = sorted(out.glob("shard-*.parquet"))
    per_col: dict[str, int] = {}
    tokens = 0
    for shard in shards:
        meta = pq.ParquetFile(shard).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                name = col.path_in_schema.split(".")[0]
                per_col[name] = per_col.get(name, 0) + col.total_compressed_size
        tokens += sum(len(x) for x in pq.read_table(shard, columns=["response_token_ids"])
                      .column("response_token_ids").to_pylist())
    total = sum(p.stat().st_size for p in shards)
    topk = sum(per_col.get(c, 0) for c in TOPK_COLS)
    return {"tokens": tokens, "shards": len(shards), "file_bytes": total,
            "bytes_per_token": total / tokens, "topk_bytes_per_token": topk / tokens,
            "column_bytes_per_token": {c: b / tokens for c, b in sorted(per_col.items())}}


# -- encodings -------------------------------------------------------------------------------------
def encodings(vocab: int) -> dict[str, dict[str, Any]]:
    """name -> how the top-k columns are written (the shard's own encoding first). `bss`: parquet
    BYTE_STREAM_SPLIT on the float columns ("floats") or every column ("all"): lossless, a writer
    option only; readers (pyarrow, datasets) need no change."""
    out = {
        "shard: int32 ids, float32 log-probs, tail": {"ids": "int32", "lp": "float32", "tail": True},
        "same + byte_stream_split on floats": {"ids": "int32", "lp": "float32", "tail": True,
                                              "bss": "floats"},
        "byte_stream_split all, no tail column": {"ids": "int32", "lp": "float32", "tail": False,
                                                  "bss": "all"},
        "float16 log-probs, bss, no tail": {"ids": "int32", "lp": "float16", "tail": False, "bss": "all"},
        "bfloat16 log-probs, bss, no tail": {"ids": "int32", "lp": "bfloat16", "tail": False,
                                             "bss": "all"},
        "8-bit gaps below top-1 (1/16 nat), no tail": {"ids": "int32", "lp": "gap8", "tail": False},
    }
    if vocab <= 65536:
        out["uint16 ids, float16, bss, no tail"] = {"ids": "uint16", "lp": "float16", "tail": False,
                                                    "bss": "all"}
    return out


def encode_decode(ids: Any, lps: Any, enc: dict[str, Any], path: Path) -> tuple[int, Any]:
    """Write (T, k) ids / log-probs with encoding `enc` to one parquet file; return its size and
    the log-probs as a reader would decode them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    t, k = ids.shape
    cols: dict[str, Any] = {}
    id_type = pa.uint16() if enc["ids"] == "uint16" else pa.int32()
    cols["ids"] = pa.FixedSizeListArray.from_arrays(
        pa.array(ids.reshape(-1).numpy().astype(np.uint16 if enc["ids"] == "uint16" else np.int32),
                 type=id_type), k)
    lp32 = lps.float()
    if enc["lp"] == "float32":
        decoded = lp32
        cols["lp"] = pa.FixedSizeListArray.from_arrays(pa.array(lp32.reshape(-1).numpy()), k)
    elif enc["lp"] == "float16":
        decoded = lp32.half().float()
        cols["lp"] = pa.FixedSizeListArray.from_arrays(pa.array(lp32.half().reshape(-1).numpy()), k)
    elif enc["lp"] == "bfloat16":   # no parquet bfloat16: its 16 bits as uint16
        bits = lp32.bfloat16().view(torch.int16).numpy().view(np.uint16)
        decoded = lp32.bfloat16().float()
        cols["lp"] = pa.FixedSizeListArray.from_arrays(pa.array(bits.reshape(-1)), k)
    else:   # gap8: top-1 as float32, the others as uint8 steps of 1/16 nat below it (max 255/16)
        top = lp32[:, :1]
        q = ((top - lp32) * 16).round().clamp(0, 255).to(torch.uint8)
        decoded = top - q.float() / 16
        cols["top"] = pa.array(top.reshape(-1).numpy())
        cols["lp"] = pa.FixedSizeListArray.from_arrays(pa.array(q[:, 1:].reshape(-1).numpy()), k - 1)
    if enc["tail"]:
        tail = (1 - lp32.exp().sum(-1)).clamp(min=0)
        cols["tail"] = pa.array(tail.numpy())
    table = pa.table(cols)
    if enc.get("bss"):   # byte-stream-split replaces dictionary encoding on its columns
        chosen = [c for c in cols if enc["bss"] == "all" or pa.types.is_floating(_leaf(cols[c].type))]
        paths = [p for p in _leaf_paths(table) if p.split(".")[0] in chosen]
        pq.write_table(table, path, compression="zstd", use_byte_stream_split=paths,
                       use_dictionary=[p for p in _leaf_paths(table) if p not in paths])
    else:
        pq.write_table(table, path, compression="zstd")
    return path.stat().st_size, decoded


def _leaf(t: Any) -> Any:
    return t.value_type if hasattr(t, "value_type") else t


def _leaf_paths(table: Any) -> list[str]:
    """Parquet leaf column paths ("lp.list.element" for a list column)."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table.slice(0, 1), buf)
    schema = pq.ParquetFile(io.BytesIO(buf.getvalue())).schema
    return [schema.column(i).path for i in range(len(schema))]


# -- fidelity ----------------------------------------------------------------------------------------
def teacher_positions(model_dir: str, rows: list[dict]) -> tuple[Any, Any]:
    """(full teacher log-probs, student logits) at every response position, from one forward pass
    per row over prompt + response (the student: every other teacher layer, as the quickstart's)."""
    import torch

    from llmkd.models.student import derive_student, load_causal_lm

    teacher = load_causal_lm(model_dir).eval()
    student = derive_student(teacher, "every_other").eval()
    t_logp, s_logits = [], []
    for row in rows:
        ids = torch.tensor([row["prompt_token_ids"] + row["response_token_ids"]])
        start, n = len(row["prompt_token_ids"]) - 1, len(row["response_token_ids"])
        with torch.no_grad():
            t_logp.append(teacher(input_ids=ids).logits[0, start:start + n].log_softmax(-1))
            s_logits.append(student(input_ids=ids).logits[0, start:start + n])
    return torch.cat(t_logp), torch.cat(s_logits)


def fidelity(t_logp: Any, s_logits: Any, ids: Any, lps: Any, chunk: int = 512) -> dict[str, float]:
    """kl_bins, loss_err, grad_cos for stored (ids, lps) against the full teacher (see module
    doc), in float64, `chunk` positions at a time (sums over all positions, so chunking is exact)."""
    import torch

    from llmkd.losses import divergence, sparse_divergence

    # the loss reads stored values as float32 (the collator's tensors) and floors the teacher's
    # tail at float32 eps: a top-k that sums to >= 1 after rounding keeps a tiny tail, not none
    eps = torch.finfo(torch.float32).eps
    kl_sum = kl_max = sparse_sum = exact_sum = dense_sum = dot = n_sparse = n_dense = 0.0
    for a in range(0, ids.shape[0], chunk):
        t = t_logp[a:a + chunk].double()
        i, v = ids[a:a + chunk], lps[a:a + chunk].float()
        exact_top = t.gather(-1, i)
        exact_tail = torch.log1p(-exact_top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-15))
        exact_bins = torch.cat([exact_top, exact_tail], -1)
        mass = v.double().exp().sum(-1, keepdim=True)
        stored_tail = torch.log((1 - mass).clamp(min=eps))
        stored_bins = torch.cat([v.double(), stored_tail], -1).log_softmax(-1)   # as the loss normalises
        kl = (exact_bins.exp() * (exact_bins - stored_bins)).sum(-1).clamp(min=0)
        kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))

        logits = s_logits[a:a + chunk].double().requires_grad_()
        dense = divergence(logits, t, "fkl", reduction="sum")   # log-probs are valid logits
        (g_dense,) = torch.autograd.grad(dense, logits)
        sparse = sparse_divergence(logits, i, v, "fkl", reduction="sum")
        (g_sparse,) = torch.autograd.grad(sparse, logits)
        with torch.no_grad():
            exact = sparse_divergence(logits, i, exact_top.float(), "fkl", reduction="sum")
        sparse_sum += float(sparse.detach())
        exact_sum += float(exact)
        dense_sum += float(dense.detach())
        dot += float((g_sparse * g_dense).sum())
        n_sparse += float(g_sparse.square().sum())
        n_dense += float(g_dense.square().sum())
    n = ids.shape[0]
    return {"kl_bins": kl_sum / n, "kl_bins_max": kl_max, "loss_sparse": sparse_sum / n,
            "loss_exact_bins": exact_sum / n, "loss_dense": dense_sum / n,
            "loss_err_vs_exact_bins": abs(sparse_sum - exact_sum) / max(abs(exact_sum), 1e-30),
            "grad_cos_vs_dense": dot / math.sqrt(max(n_sparse * n_dense, 1e-300))}


def compact_entry(out: Path, ids: Any, lps: Any, t_logp: Any, s_logits: Any) -> dict[str, Any]:
    """Bytes of a `cache: compact` dir, and its fidelity: per-position KL between the lossless
    stored top-k + tail and the decoded one (as the loss reads both), and `fidelity` vs the teacher."""
    import torch

    from llmkd.generation.writer import load_generated

    rows = load_generated(out)
    c_ids = torch.tensor([p for r in rows["teacher_topk_ids"] for p in r])
    c_lps = torch.tensor([p for r in rows["teacher_topk_logprobs"] for p in r])
    order = ids.argsort(-1)                    # decoded lists are sorted by token id
    assert torch.equal(ids.gather(-1, order), c_ids)
    eps = torch.finfo(torch.float32).eps

    def bins(v: Any) -> Any:
        v = v.double()
        tail = torch.log((1 - v.exp().sum(-1, keepdim=True)).clamp(min=eps))
        return torch.cat([v, tail], -1).log_softmax(-1)

    exact, comp = bins(lps.float().gather(-1, order)), bins(c_lps)
    kl = (exact.exp() * (exact - comp)).sum(-1).clamp(min=0)
    return {"disk": disk_bytes(out), "kl_vs_stored_mean": float(kl.mean()),
            "kl_vs_stored_max": float(kl.max()), **fidelity(t_logp, s_logits, c_ids, c_lps)}


def truncation_kl(t_logp: Any, k: int) -> dict[str, float]:
    """KL(full teacher || top-k + tail spread evenly over the other V - k ids) and the tail mass."""
    import torch

    vocab = t_logp.shape[-1]
    top, idx = t_logp.topk(k, -1)
    tail = (1 - top.exp().sum(-1)).clamp(min=1e-30)
    approx = torch.log(tail / (vocab - k))[:, None].expand_as(t_logp).clone()
    approx.scatter_(-1, idx, top)
    kl = (t_logp.exp() * (t_logp - approx)).sum(-1)
    return {"kl_trunc": float(kl.mean()), "tail_mass_mean": float(tail.mean()),
            "tail_mass_p95": float(tail.quantile(0.95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--recipe", default="gsm_symbolic")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--offset", type=int, default=10_000, help="first prompt index (held out)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 8 prompts")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--shards", type=Path, default=None,
                        help=f"reuse an `llmkd generate` dir made with topk >= {max(KS)} (same flags)")
    parser.add_argument("--compact-only", action="store_true",
                        help="skip the candidate encodings: the shards and `cache: compact` alone")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output = args.output or (RESULTS.with_name("cache_size_quick.json") if args.quick else RESULTS)

    import pyarrow.parquet as pq
    import torch

    from llmkd.models.embedded import resolve_model_name

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.quick:
            from llmkd.models.tiny import save_tiny_pair

            args.prompts, args.max_new_tokens, args.max_model_len = 8, 24, 512
            model_dir = str(save_tiny_pair(tmp_path / "tiny", pretrain_steps=30)[0])
        else:
            model_dir = resolve_model_name(args.model)
        src = args.shards or generate_shards(model_dir, tmp_path / f"k{max(KS)}", args)
        dirs = {max(KS): src, **{k: write_cut(src, tmp_path / f"k{k}", k) for k in KS if k != max(KS)}}
        rows = [r for s in sorted(src.glob("shard-*.parquet")) for r in pq.read_table(s).to_pylist()]
        t_logp, s_logits = teacher_positions(model_dir, rows)
        vocab = t_logp.shape[-1]
        report: dict[str, Any] = {"model": "tiny (quick)" if args.quick else args.model,
                                  "vocab": vocab, "recipe": args.recipe, "prompts": args.prompts,
                                  "offset": args.offset, "max_new_tokens": args.max_new_tokens,
                                  "distillkit_k50_bytes_per_token": DISTILLKIT_K50_BYTES, "k": {}}
        for k in KS:
            cut = [r for s in sorted(dirs[k].glob("shard-*.parquet")) for r in pq.read_table(s).to_pylist()]
            ids = torch.tensor([p for r in cut for p in r["teacher_topk_ids"]])
            lps = torch.tensor([p for r in cut for p in r["teacher_topk_logprobs"]])
            stored_vs_forward = float((t_logp.gather(-1, ids) - lps).abs().max())
            entry: dict[str, Any] = {"disk": disk_bytes(dirs[k]), **truncation_kl(t_logp, k),
                                     "max_abs_stored_vs_teacher_forward": stored_vs_forward,
                                     "encodings": {}}
            for name, enc in ({} if args.compact_only else encodings(vocab)).items():
                size, decoded = encode_decode(ids, lps, enc, tmp_path / f"enc-{k}.parquet")
                entry["encodings"][name] = {"bytes_per_token": size / ids.shape[0],
                                            **fidelity(t_logp, s_logits, ids, decoded)}
            entry["compact"] = compact_entry(write_cut(src, tmp_path / f"c{k}", k, "compact", vocab),
                                             ids, lps, t_logp, s_logits)
            report["k"][str(k)] = entry
        if not args.compact_only:
            from cache_hidden import hidden_entry   # beside this script

            report["hidden"] = hidden_entry(model_dir, src, tmp_path / "hidden", t_logp)

    tokens = report["k"][str(max(KS))]["disk"]["tokens"]
    print(f"teacher {report['model']} (V={vocab}), {len(rows)} held-out responses, {tokens} tokens "
          f"({args.recipe}, greedy); DistillKit: ~{DISTILLKIT_K50_BYTES} B/token at k=50")
    for k, e in report["k"].items():
        d = e["disk"]
        print(f"\nk={k}: shard {d['bytes_per_token']:.1f} B/token on disk, top-k columns "
              f"{d['topk_bytes_per_token']:.1f} B/token; tail mass mean {e['tail_mass_mean']:.4f} "
              f"(p95 {e['tail_mass_p95']:.4f}); KL(full || top-k + even tail) {e['kl_trunc']:.2e}; "
              f"stored vs teacher forward max |diff| {e['max_abs_stored_vs_teacher_forward']:.1e}")
        print(f"  {'encoding of the top-k columns':44s} {'B/token':>8s} {'kl_bins':>9s} "
              f"{'loss err':>9s} {'grad cos':>9s}")
        for name, r in e["encodings"].items():
            print(f"  {name:44s} {r['bytes_per_token']:8.1f} {r['kl_bins']:9.1e} "
                  f"{r['loss_err_vs_exact_bins']:9.1e} {r['grad_cos_vs_dense']:9.5f}")
        c = e["compact"]
        print(f"  {'cache: compact (on disk, whole shard)':44s} {c['disk']['bytes_per_token']:8.1f} "
              f"{c['kl_bins']:9.1e} {c['loss_err_vs_exact_bins']:9.1e} {c['grad_cos_vs_dense']:9.5f}"
              f"   top-k columns {c['disk']['topk_bytes_per_token']:.1f} B/token; KL(stored || "
              f"compact) mean {c['kl_vs_stored_mean']:.1e} max {c['kl_vs_stored_max']:.1e}")
        base = next(iter(e["encodings"].values()), None)
        if base is not None:
            print(f"  student fKL on the stored top-{k} + tail: {base['loss_sparse']:.4f} nats/token "
                  f"vs {base['loss_dense']:.4f} against the full teacher")
    h = report.get("hidden")
    if h is not None:
        print(f"\ntargets: hidden ({h['hidden_dtype']}, H={h['hidden_size']}): shard "
              f"{h['disk']['bytes_per_token']:.1f} B/token ({h['hidden_bytes_per_token']:.1f} the states) + "
              f"{h['head_file_bytes'] / 2**20:.1f} MiB head once per dir; KL(full teacher || stored) "
              f"mean {h['kl_full_vs_stored_mean']:.1e} max {h['kl_full_vs_stored_max']:.1e}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
