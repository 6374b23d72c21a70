"""Several teachers, one student: each specialist alone vs routed vs mean, measured side by side.

    OMP_NUM_THREADS=2 python benchmarks/multi_teacher.py [--steps 40] [--work runs/bench-multi-teacher]
    python benchmarks/multi_teacher.py --tiny --work /tmp/mt      (tiny models: checks the script)

1. Two specialist teachers with different strengths, built here and cached by their settings: a
   copy of the embedded teacher cut to `--teacher-layers` layers, fine-tuned (`--teacher-steps`
   of plain SFT) on the gold answers of one source each (math: arithmetic, logic: syllogism).
2. Rows, each from the same student init (the base copy cut to `--student-layers`) with the same
   data (both sources, `--num-train` prompts each), steps, batch and learning rate: a student of
   the math teacher alone, of the logic teacher alone, the routed student (each row to its
   source's teacher) and the mean student (the average of both teachers' distributions).
3. Per source: held-out KL(source's teacher || student) on the gold responses (token mean,
   nats), greedy accuracy with a 95 % Wilson interval; and the median seconds per step.
With `--logic-tokenizer other` the logic specialist is first moved to its own BPE tokenizer
(at most `--vocab` tokens; each new embedding the mean of its pieces' embeddings) and then fine-tuned; the
rows become math_alone, logic_other_alone and routed_mixed_tokenizers (the logic teacher through
`model.teachers.logic.method: {name: cross_tokenizer, loss: alm}`; `mean` needs one tokenizer), and
the syllogism column reports the held-out ALM chunk gap (mean |l_T - l_S| over aligned chunks,
nats) instead of a per-token KL. `--rows a,b` runs only those rows (teacher_math, teacher_logic too).
Prints a markdown table and writes JSON (default benchmarks/results/multi_teacher.json, or
multi_teacher_mixed_tokenizers.json with `--logic-tokenizer other`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from common import run_config, step_timer

HERE = Path(__file__).resolve().parent
SOURCES = {"math": "arithmetic", "logic": "syllogism"}


def gold_texts(tok: Any, recipe: Any, n: int, *, offset: int, seed: int = 0) -> list[tuple[str, str]]:
    """(chat prompt text, gold response + eos) of `n` recipe rows from `offset`."""
    rows = recipe.load(n, seed=seed, offset=offset)
    out = []
    for p, a in zip(rows["prompt"], rows["answer"]):
        prompt = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        out.append((prompt, recipe.gold_response(a) + (tok.eos_token or "")))
    return out


def response_batch(tok: Any, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Right-padded ids with labels on the response tokens only."""
    import torch

    ids, labels = [], []
    for prompt, resp in pairs:
        p = tok(prompt, add_special_tokens=False).input_ids
        r = tok(resp, add_special_tokens=False).input_ids
        ids.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels])}


def base_model(args: argparse.Namespace) -> str:
    """The model everything derives from: the embedded teacher, or a tiny pretrained one."""
    if args.tiny:
        from llmkd.models.tiny import save_tiny_pair

        return str(save_tiny_pair(Path(args.work) / "tiny", pretrain_steps=100)[0])
    from llmkd.models.embedded import embedded_teacher_dir

    return str(embedded_teacher_dir())


def derived(base: str, layers: int, target: Path) -> str:
    """`base` cut to `layers` layers (evenly spaced), saved once."""
    if (target / "config.json").exists():
        return str(target)
    from transformers import AutoTokenizer

    from llmkd.models.student import derive_student, load_causal_lm

    model = derive_student(load_causal_lm(base), layers)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    os.replace(tmp, target)
    return str(target)


def specialist(base: str, name: str, args: argparse.Namespace, cache: Path) -> str:
    """`base` cut to `--teacher-layers` and fine-tuned on one source's gold answers; cached by settings."""
    target = cache / f"multi_teacher-{name}-L{args.teacher_layers}-S{args.teacher_steps}-seed{args.seed}"
    if (target / "config.json").exists():
        return str(target)
    from transformers import AutoTokenizer

    from llmkd.models.student import load_causal_lm

    start = derived(base, args.teacher_layers, cache / f"multi_teacher-base-L{args.teacher_layers}")
    return fine_tune(load_causal_lm(start), AutoTokenizer.from_pretrained(start), name, args, target)


def other_tokenizer_specialist(base: str, name: str, args: argparse.Namespace, cache: Path) -> str:
    """Like `specialist`, but first moved to a new BPE tokenizer (at most `--vocab` tokens, trained on both
    sources' chat texts from another seed): each new embedding the mean of its pieces' embeddings."""
    target = cache / (f"multi_teacher-{name}-othertok-V{args.vocab}-L{args.teacher_layers}"
                      f"-S{args.teacher_steps}-seed{args.seed}")
    if (target / "config.json").exists():
        return str(target)
    from transformers import AutoTokenizer

    from llmkd.data.recipes import load_recipe
    from llmkd.models.student import load_causal_lm
    from llmkd.models.transfer import train_tokenizer, transfer_student

    start = derived(base, args.teacher_layers, cache / f"multi_teacher-base-L{args.teacher_layers}")
    tok = AutoTokenizer.from_pretrained(start)
    texts = [p + r for recipe in SOURCES.values()
             for p, r in gold_texts(tok, load_recipe(recipe), 256, offset=0, seed=12345)]
    new_tok = train_tokenizer(texts, args.vocab, like=tok)
    return fine_tune(transfer_student(load_causal_lm(start), tok, new_tok), new_tok, name, args, target)


