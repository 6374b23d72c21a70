"""Peak memory and time of one forward+backward of the KD loss from hidden states + lm_head.

Variants, each in its own subprocess so that peak RSS belongs to that variant alone:
  naive  full logits of both models, then ``llmkd.losses.divergence``
  llmkd  ``llmkd.losses.chunked_divergence``, ``fused="off"``: the eager element-wise passes
  llmkd_fused  the same, ``fused="on"``: each chunk's element-wise math compiled into one pass
         (its compile falls in the warm-up, reported as ``warmup_s``)
  trl    TRL's ``trl.trainer.distillation_trainer._chunked_divergence_loss``
  liger  Liger-Kernel's ``LigerFusedLinearJSD`` (Triton: GPU only)
  floor  only the matmuls no exact loss can avoid, chunked like llmkd: student and teacher logits
         (N x H x V each) and the two gradient matmuls (d hidden = g W, d W = g^T h), into reused
         buffers; no softmax, no divergence. llmkd's time / this time is its overhead.
Generalized JSD, beta = 0.5, every position unmasked (TRL projects all positions on CPU anyway).
Memory is ru_maxrss of the child on CPU, torch.cuda.max_memory_allocated on a GPU: "peak" is
absolute, "extra" is peak minus a baseline taken after the inputs exist, i.e. what the loss itself
needed. On a GPU the time is the median of `--repeats` runs after a full-size warm-up. It prints,
it never asserts.

    python benchmarks/loss_memory.py            # SmolLM2 sizes (~2 minutes on 2 quiet cores)
    python benchmarks/loss_memory.py --quick    # batch 1, seq 256, vocab 4096, hidden 64: seconds
    python benchmarks/loss_memory.py --device cuda --dtype bfloat16 --output gpu.json   # on a GPU
    python benchmarks/loss_memory.py --variants llmkd llmkd_fused floor   # fused off / on
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import maxrss_mb, run_subprocess

if TYPE_CHECKING:
    import torch

VARIANTS = ("naive", "llmkd", "llmkd_fused", "trl", "liger", "floor")
RESULTS = Path(__file__).resolve().parent / "results" / "loss_memory.json"
BETA = 0.5


def matmul_floor(h_s: "torch.Tensor", w_s: "torch.Tensor", h_t: "torch.Tensor", w_t: "torch.Tensor",
                 chunk_size: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The four (chunk x H x V) matmuls any exact loss from hidden states needs, chunk by chunk:
    both models' logits, then the student's hidden and weight gradients from a (chunk, V) logit
    gradient (the student's logits buffer stands in for it). Returns (grad_hidden, grad_weight)."""
    import torch

    h_s, h_t = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
    n, vocab = h_s.shape[0], w_s.shape[0]
    rows = max(min(chunk_size, n), 1)
    logits_s = h_s.new_empty(rows, vocab)
    logits_t = h_t.new_empty(rows, vocab)
    grad_h = torch.empty_like(h_s)   # every row is written once
    grad_w = None                    # the first chunk's product, then accumulated into
    for start in range(0, n, rows):
        end = min(start + rows, n)
        ls, lt = logits_s[: end - start], logits_t[: end - start]
        torch.mm(h_s[start:end], w_s.t(), out=ls)
        torch.mm(h_t[start:end], w_t.t(), out=lt)
        torch.mm(ls, w_s, out=grad_h[start:end])
        if grad_w is None:
            grad_w = torch.mm(ls.t(), h_s[start:end])
        else:
            grad_w.addmm_(ls.t(), h_s[start:end])
    return grad_h, grad_w


