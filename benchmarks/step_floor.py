"""llmkd's off-policy KD step against a hand-written floor on the same batches, and where the time goes.

Variants (each in its own subprocess):
  llmkd          `llmkd.training.trainer.DistillationTrainer`, token_kd with the quickstart's method (fkl,
                 chunked loss), batches in dataset order
  floor          the same batches in a plain loop: teacher forward (no grad) and student forward to
                 the final hidden states, the lm_head applied on response positions only (both
                 models), the divergence in plain torch, backward, AdamW step (the Trainer's default
                 fused AdamW, same lr), zero_grad. No grad clipping, no Trainer.
  llmkd_grouped  as llmkd, rows in the order `train_sampling_strategy: group_by_length` gives
  floor_grouped  (transformers' get_length_grouped_indices; megabatches of 64 rows, what the
                 quickstart's 256 rows at batch 8 get): less padding, same batches for both
Both rows of a pair see one epoch of the same batches; llmkd / floor is the mean step time ratio
(target <= 1.10). The llmkd child also times its phases (teacher forward, student forward, loss,
backward, clipping, optimizer, collation) by wrapping the trainer's calls from outside, so the
table shows where llmkd spends what the floor does not. `--profile` adds torch.profiler's top ops.

    python benchmarks/step_floor.py           # short (quickstart rows) + long regimes (~5 min, 2 quiet cores)
    python benchmarks/step_floor.py --quick   # tiny random models, smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from common import cpu_seconds, peak_rss, reset_peak_rss, run_subprocess, step_stats
from step_vs_trl import (  # shared data and model setup of the step benchmarks
    QUICK_REGIMES, REGIMES, Regime, load_pair, resolve_model, token_rows, write_regime_data)

RESULTS = Path(__file__).resolve().parent / "results" / "step_floor.json"
VARIANTS = ("llmkd", "floor", "llmkd_grouped", "floor_grouped")
GROUP_MEGABATCH_ROWS = 64   # transformers: min(rows // (4 batch), 50) batches; 256 rows, batch 8 -> 8
PHASES = ("collate", "teacher_fwd", "student_fwd", "loss", "backward", "clip", "optimizer")
BETA = 0.5


# -- the floor ------------------------------------------------------------------------------------
def plain_divergence(s_logits: Any, t_logits: Any, kind: str) -> Any:
    """Mean per-token divergence of two (N, V) logit matrices, written out in plain torch."""
    import torch.nn.functional as F

    s, t = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
    if kind == "fkl":
        return (t.exp() * (t - s)).sum(-1).mean()
    if kind == "jsd":   # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
        p, q = t.exp(), s.exp()
        log_m = (BETA * p + (1 - BETA) * q).log()
        return (BETA * (p * (t - log_m)).sum(-1) + (1 - BETA) * (q * (s - log_m)).sum(-1)).mean()
    raise ValueError(f"floor: kind={kind!r} is not written out here; use fkl or jsd")


def floor_loop(teacher: Any, student: Any, batches: list[dict], kind: str, lr: float,
               on_step: Callable[[dict[str, float]], None]) -> list[float]:
    """One optimizer step per batch; returns each step's loss and reports each step's phases."""
    import torch

    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, fused=True)
    w_s = student.get_output_embeddings().weight
    w_t = teacher.get_output_embeddings().weight
    teacher.eval()
    student.train()
    losses = []
    for batch in batches:
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        ids, att = batch["input_ids"], batch["attention_mask"]
        keep = batch["labels"][:, 1:] != -100
        with torch.no_grad():
            h_t = teacher.base_model(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
        t1 = time.perf_counter()
        h_s = student.base_model(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
        t2 = time.perf_counter()
        loss = plain_divergence(h_s[:, :-1][keep] @ w_s.T, h_t[:, :-1][keep] @ w_t.T, kind)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        phases.update(teacher_fwd=t1 - t0, student_fwd=t2 - t1, loss=t3 - t2, backward=t4 - t3,
                      optimizer=t5 - t4)
        losses.append(float(loss.detach()))
        on_step(phases)
    return losses


def batches_for(rows: list[dict], batch: int, pad: int) -> list[dict]:
    """The padded batches of one epoch in row order, as llmkd's collator pads them."""
    from llmkd.data.collate import DistillCollator

    feats = token_rows(rows)
    collate = DistillCollator(pad)
    return [collate(feats[k:k + batch]) for k in range(0, len(feats), batch)]


