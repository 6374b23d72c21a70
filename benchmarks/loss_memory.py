"""Peak memory and time of one forward+backward of the KD loss from hidden states + lm_head.

Variants, each in its own subprocess so that peak RSS belongs to that variant alone:
  naive  full logits of both models, then ``llmkd.losses.divergence``
  llmkd  ``llmkd.losses.chunked_divergence``
  trl    TRL's ``trl.trainer.distillation_trainer._chunked_divergence_loss``
Generalized JSD, beta = 0.5, every position unmasked (TRL projects all positions on CPU anyway).
Memory is ru_maxrss of the child: "peak" is absolute, "extra" is peak minus a baseline taken
after the inputs exist, i.e. what the loss itself needed. It prints, it never asserts.

    python benchmarks/loss_memory.py                       # SmolLM2 sizes (minutes on 2 cores)
    python benchmarks/loss_memory.py --batch 1 --seq 256 --vocab 4096 --hidden 64   # smoke run
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("naive", "llmkd", "trl")
RESULTS = Path(__file__).resolve().parent / "results" / "loss_memory.json"
BETA = 0.5


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_child(args: argparse.Namespace) -> dict:
    """Build inputs, record the baseline, run one forward+backward, report as a dict."""
    import torch

    torch.manual_seed(0)
    b, s, v, h = args.batch, args.seq, args.vocab, args.hidden
    h_s = torch.randn(b, s, h, requires_grad=True)
    h_t = torch.randn(b, s, h)
    w_s = (0.05 * torch.randn(v, h)).requires_grad_()
    w_t = 0.05 * torch.randn(v, h)
    mask = torch.ones(b, s, dtype=torch.long)

    if args.child == "naive":
        from llmkd.losses import divergence

        def loss_fn() -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = h_t @ w_t.T
            return divergence(h_s @ w_s.T, teacher_logits, "jsd", beta=BETA, mask=mask.bool())

    elif args.child == "llmkd":
        from llmkd.losses import chunked_divergence

        def loss_fn() -> torch.Tensor:
            return chunked_divergence(
                h_s, w_s, h_t, w_t, "jsd", beta=BETA, mask=mask, chunk_size=args.chunk_size
            )

    else:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def loss_fn() -> torch.Tensor:
            return _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, BETA)[0]

    baseline = _maxrss_mb()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _maxrss_mb()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "variant": args.child,
        "loss": float(loss),
        "grad_hidden_norm": float(h_s.grad.norm()),
        "grad_weight_norm": float(w_s.grad.norm()),
        "time_s": seconds,
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
    parser.add_argument("--chunk-size", type=int, default=1024, help="llmkd token chunk")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args)))
        return

    sizes = ["--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab)]
    sizes += ["--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size)]
    rows = []
    for variant in args.variants:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", variant, *sizes], capture_output=True, text=True
        )
        if proc.returncode != 0:
            print(f"{variant}: failed\n{proc.stderr[-2000:]}")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    naive = next((r for r in rows if r["variant"] == "naive"), None)
    for r in rows:
        if naive is not None:
            r["extra_rss_vs_naive"] = r["extra_rss_mb"] / max(naive["extra_rss_mb"], 1e-9)
            r["peak_rss_vs_naive"] = r["peak_rss_mb"] / naive["peak_rss_mb"]
            r["time_vs_naive"] = r["time_s"] / naive["time_s"]

    print(
        f"B={args.batch} S={args.seq} V={args.vocab} H={args.hidden}  jsd beta={BETA}  "
        f"llmkd chunk_size={args.chunk_size}"
    )
    header = f"{'variant':8s} {'loss':>10s} {'time s':>8s} {'cpu usr+sys s':>14s}"
    header += f" {'peak MB':>9s} {'extra MB':>9s}"
    header += f" {'extra/naive':>11s} {'peak/naive':>10s} {'time/naive':>10s}"
    print(header)
    for r in rows:
        cpu = f"{r['cpu_user_s']:.1f}+{r['cpu_sys_s']:.1f}"
        line = f"{r['variant']:8s} {r['loss']:10.6f} {r['time_s']:8.2f} {cpu:>14s}"
        line += f" {r['peak_rss_mb']:9.0f} {r['extra_rss_mb']:9.0f}"
        if naive is not None:
            line += f" {r['extra_rss_vs_naive']:11.3f} {r['peak_rss_vs_naive']:10.3f}"
            line += f" {r['time_vs_naive']:10.3f}"
        print(line)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in ("batch", "seq", "vocab", "hidden", "chunk_size")}
    report = {"config": {**config, "beta": BETA}, "results": rows}
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
