"""Distillation methods side by side on the embedded teacher: SFT, token KD divergences, TAID, DistillSpec.

    OMP_NUM_THREADS=2 python benchmarks/methods.py [--steps 30] [--student-layers 8] [--work DIR]
        [--rows fkl,taid,...] [--merge] [--tiny]

1. The teacher (SmolLM2-135M-Instruct) answers `--train-prompts` + `--eval-prompts` arithmetic
   prompts greedily with vLLM (in a child process: vLLM's CPU worker pins this process's threads).
2. Every row trains a student derived from the teacher (`--student-layers` of its 30 layers, the
   same initial weights) with the same prompts, steps, batch, learning rate and seed:
     SFT        cross-entropy on the teacher's responses only (sequence-level KD)
     fkl/rkl/jsd/tvd/skew_fkl   token KD on the teacher's responses, live teacher
     TAID       paper defaults, the linear floor over the run's steps
     DistillSpec  on-policy student samples, TVD
   and rows that continue from the forward-KL student for `--steps` more steps: DistillSpec
   from a draft that already models language (the paper's setting: pretrained drafts), with all
   and with half of its batches sampled by the draft, and, as their control, forward KL again.
3. Each student, and the undistilled one, is measured on held-out prompts (never trained on):
   KL(teacher || student), top-1 agreement and α = E[Σ min(p, q)] on the teacher's held-out
   responses; measured greedy speculative decoding with the student as the draft (transformers
   assisted generation, γ = `--gamma`): tokens per target call and wall-clock against the teacher
   alone; accuracy with a 95 % Wilson interval (greedy, transformers); seconds per training step.
Writes WORK/methods.json, WORK/methods.md and per-row metrics.json under WORK/eval/ (readable by
`llmkd report WORK`); prints the table. Never asserts. `--tiny` runs the same code on tiny local
models in about a minute (a smoke test; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import platform
import time
from pathlib import Path
from typing import Any

from common import in_child, run_config

import torch
import torch.nn.functional as F

from llmkd import methods
from llmkd.losses.divergences import reduce
from llmkd.methods.base import HeadOutput, Method, MethodParams, TeacherTargets, as_mean

RECIPE = "arithmetic"
ROWS: dict[str, dict[str, Any]] = {
    "sft": {"name": "sft"},
    "fkl": {"name": "token_kd", "kind": "fkl"},
    "rkl": {"name": "token_kd", "kind": "rkl"},
    "jsd": {"name": "token_kd", "kind": "jsd", "beta": 0.5},
    "tvd": {"name": "token_kd", "kind": "tvd"},
    "skew_fkl": {"name": "token_kd", "kind": "skew_fkl", "lam": 0.1},
    "taid": {"name": "taid"},
    "distillspec": {"name": "distillspec"},
    # DistillSpec's own setting: a draft that already models language (the paper starts from
    # pretrained drafts); the control spends the same extra steps on forward KL
    "fkl_then_fkl": {"name": "token_kd", "kind": "fkl", "from": "fkl"},
    "fkl_then_distillspec": {"name": "distillspec", "from": "fkl"},
    "fkl_then_distillspec_mix": {"name": "distillspec", "lmbda": 0.5, "from": "fkl"},
    # controls for DistillSpec's collapse: the same on-policy loop under GKD's divergences, and
    # the draft sampling at a lower temperature
    "fkl_then_onpolicy_fkl": {"name": "token_kd", "kind": "fkl", "lmbda": 1.0, "from": "fkl"},
    "fkl_then_onpolicy_jsd": {"name": "token_kd", "kind": "jsd", "beta": 0.5, "lmbda": 1.0, "from": "fkl"},
    "fkl_then_distillspec_t05": {"name": "distillspec", "gen_temperature": 0.5, "from": "fkl"},
}
LABELS = {"sft": "SFT on teacher responses (CE)", "fkl": "forward KL", "rkl": "reverse KL",
          "jsd": "JSD(0.5)", "tvd": "TVD", "skew_fkl": "skew KL (λ 0.1)", "taid": "TAID",
          "distillspec": "DistillSpec (on-policy TVD)", "before": "undistilled draft (student before)",
          "fkl_then_fkl": "forward KL, then forward KL again", "fkl_then_distillspec":
          "forward KL, then DistillSpec", "fkl_then_distillspec_mix":
          "forward KL, then DistillSpec λ 0.5 (half teacher responses)",
          "fkl_then_onpolicy_fkl": "forward KL, then on-policy forward KL (GKD)",
          "fkl_then_onpolicy_jsd": "forward KL, then on-policy JSD(0.5) (GKD)",
          "fkl_then_distillspec_t05": "forward KL, then DistillSpec sampling at T 0.5",
          "teacher": "teacher"}


class SFTParams(MethodParams):
    def unsupported_teachers(self) -> dict[str, str]:
        return {}       # reads no teacher at all


class SFT(Method):
    """Cross-entropy on the batch's (teacher) responses: the baseline that uses no teacher logits."""

    name = "sft"
    Params = SFTParams

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> TeacherTargets:
        return TeacherTargets()

    def loss(self, student: HeadOutput, targets: TeacherTargets, batch: dict[str, torch.Tensor],
             num_items: torch.Tensor | int | None) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(student.logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                             ignore_index=-100, reduction="none")
        mask = labels != -100
        ce = reduce(ce, None, "mean", num_items if num_items is not None else mask.sum())
        return ce, {"ce": as_mean(ce, num_items, mask)}