def length_grouped(rows: list[dict], batch: int, megabatch_rows: int = GROUP_MEGABATCH_ROWS,
                   seed: int = 0) -> list[dict]:
    """Rows in the order the Trainer's group_by_length sampler yields (one seeded draw)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows]
    order = get_length_grouped_indices(lengths, batch, mega_batch_mult=max(megabatch_rows // batch, 1),
                                       generator=torch.Generator().manual_seed(seed))
    return [rows[i] for i in order]


# -- llmkd, with phase timers wrapped around its calls ----------------------------------------------
class PhaseTimer:
    """Accumulates wall time per phase for the current step (wrappers installed from outside)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - t0

        setattr(owner, name, timed)

    def end_step(self) -> None:
        self.steps.append(dict(self.current))
        self.current = defaultdict(float)


def build_llmkd(model_dir: str, rows: list[dict], regime: Regime, steps: int, kind: str,
                out_dir: str) -> Any:
    from datasets import Dataset

    from llmkd.training.config import config_from_dict
    from llmkd.training.trainer import DistillationTrainer

    teacher, student, tok = load_pair(model_dir)
    cfg = config_from_dict({
        "output_dir": out_dir, "overwrite_output_dir": True, "model": {"teacher": model_dir},
        "data": {"recipe": regime.recipe, "max_length": 4096},
        "method": {"name": "token_kd", "kind": kind, "beta": BETA, "chunk_size": 1024},
        "per_device_train_batch_size": regime.batch, "max_steps": steps, "learning_rate": 1e-5,
        "lr_scheduler_type": "constant", "logging_steps": steps, "save_strategy": "no",
        "use_cpu": True, "seed": 0, "disable_tqdm": True, "train_sampling_strategy": "sequential"})
    return DistillationTrainer(model=student, teacher=teacher, args=cfg, processing_class=tok,
                               train_dataset=Dataset.from_list(token_rows(rows)))