def run_child(args: argparse.Namespace) -> dict:
    """Build inputs, record the baseline, run one forward+backward, report as a dict."""
    import torch

    torch.manual_seed(0)
    b, s, v, h = args.batch, args.seq, args.vocab, args.hidden
    h_teacher = args.teacher_hidden or h
    like = {"device": args.device, "dtype": getattr(torch, args.dtype)}
    h_s = torch.randn(b, s, h, **like, requires_grad=True)
    h_t = torch.randn(b, s, h_teacher, **like)
    w_s = (0.05 * torch.randn(v, h, **like)).requires_grad_()
    w_t = 0.05 * torch.randn(v, h_teacher, **like)
    mask = torch.ones(b, s, dtype=torch.long, device=args.device)
    cuda = args.device.startswith("cuda")

    if args.child == "naive":
        from llmkd.losses import divergence

        def loss_fn(h_s, w_s, h_t, w_t, mask):  # noqa: ANN001, ANN202 - tensors
            with torch.no_grad():
                teacher_logits = h_t @ w_t.T
            return divergence(h_s @ w_s.T, teacher_logits, "jsd", beta=BETA, mask=mask.bool())

    elif args.child in ("llmkd", "llmkd_fused"):
        from llmkd.losses import chunked_divergence

        fused = "on" if args.child == "llmkd_fused" else "off"

        def loss_fn(h_s, w_s, h_t, w_t, mask):  # noqa: ANN001, ANN202
            return chunked_divergence(
                h_s, w_s, h_t, w_t, "jsd", beta=BETA, mask=mask, chunk_size=args.chunk_size, fused=fused
            )

    elif args.child == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=BETA, temperature=1.0)

        def loss_fn(h_s, w_s, h_t, w_t, mask):  # noqa: ANN001, ANN202
            return liger(h_s.reshape(-1, h_s.shape[-1]), w_s, h_t.reshape(-1, h_t.shape[-1]), w_t)

    elif args.child == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def loss_fn(h_s, w_s, h_t, w_t, mask):  # noqa: ANN001, ANN202
            return _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, BETA)[0]

    else:
        def loss_fn(h_s, w_s, h_t, w_t, mask):  # noqa: ANN001, ANN202
            matmul_floor(h_s.detach(), w_s.detach(), h_t, w_t, args.chunk_size)

    def run(h_s, w_s, h_t, w_t, mask):  # noqa: ANN001, ANN202
        loss = loss_fn(h_s, w_s, h_t, w_t, mask)
        if loss is not None:
            loss.backward()
        return loss

    # Warm-up on a sliver of the inputs: first-call costs (kernel selection, thread pools, lazy
    # imports) must not count as the loss's time; the tensors are too small to move the baseline.
    # The compiled loss warms up at the full vocabulary (its graph is dynamic in rows only), with
    # no weight gradient, which would raise the baseline by a (V, H) buffer.
    start = time.perf_counter()
    if args.child == "llmkd_fused":
        run(h_s[:1, :8].detach().requires_grad_(), w_s.detach(), h_t[:1, :8], w_t, mask[:1, :8])
    else:
        run(h_s[:1, :8].detach().requires_grad_(), w_s[:256].detach().requires_grad_(),
            h_t[:1, :8], w_t[:256], mask[:1, :8])
    warmup = time.perf_counter() - start
    if cuda:   # a GPU picks kernels per shape: warm up at full size, then time several runs
        run(h_s, w_s, h_t, w_t, mask)
        h_s.grad = w_s.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = maxrss_mb()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(args.repeats if cuda else 1):
        h_s.grad = w_s.grad = None
        start = time.perf_counter()
        loss = run(h_s, w_s, h_t, w_t, mask)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else maxrss_mb()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "variant": args.child,
        "loss": None if loss is None else float(loss),
        "grad_hidden_norm": None if loss is None else float(h_s.grad.norm()),
        "grad_weight_norm": None if loss is None else float(w_s.grad.norm()),
        "time_s": seconds,
        "warmup_s": warmup,
        # CPU seconds (user, system): wall time alone misleads when other jobs share the cores.
        "cpu_user_s": after.ru_utime - usage.ru_utime,
        "cpu_sys_s": after.ru_stime - usage.ru_stime,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "extra_rss_mb": peak - baseline,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--teacher-hidden", type=int, default=None, help="default: --hidden")
    parser.add_argument("--chunk-size", type=int, default=1024, help="llmkd token chunk")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="default: all (liger only on a GPU: its kernels are Triton)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (memory: GPU allocator peak)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs on a GPU (median)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 1, seq 256, vocab 4096, hidden 64 (overrides sizes)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args)))
        return
    if args.variants is None:
        args.variants = [v for v in VARIANTS if v != "liger" or args.device.startswith("cuda")]
    if args.quick:
        args.batch, args.seq, args.vocab, args.hidden = 1, 256, 4096, 64
        if args.output == RESULTS:
            args.output = RESULTS.with_name("loss_memory_quick.json")

    sizes = ["--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab)]
    sizes += ["--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size)]
    sizes += ["--teacher-hidden", str(args.teacher_hidden or args.hidden)]
    sizes += ["--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats)]
    rows = []
    for variant in args.variants:
        row = run_subprocess(["--child", variant, *sizes], script=__file__)
        if row is not None:
            rows.append(row)

    naive = next((r for r in rows if r["variant"] == "naive"), None)
    floor = next((r for r in rows if r["variant"] == "floor"), None)
    for r in rows:
        if floor is not None:
            r["time_vs_floor"] = r["time_s"] / floor["time_s"]
            r["cpu_vs_floor"] = (r["cpu_user_s"] + r["cpu_sys_s"]) / max(
                floor["cpu_user_s"] + floor["cpu_sys_s"], 1e-9)
        if naive is not None:
            r["extra_rss_vs_naive"] = r["extra_rss_mb"] / max(naive["extra_rss_mb"], 1e-9)
            r["peak_rss_vs_naive"] = r["peak_rss_mb"] / naive["peak_rss_mb"]
            r["time_vs_naive"] = r["time_s"] / naive["time_s"]

    print(
        f"B={args.batch} S={args.seq} V={args.vocab} H={args.hidden}  jsd beta={BETA}  "
        f"llmkd chunk_size={args.chunk_size}  {args.device} {args.dtype}"
    )
    header = f"{'variant':11s} {'loss':>10s} {'time s':>8s} {'cpu usr+sys s':>14s}"
    header += f" {'peak MB':>9s} {'extra MB':>9s}"
    header += f" {'extra/naive':>11s} {'peak/naive':>10s} {'time/naive':>10s} {'time/floor':>10s}"
    print(header)
    for r in rows:
        cpu = f"{r['cpu_user_s']:.1f}+{r['cpu_sys_s']:.1f}"
        loss = "-" if r["loss"] is None else f"{r['loss']:.6f}"
        line = f"{r['variant']:11s} {loss:>10s} {r['time_s']:8.2f} {cpu:>14s}"
        line += f" {r['peak_rss_mb']:9.0f} {r['extra_rss_mb']:9.0f}"
        if naive is not None:
            line += f" {r['extra_rss_vs_naive']:11.3f} {r['peak_rss_vs_naive']:10.3f}"
            line += f" {r['time_vs_naive']:10.3f}"
        if floor is not None:
            line += f" {r['time_vs_floor']:10.2f}"
        print(line)
    if floor is not None:
        print("floor = the 4 unavoidable (chunk x H x V) matmuls; target: llmkd time/floor <= 1.3")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in ("batch", "seq", "vocab", "hidden", "teacher_hidden", "chunk_size",
                                            "device", "dtype")}
    memory = "GPU allocator peak (MB)" if args.device.startswith("cuda") else "ru_maxrss (MB)"
    report = {"config": {**config, "beta": BETA}, "memory": memory, "cpu_count": os.cpu_count(),
              "load_avg_1min_at_end": round(os.getloadavg()[0], 2), "results": rows}
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
