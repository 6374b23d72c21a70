"""Teacher hacking at this scale (Tiapkin et al. 2025, "On Teacher Hacking in Language Model
Distillation"): does a fixed offline dataset over many epochs make the proxy improve while the
golden metric gets worse, and does online data prevent it?

    OMP_NUM_THREADS=1 python benchmarks/teacher_hacking.py [--steps 40] [--rows offline,online_teacher,on_policy]
        [--work DIR] [--tiny]

1. Oracle = the embedded SmolLM2-135M-Instruct (`llmkd.models.embedded`).
2. Teacher = the oracle cut to `--teacher-layers` of its 30 layers, briefly distilled from it
   (`--teacher-steps` forward-KL steps on the oracle's sampled answers to disjoint prompts): an
   imperfect imitation of the oracle. Built once and cached under LLMKD_CACHE.
3. A student = the teacher cut to `--student-layers` layers, distilled from the teacher with
   forward KL (live teacher, `llmkd distill`'s own pipeline), the same steps, batch, learning
   rate and seed in every row:
     offline         a fixed set of `--train-prompts` prompts with one teacher sample each, many epochs
     online_teacher  the same prompts, fresh teacher samples every batch (method.seq_kd)
     on_policy       the same prompts, the student's own samples every batch (method.lmbda = 1)
4. Every `--eval-steps` the monitor (`monitor: {golden: oracle_kl}`) measures on held-out
   prompts with fixed teacher responses: the proxy KL(teacher || student) and the golden
   KL(oracle || student); the detector flags hacking (proxy better, golden worse beyond its noise
   for 3 evaluations).
Writes benchmarks/results/teacher_hacking.json and .png (or under WORK with --tiny) and prints a
table. Never asserts. `--tiny` runs the same code on tiny local models in well under a minute.
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

from common import run_config

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = "arithmetic"
ROWS: dict[str, dict[str, Any]] = {
    "offline": {"kind": "fkl"},
    "online_teacher": {"kind": "fkl", "seq_kd": True},
    "on_policy": {"kind": "fkl", "lmbda": 1.0},
}


def sample_rows(model_dir: str, prompts: list[str], *, max_new_tokens: int, seed: int) -> list[str]:
    """One temperature-1 sample per prompt (chat template), transformers backend."""
    from transformers import AutoTokenizer

    from llmkd.data.collate import chat_prompt_ids
    from llmkd.generation.backends import make_backend
    from llmkd.generation.spec import SamplingSpec

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    engine = make_backend("hf", model_dir, max_model_len=max(map(len, ids)) + max_new_tokens, batch_size=16)
    try:
        out = engine.generate(ids, SamplingSpec(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed),
                              progress=False)
    finally:
        engine.close()
    return [c[0].text for c in out]


def write_recipe(model_dir: str, where: Path, *, n: int, offset: int, max_new_tokens: int, seed: int) -> Path:
    """A local recipe: `n` arithmetic prompts from `offset`, their gold answers and one sample of
    `model_dir` each (column `response`)."""
    from llmkd.data.recipes import load_recipe

    rows = load_recipe(RECIPE).load(n, seed=seed, offset=offset)
    texts = sample_rows(model_dir, list(rows["prompt"]), max_new_tokens=max_new_tokens, seed=seed)
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "rows.jsonl", "w") as f:
        for p, a, t in zip(rows["prompt"], rows["answer"], texts):
            f.write(json.dumps({"question": p, "answer": a, "response": t}) + "\n")
    (where / "recipe.yaml").write_text(f"source: local\npath: {where / 'rows.jsonl'}\nanswer_kind: numeric\n")
    return where / "recipe.yaml"


def distill(out: Path, teacher: str, recipe: Path, *, n_train: int, n_eval: int, steps: int, layers: int,
            method: dict[str, Any], args: argparse.Namespace, student: str | None = None,
            monitor: dict[str, Any] | None = None) -> Any:
    from llmkd.training.pipeline import build_trainer

    extra = {"eval_strategy": "steps", "eval_steps": args.eval_steps, "monitor": monitor} if monitor else {}
    cfg = run_config(
        out, steps=steps, lr=args.lr, batch=args.batch,
        model={"teacher": teacher, "student": student, "student_layers": layers},
        data={"recipe": str(recipe), "num_train": n_train, "num_eval": n_eval, "response": "response",
              "max_length": 160},
        method={"name": "token_kd", "max_new_tokens": args.max_new_tokens} | method,
        seed=args.seed, lr_scheduler_type="constant", warmup_steps=0, per_device_eval_batch_size=8,
        logging_steps=args.eval_steps, **extra)
    trainer = build_trainer(cfg)
    trainer.train()
    return trainer


def build_teacher(oracle: str, args: argparse.Namespace) -> str:
    """The oracle cut to --teacher-layers and briefly distilled from it; cached by its settings."""
    from llmkd.models.embedded import cache_root

    key = f"L{args.teacher_layers}-S{args.teacher_steps}-N{args.teacher_prompts}-seed{args.seed}"
    target = (Path(args.work) if args.tiny else cache_root() / "bench") / f"teacher_hacking-teacher-{key}"
    if (target / "config.json").exists():
        return str(target)
    recipe = write_recipe(oracle, Path(args.work) / "oracle_data", n=args.teacher_prompts + 8,
                          offset=10_000, max_new_tokens=args.max_new_tokens, seed=args.seed)
    trainer = distill(Path(args.work) / "teacher_run", oracle, recipe, n_train=args.teacher_prompts, n_eval=8,
                      steps=args.teacher_steps, layers=args.teacher_layers, method={"kind": "fkl"}, args=args)
    tmp = target.with_name(target.name + ".tmp")
    trainer.save_model(str(tmp))
    trainer.processing_class.save_pretrained(str(tmp))
    (tmp / "training_args.json").unlink(missing_ok=True)
    os.replace(tmp, target)
    return str(target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-steps", type=int, default=5)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--train-prompts", type=int, default=8)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--teacher-layers", type=int, default=8)
    ap.add_argument("--teacher-steps", type=int, default=10)
    ap.add_argument("--teacher-prompts", type=int, default=32)
    ap.add_argument("--student-layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/llmkd-teacher-hacking")
    ap.add_argument("--tiny", action="store_true", help="tiny local models: a smoke test, numbers mean nothing")
    args = ap.parse_args()
    run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from llmkd.eval.report import write_report

    torch.manual_seed(args.seed)
    work = Path(args.work)
    started = time.time()
    if args.tiny:
        from llmkd.models.tiny import save_tiny_pair

        oracle = str(save_tiny_pair(work / "tiny", teacher_layers=3, student_layers=1, pretrain_steps=60)[0])
        args.teacher_layers, args.student_layers = 2, 1
    else:
        from llmkd.models.embedded import embedded_teacher_dir

        oracle = str(embedded_teacher_dir())
    teacher = build_teacher(oracle, args)
    teacher_s = time.time() - started
    recipe = write_recipe(teacher, work / "student_data", n=args.train_prompts + args.eval_prompts, offset=0,
                          max_new_tokens=args.max_new_tokens, seed=args.seed + 1)
    results: dict[str, Any] = {"rows": {}}
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    for name in args.rows.split(","):
        t0 = time.time()
        trainer = distill(runs / name, teacher, recipe, n_train=args.train_prompts, n_eval=args.eval_prompts,
                          steps=args.steps, layers=args.student_layers, method=ROWS[name], args=args,
                          monitor={"golden": "oracle_kl", "oracle": oracle})
        history = [e for e in trainer.state.log_history if "eval_golden_oracle_kl" in e]
        (runs / name / "log_history.json").write_text(json.dumps(
            [{k: e[k] for k in ("step", "eval_proxy_kl", "eval_golden_oracle_kl", "eval_golden_oracle_kl_se")}
             for e in history]))
        hack = trainer.monitor.hacking
        best = min(history, key=lambda e: e["eval_golden_oracle_kl"])
        results["rows"][name] = {
            "method": ROWS[name], "seconds": round(time.time() - t0, 1),
            "epochs": round(args.steps * args.batch / args.train_prompts, 1),
            "curve": [{"step": e["step"], "proxy_kl": e["eval_proxy_kl"], "golden_oracle_kl": e["eval_golden_oracle_kl"],
                       "golden_se": e["eval_golden_oracle_kl_se"]} for e in history],
            "best_golden_step": best["step"], "best_golden": best["eval_golden_oracle_kl"],
            "final_golden": history[-1]["eval_golden_oracle_kl"], "final_proxy": history[-1]["eval_proxy_kl"],
            "min_proxy": min(e["eval_proxy_kl"] for e in history),
            "hacking": None if hack is None else {"began_step": hack.began_step, "flagged_step": hack.flagged_step,
                                                  "best_step": hack.best_step},
        }
        del trainer
    report = write_report([runs], work / "report")
    out = work if args.tiny else RESULTS
    shutil.copy(work / "report" / "proxy_vs_golden.png", out / "teacher_hacking.png")
    results |= {"settings": {k: v for k, v in vars(args).items()}, "oracle": Path(oracle).name,
                "teacher_build_s": round(teacher_s, 1), "total_s": round(time.time() - started, 1),
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
                "report_plots": report["plots"]}
    (out / "teacher_hacking.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'row':16} {'epochs':>6} {'proxy first->last':>20} {'golden first->best->last':>30} {'best step':>9}  hacking")
    for name, r in results["rows"].items():
        c = r["curve"]
        print(f"{name:16} {r['epochs']:>6} {c[0]['proxy_kl']:>9.4f}->{r['final_proxy']:<9.4f} "
              f"{c[0]['golden_oracle_kl']:>9.4f}->{r['best_golden']:.4f}->{r['final_golden']:<9.4f} "
              f"{r['best_golden_step']:>9}  {r['hacking'] or 'not detected'}")
    print(f"total {results['total_s']} s; wrote {out / 'teacher_hacking.json'}")
    return results


if __name__ == "__main__":
    main()