def run_child(args: argparse.Namespace) -> dict:
    import torch
    from transformers import TrainerCallback

    data = json.loads(Path(args.data).read_text())
    regime = Regime(**data["regime"])
    rows = data["rows"]
    if args.child.endswith("_grouped"):
        rows = length_grouped(rows, regime.batch)
    steps = -(-len(rows) // regime.batch)   # one epoch
    timer = PhaseTimer()
    tokens: list[tuple[int, int]] = []
    profile_table = None
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        if args.child.startswith("floor"):
            teacher, student, tok = load_pair(data["model_dir"])
            batches = batches_for(rows, regime.batch, tok.pad_token_id)
            for b in batches:
                tokens.append((int(b["attention_mask"].sum()), b["input_ids"].numel()))
            setup_s = time.perf_counter() - t_setup
            baseline = reset_peak_rss()
            marks = [time.perf_counter()]
            cpu_marks = [cpu_seconds()]

            def on_step(phases: dict[str, float]) -> None:
                marks.append(time.perf_counter())
                cpu_marks.append(cpu_seconds())
                timer.steps.append(phases)

            losses = floor_loop(teacher, student, batches, args.kind, 1e-5, on_step)
        else:
            import llmkd.training.trainer as trainer_module

            trainer = build_llmkd(data["model_dir"], rows, regime, steps, args.kind, out_dir)
            losses = []
            timer.wrap(trainer, "data_collator", "collate")
            timer.wrap(trainer.method, "teacher_targets", "teacher_fwd")
            timer.wrap(trainer_module, "forward_head", "student_fwd")
            timer.wrap(trainer.method, "loss", "loss")
            timer.wrap(trainer.accelerator, "backward", "backward")
            timer.wrap(trainer.accelerator, "clip_grad_norm_", "clip")
            original_loss = trainer.method.loss

            def record_loss(*a: Any, **k: Any) -> Any:
                out = original_loss(*a, **k)
                if len(losses) < len(timer.steps) + 1:
                    losses.append(float(out[0].detach()))
                return out

            trainer.method.loss = record_loss
            marks, cpu_marks = [], []
            profiler: list[Any] = []

            class Hooks(TrainerCallback):
                def on_train_begin(self, *a: Any, **k: Any) -> None:
                    timer.wrap(trainer.optimizer, "step", "optimizer")
                    marks.append(time.perf_counter())
                    cpu_marks.append(cpu_seconds())

                def on_step_begin(self, a: Any, state: Any, c: Any, **k: Any) -> None:
                    if args.profile and state.global_step == 1:
                        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                        prof.__enter__()
                        profiler.append(prof)

                def on_step_end(self, a: Any, state: Any, c: Any, **k: Any) -> None:
                    marks.append(time.perf_counter())
                    cpu_marks.append(cpu_seconds())
                    timer.end_step()
                    if profiler and state.global_step == 3:
                        profiler[0].__exit__(None, None, None)

            trainer.add_callback(Hooks())
            collate = trainer.data_collator

            def counting_collate(batch_rows: list[dict]) -> dict:
                out = collate(batch_rows)
                tokens.append((int(out["attention_mask"].sum()), out["input_ids"].numel()))
                return out

            trainer.data_collator = counting_collate
            setup_s = time.perf_counter() - t_setup
            baseline = reset_peak_rss()
            trainer.train()
            if profiler:
                profile_table = profiler[0].key_averages().table(sort_by="self_cpu_time_total",
                                                                 row_limit=20)
        peak = peak_rss()
    wall_steps = [b - a for a, b in zip(marks, marks[1:])]
    cpu_steps = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]
    phases = {p: statistics.mean(s.get(p, 0.0) for s in timer.steps) for p in PHASES}
    phases["other"] = statistics.mean(wall_steps) - sum(phases.values())
    return {
        "variant": args.child, "regime": regime.name, "kind": args.kind, "steps": len(wall_steps),
        "setup_s": round(setup_s, 2), **step_stats(wall_steps, cpu_steps),
        "mean_cpu_step_s": statistics.mean(cpu_steps), "phases_mean_s": phases,
        "loss": losses, "real_tokens": [t[0] for t in tokens[:len(wall_steps)]],
        "padded_tokens": [t[1] for t in tokens[:len(wall_steps)]],
        "baseline_rss_mb": baseline, "peak_rss_mb": peak, "extra_rss_mb": peak - baseline,
        "threads": torch.get_num_threads(), "profile": profile_table,
    }


