"""Tokenizer transfer on the embedded teacher: SFT vs ULD vs ALM, same data and steps.

    OMP_NUM_THREADS=2 python benchmarks/cross_tokenizer.py [--steps 60] [--vocab 4096]
        [--layers all] [--num-train 256] [--num-eval 64] [--work runs/bench-cross-tokenizer] [--overwrite]
    python benchmarks/cross_tokenizer.py --prepare-only --work runs/cross_tokenizer-prep
        (only writes WORK/student-init, the student configs/distill/cross_tokenizer.yaml loads)
    python benchmarks/cross_tokenizer.py --quick --work /tmp/xtok   (tiny models: checks the script)
    python benchmarks/cross_tokenizer.py --align-only --work WORK --align-examples 300
        (only the alignment throughput, on WORK/student-init; replaces the JSON's "alignment")

1. A new byte-level BPE tokenizer (`--vocab` tokens, different merges: numbers are not split
   into digits) is trained on chat-formatted arithmetic texts that do not overlap the held-out
   prompts. The student is the teacher's layers (`--layers`) under that tokenizer, each new
   embedding the mean of the teacher embeddings of the token's pieces (`transfer_student`).
2. Rows: the untrained transfer; SFT on the new tokenization (method cross_tokenizer, loss none,
   ce_weight 1); ULD (CE + 1.5 ULD, and the L1 term alone); ALM (tau 100) and debiased ALM; each trained from the same transferred student on the same examples
   with the same steps, batch and learning rate. The teacher is listed for reference.
3. Columns: held-out chunk gap (mean |l_T - l_S| over aligned chunks of the held-out gold
   responses, nats), greedy accuracy on the held-out prompts with a 95 % Wilson interval, and
   the median seconds per optimizer step.
4. Alignment throughput (texts/s, `ChunkAligner` vs TRL GOLD's byte-offset alignment on the
   same texts, alternated, median of 3; `--align-only` re-measures only this on an existing
   WORK/student-init) and (unless --timing-steps 0) the step-time ratio of an ALM step to a same-tokenizer token_kd step with a
   student of the same depth (both timed here, median of `--timing-steps` steps).
Prints a markdown table and writes JSON (default benchmarks/results/cross_tokenizer.json);
never asserts.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from common import run_config, step_timer

HERE = Path(__file__).resolve().parent


def teacher_and_recipe(args: argparse.Namespace) -> tuple[str, Any]:
    from llmkd.data.recipes import load_recipe

    if args.quick:
        from llmkd.models.tiny import save_tiny_pair

        teacher, _ = save_tiny_pair(Path(args.work) / "tiny", pretrain_steps=150)
        return str(teacher), load_recipe("arithmetic")
    from llmkd.models.embedded import embedded_teacher_dir

    return str(embedded_teacher_dir()), load_recipe("arithmetic")


def tokenizer_texts(tok: Any, recipe: Any, n: int) -> list[str]:
    """Chat-formatted (prompt, gold response) texts of the task, from another seed than the
    benchmark's data, plus prompts of other offline recipes for a broader English vocabulary."""
    from llmkd.data.recipes import load_recipe

    rows = recipe.load(n, seed=12345)
    texts = [tok.apply_chat_template([{"role": "user", "content": p},
                                      {"role": "assistant", "content": recipe.gold_response(a)}], tokenize=False)
             for p, a in zip(rows["prompt"], rows["answer"])]
    for name in ("gsm_symbolic", "family_relationships", "syllogism"):
        texts += list(load_recipe(name).load(n // 3, seed=12345)["prompt"])
    return texts


def prepare_student(teacher_dir: str, recipe: Any, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkd.models.transfer import train_tokenizer, transfer_student

    t_tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    started = time.time()
    new_tok = train_tokenizer(tokenizer_texts(t_tok, recipe, args.tokenizer_texts), args.vocab, like=t_tok)
    layers = args.layers if args.layers in ("all", "every_other") else int(args.layers)
    student = transfer_student(teacher, t_tok, new_tok, layers=layers)
    student.save_pretrained(out)
    new_tok.save_pretrained(out)
    sample = recipe.load(1, seed=0)["prompt"][0]
    return {"teacher_vocab": len(t_tok), "student_vocab": len(new_tok), "seconds": round(time.time() - started, 1),
            "layers": len(student.get_decoder().layers),
            "example": {"text": sample, "teacher_tokens": len(t_tok(sample)["input_ids"]),
                        "student_tokens": len(new_tok(sample)["input_ids"])}}


def config(args: argparse.Namespace, out: Path, model: dict, method: dict, steps: int) -> Any:
    return run_config(out, steps=steps, lr=args.lr, batch=args.batch, model=model, method=method,
                      data={"recipe": "arithmetic", "num_train": args.num_train, "num_eval": args.num_eval,
                            "max_length": 256},
                      warmup_steps=max(1, steps // 20))


def accuracy(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from llmkd.eval.reasoning import evaluate_reasoning

    m = evaluate_reasoning(model_dir, "arithmetic", backend="hf", num_examples=args.num_eval,
                           offset=args.num_train, max_new_tokens=16, batch_size=16, progress=False)
    return {"accuracy": m["accuracy"], "ci95": [m["ci_low"], m["ci_high"]], "n": m["n"]}


def run_row(name: str, method: dict, student_dir: Path, teacher_dir: str, args: argparse.Namespace,
            work: Path, held_out: Any = None) -> dict[str, Any]:
    """Train one row (steps > 0) or evaluate the untrained transfer (steps 0). The chunk gap is
    measured on `held_out` (the plain ALM chunks of the first row) so every row is scored on
    the same chunks, whatever chunks its loss trains on."""
    from llmkd.eval.chunk_gap import chunk_gap
    from llmkd.training.pipeline import build_trainer

    steps = args.steps if method.get("loss") is not None else 1
    trainer = build_trainer(config(args, work / name, {"teacher": teacher_dir, "student": str(student_dir)},
                                   {"name": "cross_tokenizer", **{k: v for k, v in method.items() if v is not None}},
                                   steps))
    row: dict[str, Any] = {"row": name}
    held_out = trainer.eval_dataset if held_out is None else held_out
    row["_held_out"] = held_out
    if method.get("loss") is None:          # the untrained transfer: evaluate only
        row.update(chunk_gap(trainer.method, trainer.model, held_out))
        row.update(accuracy(student_dir, args))
        return row
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    row.update(chunk_gap(trainer.method, trainer.model, held_out))
    trainer.save_model(str(work / name / "model"))
    trainer.processing_class.save_pretrained(str(work / name / "model"))
    row.update(accuracy(work / name / "model", args))
    row["s_per_step"] = statistics.median(timer.times)
    row["final_loss"] = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)
    return row


def alignment_throughput(student_dir: Path, teacher_dir: str, recipe: Any, n: int, rounds: int = 3) -> dict[str, Any]:
    """Texts/s aligning the same texts (n chat-formatted examples plus n // 3 prompts of each of
    three other recipes): ours (batched, with the paired check) and TRL GOLD's byte offsets,
    timed in alternation after one untimed call of ours (which counts the chunks), median of
    `rounds`."""
    from transformers import AutoTokenizer

    from llmkd.data.alignment import ChunkAligner

    s_tok, t_tok = AutoTokenizer.from_pretrained(str(student_dir)), AutoTokenizer.from_pretrained(teacher_dir)
    texts = tokenizer_texts(t_tok, recipe, n)
    aligner = ChunkAligner(s_tok, t_tok)
    chunks = sum(len(a.chunks) for a in aligner(texts))
    out: dict[str, Any] = {"examples": len(texts), "chunks_per_example": chunks / len(texts), "rounds": rounds}
    try:
        from trl.experimental.gold.gold_trainer import ULDLoss
        from trl.experimental.utils import encode_with_byte_offsets
    except ImportError:
        ULDLoss = None

    def gold() -> None:
        enc_s = encode_with_byte_offsets(s_tok.backend_tokenizer, texts)
        enc_t = encode_with_byte_offsets(t_tok.backend_tokenizer, texts)
        for (_, a), (_, b) in zip(enc_s, enc_t):
            ULDLoss._align_by_byte_offsets(a, b)

    runs = {"llmkd": lambda: aligner(texts), **({"trl_gold": gold} if ULDLoss is not None else {})}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    for name, ts in times.items():
        out[f"{name}_examples_per_s"] = len(texts) / statistics.median(ts)
    if "trl_gold" in times:
        out["llmkd_over_trl_gold"] = out["llmkd_examples_per_s"] / out["trl_gold_examples_per_s"]
    return out


def align_only(args: argparse.Namespace) -> None:
    """Re-measure the alignment throughput on WORK/student-init and replace only the
    "alignment" entry of the results JSON (the trained rows are left as they are)."""
    teacher_dir, recipe = teacher_and_recipe(args)
    student_dir = Path(args.work) / "student-init"
    if not (student_dir / "tokenizer.json").exists():
        raise SystemExit(f"{student_dir} has no tokenizer; run with --prepare-only --work {args.work} first")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["alignment"] = alignment_throughput(student_dir, teacher_dir, recipe, args.align_examples)
    result["alignment"]["measured"] = "alone (--align-only)"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(json.dumps(result["alignment"], indent=2))


def step_time_ratio(student_dir: Path, teacher_dir: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Median step time: ALM (transferred student) vs token_kd with a same-depth, same-tokenizer
    student derived from the teacher; same data, batch and chunk size."""
    from transformers import AutoConfig

    from llmkd.training.pipeline import build_trainer

    depth = AutoConfig.from_pretrained(str(student_dir)).num_hidden_layers
    total = AutoConfig.from_pretrained(teacher_dir).num_hidden_layers
    keep = list(range(total)) if depth == total else "every_other" if depth == (total + 1) // 2 else depth
    out = {}
    for name, model, method in (
            ("token_kd", {"teacher": teacher_dir, "student_layers": keep}, {"name": "token_kd", "kind": "fkl"}),
            ("cross_tokenizer_alm", {"teacher": teacher_dir, "student": str(student_dir)},
             {"name": "cross_tokenizer", "loss": "alm"})):
        trainer = build_trainer(config(args, work / f"timing-{name}", model, method, args.timing_steps + 1))
        timer = step_timer()
        trainer.add_callback(timer)
        trainer.train()
        out[f"{name}_s_per_step"] = statistics.median(timer.times[1:])     # first step: warm-up
    out["ratio"] = out["cross_tokenizer_alm_s_per_step"] / out["token_kd_s_per_step"]
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| Student | held-out chunk gap, nats (mean abs l_T - l_S) | accuracy (95 % Wilson CI) | s/step |",
             "|---|---|---|---|"]
    for r in result["rows"]:
        acc = f"{100 * r['accuracy']:.1f} % [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"
        gap = "0 (reference)" if r["row"] == "teacher" else f"{r['chunk_gap']:.3f}"
        step = f"{r['s_per_step']:.2f}" if r.get("s_per_step") else "-"
        lines.append(f"| {r['row']} | {gap} | {acc} | {step} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", default="all", help="all | every_other | a count")
    ap.add_argument("--num-train", type=int, default=256)
    ap.add_argument("--num-eval", type=int, default=64)
    ap.add_argument("--tokenizer-texts", type=int, default=3000)
    ap.add_argument("--timing-steps", type=int, default=8, help="0: skip the step-time ratio")
    ap.add_argument("--align-examples", type=int, default=2000)
    ap.add_argument("--work", default="runs/bench-cross-tokenizer")
    ap.add_argument("--out", default=str(HERE / "results" / "cross_tokenizer.json"))
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --work dir")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--align-only", action="store_true",
                    help="only re-measure alignment throughput on an existing WORK/student-init")
    ap.add_argument("--quick", action="store_true", help="tiny models and a few steps: checks the script")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.num_train, args.num_eval, args.vocab, args.layers = 20, 64, 16, 300, "1"
        args.tokenizer_texts, args.timing_steps, args.align_examples, args.lr = 500, 3, 200, 3e-3
        args.out = str(Path(args.work) / "cross_tokenizer_quick.json")
    if args.align_only:
        align_only(args)
        return
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"{work} is not empty; pass --overwrite to replace it")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir, recipe = teacher_and_recipe(args)
    student_dir = work / "student-init"
    started = time.time()
    result: dict[str, Any] = {"transfer": prepare_student(teacher_dir, recipe, student_dir, args)}
    print(json.dumps(result["transfer"]))
    if args.prepare_only:
        print(f"transferred student written to {student_dir}")
        return
    rows = [("untrained transfer", {}), ("SFT (new tokenization)", {"loss": "none", "ce_weight": 1.0}),
            ("ULD (CE + 1.5 ULD, the paper's)", {"loss": "uld"}),
            ("ULD term alone", {"loss": "uld", "ce_weight": 0.0, "uld_weight": 1.0}),
            ("ALM (tau 100)", {"loss": "alm"}), ("ALM debiased (alm_unbiased)", {"loss": "alm_unbiased"})]
    result["rows"] = [{"row": "teacher", **accuracy(Path(teacher_dir), args)}]
    held_out = None
    for name, method in rows:
        result["rows"].append(run_row(name, method, student_dir, teacher_dir, args, work, held_out))
        held_out = result["rows"][-1].pop("_held_out")
        print(json.dumps(result["rows"][-1]))
    result["alignment"] = alignment_throughput(student_dir, teacher_dir, recipe, args.align_examples)
    if args.timing_steps > 0:
        result["step_time"] = step_time_ratio(student_dir, teacher_dir, args, work)
    result["args"] = vars(args)
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                         "wall_s": round(time.time() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(result))
    print(json.dumps({"alignment": result["alignment"], "step_time": result.get("step_time")}, indent=2))


if __name__ == "__main__":
    main()
