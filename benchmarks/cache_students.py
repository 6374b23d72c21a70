"""Does the compact cache cost the student anything? Students trained from a lossless and a
compact cache of the same teacher rows, with identical seeds, and their held-out KL to the teacher.

1. `llmkd generate` (HF backend, greedy, top-k log-probs, lossless) answers `--train-prompts` +
   `--eval-prompts` arithmetic prompts with the embedded teacher (SmolLM2-135M-Instruct).
2. The same rows are written again with `cache: compact` (cache_size.write_cut: the shard writer
   and the codec `llmkd generate` uses).
3. Three students derived from the teacher (`--student-layers` of its layers, the same initial
   weights) train offline token KD (forward KL on the stored top-k + tail) for `--steps` steps:
   lossless and compact with the same seeds and data order, and lossless with another data order
   (the noise floor; the derived student has no random init and no dropout, so the seed alone
   changes nothing).
4. Each student's KL(teacher || student) on the held-out prompts' teacher responses (full
   vocabulary, the live teacher).

    OMP_NUM_THREADS=1 python benchmarks/cache_students.py [--steps 30] [--k 20]
Writes benchmarks/results/cache_students.json and prints the table. Never asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from common import run_config

RESULTS = Path(__file__).resolve().parent / "results" / "cache_students.json"


def train_and_measure(data: Path, out: Path, data_seed: int, teacher: Any, args: argparse.Namespace) -> dict:
    from llmkd.eval.closeness import teacher_closeness
    from llmkd.training.pipeline import build_trainer

    cfg = run_config(
        out, steps=args.steps, lr=args.lr, batch=args.batch_size,
        model={"teacher": args.model, "student_layers": args.student_layers, "teacher_mode": "offline"},
        data={"path": str(data), "num_train": args.train_prompts, "num_eval": args.eval_prompts,
              "max_length": 256, "allow_fewer": True},
        method={"name": "token_kd", "kind": "fkl"}, logging_steps=args.steps, data_seed=data_seed)
    trainer = build_trainer(cfg)
    result = trainer.train()
    close = teacher_closeness(trainer.model, teacher, trainer.eval_dataset, trainer.data_collator)
    return {"train_loss": result.training_loss, "kl_to_teacher": close["kl"],
            "top1_agreement": close["top1_agreement"], "eval_tokens": close["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--train-prompts", type=int, default=96)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--student-layers", type=int, default=8)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from cache_size import write_cut   # beside this script
    from transformers import AutoTokenizer

    from llmkd.generation.run import GenerationConfig, run_generation
    from llmkd.models.embedded import resolve_model_name
    from llmkd.models.student import load_causal_lm

    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        lossless = run_generation(GenerationConfig(
            model=args.model, backend="hf", recipe="arithmetic", temperature=0.0, topk=args.k, cache="lossless",
            num_prompts=args.train_prompts + args.eval_prompts, max_new_tokens=args.max_new_tokens,
            output_dir=str(tmp_path / "lossless"), engine={"batch_size": 16}), progress=False)
        vocab = len(AutoTokenizer.from_pretrained(resolve_model_name(args.model)))
        compact = write_cut(lossless, tmp_path / "compact", args.k, "compact", vocab)
        teacher = load_causal_lm(resolve_model_name(args.model)).eval()
        for label, data, order in (("lossless, order 0", lossless, 0), ("compact, order 0", compact, 0),
                                   ("lossless, order 1", lossless, 1)):
            report["rows"][label] = train_and_measure(data, tmp_path / "run", order, teacher, args)
            print(label, report["rows"][label], flush=True)
    r = report["rows"]
    report["compact_minus_lossless"] = r["compact, order 0"]["kl_to_teacher"] - r["lossless, order 0"]["kl_to_teacher"]
    report["order1_minus_order0"] = r["lossless, order 1"]["kl_to_teacher"] - r["lossless, order 0"]["kl_to_teacher"]
    print(f"\n{'student (offline fKL, top-' + str(args.k) + ')':32s} {'held-out KL':>12s} {'top-1 agree':>12s}")
    for label, row in r.items():
        print(f"{label:32s} {row['kl_to_teacher']:12.4f} {row['top1_agreement']:12.3f}")
    print(f"compact - lossless: {report['compact_minus_lossless']:+.2e} nats; "
          f"data order 1 - order 0 (noise): {report['order1_minus_order0']:+.2e} nats")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