# -- parent ----------------------------------------------------------------------------------------
def print_report(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    ratios: dict[str, dict] = {}
    print(f"{'regime':6s} {'variant':14s} {'mean s/step':>11s} {'CPU s/step':>10s} {'real tok':>8s} "
          f"{'padded tok':>10s} {'extra MB':>8s} {'loss@1':>10s}")
    for regime, by_variant in results.items():
        for variant in VARIANTS:
            r = by_variant.get(variant)
            if r is None:
                continue
            print(f"{regime:6s} {variant:14s} {r['mean_step_s']:11.2f} {r['mean_cpu_step_s']:10.2f} "
                  f"{statistics.mean(r['real_tokens']):8.0f} {statistics.mean(r['padded_tokens']):10.0f} "
                  f"{r['extra_rss_mb']:8.0f} {r['loss'][0]:10.6f}")
        for ours, floor in (("llmkd", "floor"), ("llmkd_grouped", "floor_grouped")):
            a, b = by_variant.get(ours), by_variant.get(floor)
            if a and b:
                ratios[f"{regime}/{ours}"] = {
                    "time_vs_floor": a["mean_step_s"] / b["mean_step_s"],
                    "cpu_vs_floor": a["mean_cpu_step_s"] / b["mean_cpu_step_s"],
                    "loss_step1_abs_diff": abs(a["loss"][0] - b["loss"][0])}
        seq, grp = by_variant.get("llmkd"), by_variant.get("llmkd_grouped")
        if seq and grp:
            ratios[f"{regime}/grouped_vs_sequential"] = {
                "time": grp["mean_step_s"] / seq["mean_step_s"],
                "cpu": grp["mean_cpu_step_s"] / seq["mean_cpu_step_s"],
                "padded_tokens": statistics.mean(grp["padded_tokens"]) / statistics.mean(seq["padded_tokens"])}
    print(f"\n{'ratio':34s} {'wall':>6s} {'CPU':>6s}")
    for name, r in ratios.items():
        if "time_vs_floor" in r:
            print(f"{name + ' / floor':34s} {r['time_vs_floor']:5.2f}x {r['cpu_vs_floor']:5.2f}x   "
                  f"|loss@1 diff| {r['loss_step1_abs_diff']:.1e}")
        else:
            print(f"{name:34s} {r['time']:5.2f}x {r['cpu']:5.2f}x   padded tokens {r['padded_tokens']:.2f}x")
    print("target: llmkd / floor <= 1.10\n\nmean seconds per step by phase:")
    print(f"{'regime':6s} {'variant':14s} " + " ".join(f"{p:>11s}" for p in (*PHASES, "other")))
    for regime, by_variant in results.items():
        for variant in VARIANTS:
            r = by_variant.get(variant)
            if r is not None:
                print(f"{regime:6s} {variant:14s} "
                      + " ".join(f"{r['phases_mean_s'][p]:11.3f}" for p in (*PHASES, "other")))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="teacher dir (default: embedded)")
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=None,
                        help="default: short long (--quick: short)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--kind", choices=("fkl", "jsd"), default="fkl",
                        help="divergence (the quickstart trains fkl)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler top ops of llmkd steps 2-3")
    parser.add_argument("--quick", action="store_true", help="tiny random models, smoke run")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args)))
        return
    regimes = QUICK_REGIMES if args.quick else REGIMES
    names = args.regimes or (["short"] if args.quick else list(REGIMES))
    output = args.output or (RESULTS.with_name("step_floor_quick.json") if args.quick else RESULTS)
    load_start = os.getloadavg()[0]
    results: dict[str, dict[str, dict]] = {}
    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = resolve_model(args.model, args.quick, Path(tmp))
        for name in names:
            data = Path(tmp) / f"{name}.json"
            info[name] = write_regime_data(model_dir, regimes[name], data, cache=not args.quick)
            results[name] = {}
            for variant in args.variants:
                if variant.endswith("_grouped") and regimes[name].response_tokens is not None:
                    continue   # fixed-length responses: grouping has little padding to remove
                flags = ["--profile"] if args.profile and variant == "llmkd" else []
                r = run_subprocess(["--child", variant, "--data", str(data), "--kind", args.kind,
                                    *flags], script=__file__)
                if r is not None:
                    results[name][variant] = r
                    print(f"  {variant:14s} {r['mean_step_s']:.2f} s/step ({r['steps']} steps)", flush=True)
                    if r.get("profile"):
                        print(r["profile"])
    print()
    ratios = print_report(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "model": "tiny (quick)" if args.quick else args.model, "kind": args.kind,
        "cpu_count": os.cpu_count(), "load_avg_1min_at_start": round(load_start, 2),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2), "regimes": info,
        "results": results, "ratios": ratios}, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