def fine_tune(model: Any, tok: Any, name: str, args: argparse.Namespace, target: Path) -> str:
    """Plain SFT (AdamW) on source `name`'s gold answers, saved atomically to `target`."""
    import torch

    from llmkd.data.recipes import load_recipe

    torch.manual_seed(args.seed)
    model.train()
    # SFT rows far from the benchmark's prompts (offset 50,000): the teacher never saw held-out ones
    pairs = gold_texts(tok, load_recipe(SOURCES[name]), args.teacher_steps * args.batch, offset=50_000)
    opt = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr)
    for step in range(args.teacher_steps):
        loss = model(**response_batch(tok, pairs[step * args.batch:(step + 1) * args.batch])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return str(target)


def config(args: argparse.Namespace, out: Path, student: str, teachers: dict, routes: dict, mix: str) -> Any:
    return run_config(
        out, steps=args.steps, lr=args.lr, batch=args.batch,
        model={"student": student, "teachers": teachers},
        data={"max_length": 256, "mixture": [
            {"recipe": SOURCES[src], "num_train": args.num_train, "num_eval": args.num_eval, "teacher": routes[src]}
            for src in SOURCES]},
        method={"name": "token_kd", "kind": "fkl", "teacher_mix": mix},
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=max(1, args.steps // 4), seed=args.seed)


def held_out_kl(teacher: str, student: str, recipe: Any, args: argparse.Namespace) -> float:
    """Token mean of KL(teacher || student) over the held-out gold responses (nats)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from llmkd.models.student import load_causal_lm

    tok = AutoTokenizer.from_pretrained(student)
    t, s = load_causal_lm(teacher).eval(), load_causal_lm(student).eval()
    batch = response_batch(tok, gold_texts(tok, recipe, args.num_eval, offset=args.num_train))
    mask = batch.pop("labels")[:, 1:] != -100
    with torch.no_grad():
        lt = F.log_softmax(t(**batch).logits[:, :-1].double(), -1)
        ls = F.log_softmax(s(**batch).logits[:, :-1].double(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    return float(kl[mask].mean())


def held_out_chunk_gap(teacher: str, student: str, recipe: str, args: argparse.Namespace, work: Path) -> float:
    """For a teacher of another tokenizer (no shared vocabulary for a per-token KL): mean
    |l_T - l_S| over the aligned chunks of the held-out gold responses (nats), in ALM's units."""
    from llmkd.eval.chunk_gap import chunk_gap
    from llmkd.training.pipeline import build_trainer

    cfg = run_config(work, steps=1, lr=args.lr, batch=args.batch,
                     model={"teacher": teacher, "student": student},
                     data={"recipe": recipe, "num_train": args.num_train, "num_eval": args.num_eval, "max_length": 256},
                     method={"name": "cross_tokenizer", "loss": "alm"}, seed=args.seed)
    trainer = build_trainer(cfg)
    return chunk_gap(trainer.method, trainer.model, trainer.eval_dataset)["chunk_gap"]


def accuracy(model_dir: str, recipe: str, args: argparse.Namespace) -> dict[str, Any]:
    from llmkd.eval.reasoning import evaluate_reasoning

    m = evaluate_reasoning(model_dir, recipe, backend="hf", num_examples=args.num_eval, offset=args.num_train,
                           max_new_tokens=args.max_new_tokens, batch_size=16, progress=False)
    return {"accuracy": m["accuracy"], "ci95": [m["ci_low"], m["ci_high"]], "n": m["n"]}


def run_row(name: str, cfg: Any, teachers: dict[str, str], work: Path, args: argparse.Namespace) -> dict[str, Any]:

    from llmkd.data.recipes import load_recipe
    from llmkd.training.pipeline import build_trainer

    trainer = build_trainer(cfg)
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    out = work / name / "final"
    trainer.save_model(str(out))
    trainer.processing_class.save_pretrained(str(out))
    row: dict[str, Any] = {"row": name, "s_per_step": round(statistics.median(timer.times[1:] or timer.times), 3)}
    for src, recipe in SOURCES.items():
        if other_tokenizer(args, src):
            gap = held_out_chunk_gap(teachers[src], str(out), recipe, args, work / name / f"chunk_gap-{src}")
            row[src] = {"chunk_gap_to_teacher": round(gap, 4)}
        else:
            row[src] = {"kl_to_teacher": round(held_out_kl(teachers[src], str(out), load_recipe(recipe), args), 4)}
        row[src].update(accuracy(str(out), recipe, args))
    return row


def vocab_size(model_dir: str) -> int:
    """Tokens in a model's tokenizer (the BPE trainer stops early when its texts run out of merges)."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir))


def other_tokenizer(args: argparse.Namespace, src: str) -> bool:
    return src == "logic" and args.logic_tokenizer == "other"


def row_specs(args: argparse.Namespace, teachers: dict[str, str]) -> list[tuple[str, dict, dict, str]]:
    """(row, model.teachers, source -> teacher, teacher_mix) of every training row. With a logic
    teacher of another tokenizer it is distilled through ALM chunks, and `mean` (one tokenizer
    only) is left out."""
    if args.logic_tokenizer == "other":
        math = {"teacher": teachers["math"]}
        logic = {"teacher": teachers["logic"], "method": {"name": "cross_tokenizer", "loss": "alm"}}
        return [("math_alone", {"math": math}, {"math": "math", "logic": "math"}, "route"),
                ("logic_other_alone", {"logic": logic}, {"math": "logic", "logic": "logic"}, "route"),
                ("routed_mixed_tokenizers", {"math": math, "logic": logic}, {"math": "math", "logic": "logic"},
                 "route")]
    return [("math_alone", {"math": {"teacher": teachers["math"]}}, {"math": "math", "logic": "math"}, "route"),
            ("logic_alone", {"logic": {"teacher": teachers["logic"]}}, {"math": "logic", "logic": "logic"}, "route"),
            ("routed", {n: {"teacher": d} for n, d in teachers.items()}, {"math": "math", "logic": "logic"}, "route"),
            ("mean", {n: {"teacher": d} for n, d in teachers.items()}, {"math": None, "logic": None}, "mean")]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from llmkd.models.embedded import cache_root

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache" if args.tiny else cache_root() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    base = base_model(args)
    build = {name: other_tokenizer_specialist if other_tokenizer(args, name) else specialist for name in SOURCES}
    teachers = {name: build[name](base, name, args, cache) for name in SOURCES}
    student = derived(base, args.student_layers, cache / f"multi_teacher-student-L{args.student_layers}")
    wanted = set(args.rows.split(",")) if args.rows else None
    rows = []
    for name, spec, routes, mix in row_specs(args, teachers):
        if wanted is None or name in wanted:
            rows.append(run_row(name, config(args, work / name, student, spec, routes, mix), teachers, work, args))
            print(json.dumps(rows[-1]), flush=True)
    for name, d in [("teacher_math", teachers["math"]), ("teacher_logic", teachers["logic"])]:
        if wanted is None or name in wanted:
            rows.append({"row": name, **{src: accuracy(d, recipe, args) for src, recipe in SOURCES.items()}})
    result = {"args": vars(args), "platform": platform.platform(), "rows": rows,
              "vocab_sizes": {n: vocab_size(d) for n, d in {**teachers, "student": student}.items()}}
    stem = "multi_teacher_mixed_tokenizers" if args.logic_tokenizer == "other" else "multi_teacher"
    out = Path(args.out) if args.out else (work / f"{stem}.json" if args.tiny else HERE / "results" / f"{stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(rows))
    return result


def table(rows: list[dict[str, Any]]) -> str:
    def cell(r: dict, src: str) -> str:
        m = r[src]
        kl = (f"{m['kl_to_teacher']:.3f} / " if "kl_to_teacher" in m else
              f"chunk gap {m['chunk_gap_to_teacher']:.3f} / " if "chunk_gap_to_teacher" in m else "")
        return f"{kl}{m['accuracy']:.2f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"

    lines = ["| row | arithmetic: KL to math teacher / acc [95% CI] | syllogism: KL (or ALM chunk gap) to logic "
             "teacher / acc [95% CI] | s/step |", "|---|---|---|---|"]
    lines += [f"| {r['row']} | {cell(r, 'math')} | {cell(r, 'logic')} | {r.get('s_per_step', '')} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models: checks the script in about a minute")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--num-train", type=int, default=96)
    p.add_argument("--num-eval", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--teacher-steps", type=int, default=30)
    p.add_argument("--teacher-lr", type=float, default=5e-5)
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench-multi-teacher")
    p.add_argument("--logic-tokenizer", choices=("same", "other"), default="same",
                   help="other: the logic specialist gets its own BPE tokenizer (distilled through ALM)")
    p.add_argument("--vocab", type=int, default=4096,
                   help="at most this many tokens in that other tokenizer (fewer when its texts run out of merges)")
    p.add_argument("--rows", default=None, help="comma-separated rows to run (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.tiny:
        args.teacher_layers, args.student_layers, args.lr, args.teacher_lr = 2, 1, 3e-3, 3e-3
        args.vocab = min(args.vocab, 400)
    run(args)


if __name__ == "__main__":
    main()