def generate(out: Path, teacher: str, backend: str, num_prompts: int, max_new_tokens: int) -> str:
    from llmkd.generation.run import GenerationConfig, run_generation

    cfg = GenerationConfig(model=teacher, backend=backend, recipe=RECIPE, num_prompts=num_prompts,
                           offset=0, mode="response", temperature=0.0, max_new_tokens=max_new_tokens,
                           topk=0, keep_incorrect=True, max_model_len=512, output_dir=str(out))
    run_generation(cfg, progress=False)
    return str(out)


def config(args: argparse.Namespace, teacher: str, data: str, out: Path, method: dict[str, Any],
           start: Path | None = None) -> Any:
    """The row's run; `start`: a trained student to continue from (else the teacher's layers)."""
    student = {"student": str(start)} if start else {"student_layers": args.student_layers}
    return run_config(out, steps=args.steps, lr=args.lr, batch=args.batch_size,
                      model={"teacher": teacher, **student},
                      data={"path": data, "num_train": args.train_prompts, "num_eval": args.eval_prompts,
                            "max_length": 256, "allow_fewer": True},
                      method=method)


def measure(label: str, student: torch.nn.Module, trainer: Any, target: torch.nn.Module,
            prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Closeness on the held-out teacher responses and measured speculative decoding."""
    from llmkd.eval.closeness import teacher_closeness
    from llmkd.eval.speculative import block_efficiency, measure_speculative

    close = teacher_closeness(student, trainer.teacher, trainer.eval_dataset, trainer.data_collator)
    tok = trainer.processing_class
    spec = measure_speculative(target, student, prompts, gamma=args.gamma,
                               max_new_tokens=args.spec_tokens, eos_ids=[tok.eos_token_id],
                               pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    keep = ("tokens_per_target_call", "measured_acceptance", "identical_outputs", "prompts",
            "target_calls", "new_tokens", "target_s", "speculative_s", "speedup")
    return {"label": label, "kl_to_teacher": close["kl"], "top1_agreement": close["top1_agreement"],
            "acceptance_rate": close["acceptance"], "closeness_tokens": close["tokens"],
            "block_efficiency": block_efficiency(close["acceptance"], args.gamma),
            **{k: spec[k] for k in keep}}


def accuracy(model_dir: str, out: Path, label: str, args: argparse.Namespace) -> dict[str, Any]:
    from llmkd.eval.reasoning import evaluate_reasoning

    m = evaluate_reasoning(model_dir, RECIPE, backend="hf", num_examples=args.eval_prompts,
                           offset=args.train_prompts, max_new_tokens=args.max_new_tokens,
                           batch_size=16, output_dir=out, label=label, overwrite=True, progress=False)
    return {k: m[k] for k in ("accuracy", "ci_low", "ci_high", "n", "num_correct")}


def fmt(row: dict[str, Any]) -> str:
    acc = (f"{100 * row['accuracy']:.1f} % [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
           if row.get("accuracy") is not None else "—")
    sps = f"{row['s_per_step']:.2f}" if row.get("s_per_step") is not None else "—"
    speed = f"{row['speedup']:.2f}x" if row.get("speedup") is not None else "—"
    return (f"| {LABELS[row['row']]} | {row['kl_to_teacher']:.3f} | {row['top1_agreement']:.3f} | "
            f"{row['acceptance_rate']:.3f} | {row['tokens_per_target_call']:.2f} | {speed} | {acc} | {sps} |")


def table(rows: list[dict[str, Any]], gamma: int) -> str:
    head = ("| Student | KL(teacher ‖ student) | top-1 agreement | α | tokens per target call "
            f"(γ = {gamma}) | speculative speed-up | accuracy (95 % CI) | s/step |")
    return "\n".join([head, "|" + "---|" * 8, *map(fmt, rows)]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-methods")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--student-layers", type=int, default=8, help="teacher layers the student keeps")
    ap.add_argument("--train-prompts", type=int, default=256)
    ap.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts: KL, accuracy")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="teacher responses and accuracy")
    ap.add_argument("--onpolicy-tokens", type=int, default=32, help="DistillSpec's sample length")
    ap.add_argument("--spec-prompts", type=int, default=8, help="held-out prompts decoded speculatively")
    ap.add_argument("--spec-tokens", type=int, default=32)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="tiny local models: a smoke test of this script")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in WORK/methods.json (and its undistilled row); "
                         "re-measure or add only --rows")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    methods.register("sft", f"{__name__}:SFT")        # the benchmark's own baseline method
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    if args.tiny:
        from llmkd.models.tiny import save_tiny_pair

        teacher = str(save_tiny_pair(work / "tiny", pretrain_steps=150)[0])
        args.student_layers = 1
        data = generate(work / "generate", teacher, "hf", args.train_prompts + args.eval_prompts,
                        args.max_new_tokens)
    else:
        from llmkd.models.embedded import embedded_teacher_dir

        teacher = str(embedded_teacher_dir())
        data = in_child(generate, work / "generate", teacher, "vllm",
                        args.train_prompts + args.eval_prompts, args.max_new_tokens)
    timings["generate"] = round(time.perf_counter() - started, 1)

    from transformers import AutoModelForCausalLM

    from llmkd.training.pipeline import build_trainer

    target = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    results: list[dict[str, Any]] = []
    prompts: list[list[int]] = []
    previous = json.loads((work / "methods.json").read_text()) if args.merge and (work / "methods.json").exists() else {}
    kept = {r["row"]: r for r in previous.get("rows", []) if r["row"] not in rows}
    for name in rows:
        start = ROWS[name].get("from")
        if start and start not in rows[: rows.index(name)] and not (work / "students" / start).exists():
            raise SystemExit(f"--rows: {name} continues from {start}: run {start} first (or with it)")
    for name in [*(() if "before" in kept else ("before",)), *rows]:
        t0 = time.perf_counter()
        method = dict(ROWS.get(name, {"name": "token_kd"}))
        start = method.pop("from", None)
        if name == "taid":
            method["total_steps"] = args.steps
        if name == "distillspec":
            method["max_new_tokens"] = args.onpolicy_tokens
        out = work / "students" / name
        trainer = build_trainer(config(args, teacher, data, out, method,
                                       work / "students" / start if start else None))
        if not prompts:
            ev = trainer.eval_dataset
            prompts = [list(ev[j]["input_ids"][: ev[j]["prompt_len"]])
                       for j in range(min(args.spec_prompts, len(ev)))]
        row: dict[str, Any] = {"row": name, "method": method, "from": start}
        if name != "before":
            res = trainer.train()
            row["s_per_step"] = res.metrics["train_runtime"] / max(trainer.state.global_step, 1)
            row["train_runtime_s"] = res.metrics["train_runtime"]
        trainer.model.save_pretrained(out)
        trainer.processing_class.save_pretrained(out)
        row |= measure(LABELS[name], trainer.model.eval(), trainer, target, prompts, args)
        row |= accuracy(str(out), work / "eval" / name, LABELS[name], args)
        metrics_file = work / "eval" / name / "metrics.json"
        metrics_file.write_text(json.dumps(json.loads(metrics_file.read_text()) | row, indent=2))
        row["row_s"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        done = rows.index(name) + 1 if name in rows else 0
        print(f"[methods] {done}/{len(rows)} {name}: {fmt(row)}  ({row['row_s']:.0f} s)", flush=True)
        del trainer
        gc.collect()
    teacher_acc = previous.get("teacher_accuracy") or accuracy(teacher, work / "eval" / "teacher", "teacher", args)
    timings["total"] = round(time.perf_counter() - started, 1)
    if kept:   # the table in ROWS order, the undistilled draft first
        order = ["before", *ROWS]
        results = sorted([*kept.values(), *results], key=lambda r: order.index(r["row"]))
        before = previous.get("timings_s", {})
        timings["earlier_runs_s"] = round(before.get("total", 0) + before.get("earlier_runs_s", 0), 1)
    md = table(results, args.gamma) + (
        f"\nteacher accuracy: {100 * teacher_acc['accuracy']:.1f} % [{100 * teacher_acc['ci_low']:.1f}, "
        f"{100 * teacher_acc['ci_high']:.1f}] (n={teacher_acc['n']}); wall time {timings['total']:.0f} s"
        + (f" (+ {timings['earlier_runs_s']:.0f} s in the earlier runs merged here)" if kept else "") + "\n")
    (work / "methods.md").write_text(md)
    summary = {"args": vars(args), "teacher": teacher, "teacher_accuracy": teacher_acc,
               "rows": results, "timings_s": timings, "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(), "cpu_count": multiprocessing.cpu_count()}
    (work / "methods.json").write_text(json.dumps(summary, indent=2))
    print(md)


if __name__ == "__main__":
    main()
