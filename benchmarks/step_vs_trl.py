"""A whole distillation step, llmkd vs TRL 1.16, on the same models, data, batch and settings.

Pairs (each variant in its own subprocess, so peak memory belongs to that variant alone):
  off  llmkd token_kd (jsd, lmbda 0)            vs  trl.experimental.gkd.GKDTrainer (lmbda 0)
  on   llmkd token_kd (jsd, lmbda 1, HF sampler) vs  trl.DistillationTrainer (transformers generate)
  sampler  llmkd on-policy with `method.sampler: vllm` vs the same with the HF sampler (the speed-up
       in-process vLLM sampling buys, everything else equal; the weights are pushed every step;
       compiled engine, `method.vllm: {enforce_eager: false}`: its ~1 min compile falls in step 1)
Regimes:
  short  the quickstart's rows: arithmetic prompts, the teacher's own greedy answers (~13 tokens)
  long   gsm_symbolic prompts with 512-token responses synthesised from offline reasoning_gym text
         (filler, not teacher samples): the vocabulary-sized loss dominates there
Both sides: embedded teacher -> student of every other layer (llmkd.models.student.derive_student),
generalized JSD beta 0.5, fp32, no gradient checkpointing, no bf16 (TRL's configs default to both:
turned off), same optimizer, lr, sequential batch order, HF `generate` for sampling, same max new
tokens. Off-policy batches are identical token for token (same collator), so step-1 losses must
agree; on-policy samples differ (different RNG paths), so their losses are only shown.

Step time: median of steps 2..N (step 1 pays one-off allocations), from Trainer callbacks.
Memory: "extra" = peak RSS during `train()` minus RSS once models, data and trainer exist
(Linux VmHWM, reset before training); with `--device cuda`, the GPU allocator's peak minus what is
allocated before training, and every variant trains in bf16 mixed precision (`bf16: true`).
Prints a table, writes JSON, never asserts.

    python benchmarks/step_vs_trl.py            # short: both pairs, long: off-policy (~4 min, 2 quiet cores)
    python benchmarks/step_vs_trl.py --all      # + long on-policy (512 sampled tokens/row: ~10 min)
    python benchmarks/step_vs_trl.py --regimes long --pairs on --merge   # just that pair, into the JSON
    python benchmarks/step_vs_trl.py --quick    # tiny random models, short regime: a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import peak_rss, reset_peak_rss, run_subprocess, step_stats, step_timer

RESULTS = Path(__file__).resolve().parent / "results" / "step_vs_trl.json"
BETA = 0.5
PAIRS = {"off": ("llmkd_off", "trl_gkd"), "on": ("llmkd_on", "trl_distill"),
         "sampler": ("llmkd_on_vllm", "llmkd_on")}
VARIANTS = tuple(dict.fromkeys(v for pair in PAIRS.values() for v in pair))


@dataclass(frozen=True)
class Regime:
    name: str
    recipe: str                  # reasoning_gym recipe giving the prompts
    rows: int
    batch: int
    response_tokens: int | None  # None: the teacher's greedy answers (<= 48 tokens), like the quickstart
    max_new_tokens: int          # on-policy sampling length


REGIMES = {
    "short": Regime("short", "arithmetic", rows=64, batch=8, response_tokens=None, max_new_tokens=16),
    "long": Regime("long", "gsm_symbolic", rows=16, batch=2, response_tokens=512, max_new_tokens=512),
}
QUICK_REGIMES = {
    "short": Regime("short", "arithmetic", rows=16, batch=4, response_tokens=None, max_new_tokens=8),
    "long": Regime("long", "gsm_symbolic", rows=8, batch=2, response_tokens=48, max_new_tokens=48),
}


# -- data ----------------------------------------------------------------------------------------
def prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prepare_rows(model_dir: str, regime: Regime, seed: int = 0) -> list[dict]:
    """Rows {messages, prompt_ids, response_ids} that every variant of a regime trains on."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from llmkd.data.recipes import load_recipe

    tok = AutoTokenizer.from_pretrained(model_dir)
    recipe = load_recipe(regime.recipe)
    data = recipe.load(regime.rows, seed=seed)
    messages = [[{"role": "user", "content": p}] for p in data["prompt"]]
    prompts = [prompt_ids(tok, m) for m in messages]
    eos = tok.eos_token_id
    if regime.response_tokens is None:   # the teacher's greedy answers, as `llmkd generate` writes them
        from llmkd.models.student import load_causal_lm

        teacher = load_causal_lm(model_dir).eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        config = GenerationConfig(do_sample=False, max_new_tokens=48, pad_token_id=pad, eos_token_id=eos)
        with torch.no_grad():
            out = teacher.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        responses = []
        for row in out[:, width:].tolist():
            resp = []
            for t in row:
                resp.append(t)
                if t == eos:
                    break
            responses.append(resp)
    else:   # long responses: worked problems from another offline set, cut to the exact length
        filler_rows = recipe.load(64, seed=seed + 1)
        text = " ".join(f"{q} Let us work it out step by step. The answer is {a}."
                        for q, a in zip(filler_rows["prompt"], filler_rows["answer"]))
        filler = tok(text, add_special_tokens=False)["input_ids"]
        n = regime.response_tokens - 1
        if len(filler) < n:
            filler = (filler * (n // max(len(filler), 1) + 1))
        responses = [filler[i * 7 % 97:][:n] + [eos] for i in range(len(prompts))]
    return [{"messages": m, "prompt_ids": p, "response_ids": r}
            for m, p, r in zip(messages, prompts, responses)]


def token_rows(rows: list[dict]) -> list[dict]:
    """llmkd / GKD features: prompt + response ids, prompt masked out of the labels."""
    return [{"input_ids": r["prompt_ids"] + r["response_ids"],
             "labels": [-100] * len(r["prompt_ids"]) + r["response_ids"],
             "prompt_len": len(r["prompt_ids"])} for r in rows]


# -- models and trainers --------------------------------------------------------------------------
def load_pair(model_dir: str) -> tuple[Any, Any, Any]:
    """(teacher, student, tokenizer), fp32, as `llmkd distill` builds them: the student is
    ``model_dir/student`` where that exists (another shape), else every other teacher layer."""
    from llmkd.models.student import derive_student, load_causal_lm
    from llmkd.training.pipeline import load_tokenizer

    teacher = load_causal_lm(model_dir)
    own = Path(model_dir) / "student"
    student = load_causal_lm(own) if own.is_dir() else derive_student(teacher, "every_other")
    return teacher, student, load_tokenizer(model_dir)


def common_args(regime: Regime, steps: int, device: str = "cpu") -> dict[str, Any]:
    """TrainingArguments shared by every variant (TRL's own defaults for bf16/checkpointing off on
    CPU; bf16 mixed precision for all on a GPU)."""
    from transformers import TrainingArguments

    gpu = device != "cpu"
    return dict(per_device_train_batch_size=regime.batch, max_steps=steps, learning_rate=1e-5,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                optim=TrainingArguments.__dataclass_fields__["optim"].default,
                logging_steps=steps, save_strategy="no", report_to="none", use_cpu=not gpu, seed=0,
                bf16=gpu, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0,
                train_sampling_strategy="sequential", disable_tqdm=True)


def instrumented(cls: type, record: dict[str, list]) -> type:
    """A subclass that records each training loss and its token counts (measurement only)."""

    class Recorded(cls):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if "completion_ids" in inputs:   # TRL DistillationTrainer batch
                width = inputs["prompt_ids"].shape[1] + inputs["completion_ids"].shape[1]
                rows, loss_tokens = inputs["completion_ids"].shape[0], int(inputs["completion_mask"].sum())
            else:
                rows, width = inputs["input_ids"].shape
                loss_tokens = int((inputs["labels"][:, 1:] != -100).sum())
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if model.training:
                loss = out[0] if return_outputs else out
                record["loss"].append(float(loss.detach()))
                record["loss_tokens"].append(loss_tokens)
                record["padded_tokens"].append(rows * width)
            return out

    return Recorded


def build_trainer(variant: str, model_dir: str, rows: list[dict], regime: Regime, steps: int,
                  out_dir: str, record: dict[str, list], device: str = "cpu") -> Any:
    from datasets import Dataset

    teacher, student, tok = load_pair(model_dir)
    base = common_args(regime, steps, device)
    if variant.startswith("llmkd"):
        from llmkd.training.config import config_from_dict
        from llmkd.training.trainer import DistillationTrainer

        on = variant in ("llmkd_on", "llmkd_on_vllm")
        cfg = config_from_dict({
            **base, "output_dir": out_dir, "overwrite_output_dir": True,
            "model": {"teacher": model_dir},
            # room for prompt + max_new_tokens: sampled sequences are cut at data.max_length
            "data": {"recipe": regime.recipe, "max_length": 4096},
            "method": {"name": "token_kd", "kind": "jsd", "beta": BETA, "lmbda": 1.0 if on else 0.0,
                       "max_new_tokens": regime.max_new_tokens, "gen_temperature": 1.0, "top_p": 1.0,
                       "chunk_size": 1024, **({"sampler": "vllm", "vllm": {"enforce_eager": False}}
                                              if variant.endswith("vllm") else {})}})
        return instrumented(DistillationTrainer, record)(
            model=student, teacher=teacher, args=cfg, processing_class=tok,
            train_dataset=Dataset.from_list(token_rows(rows)))
    if variant == "trl_gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        from llmkd.data.collate import DistillCollator

        inner = DistillCollator(tok.pad_token_id)

        def collate(batch: list[dict]) -> dict:   # the same padded tensors llmkd trains on
            b = inner(batch)
            return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                    "labels": b["labels"], "prompts": b["prompt_input_ids"],
                    "prompt_attention_mask": b["prompt_attention_mask"]}

        args = GKDConfig(**base, output_dir=out_dir, lmbda=0.0, beta=BETA, temperature=1.0,
                         max_new_tokens=regime.max_new_tokens, remove_unused_columns=False)
        return instrumented(GKDTrainer, record)(
            model=student, teacher_model=teacher, args=args, data_collator=collate,
            train_dataset=Dataset.from_list(token_rows(rows)), processing_class=tok)
    if variant == "trl_distill":
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**base, output_dir=out_dir, beta=BETA, temperature=1.0, top_p=1.0,
                                  top_k=0, max_completion_length=regime.max_new_tokens,
                                  shuffle_dataset=False)
        trainer = instrumented(DistillationTrainer, record)(
            model=student, teacher_model=teacher, args=args, processing_class=tok,
            train_dataset=Dataset.from_list([{"prompt": r["messages"]} for r in rows]))
        got = trainer._tokenize_prompts([rows[0]["messages"]])[0][0]
        if list(got) != rows[0]["prompt_ids"]:
            raise RuntimeError("TRL tokenizes the prompt differently from llmkd: not the same inputs")
        return trainer
    raise ValueError(f"unknown variant {variant!r}")


def run_child(args: argparse.Namespace, instrument: Any = None) -> dict:
    """One variant's training run. ``instrument(trainer, device)``, when given, is called before
    training and returns a function of the step times whose dict joins the result."""
    import torch

    data = json.loads(Path(args.data).read_text())
    regime = Regime(**data["regime"])
    record: dict[str, list] = {"loss": [], "loss_tokens": [], "padded_tokens": []}
    gpu = args.device != "cpu"
    timer = step_timer(cuda=gpu)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trainer(args.child, data["model_dir"], data["rows"], regime, args.steps,
                                out_dir, record, args.device)
        trainer.add_callback(timer)
        finish = instrument(trainer, args.device) if instrument else None
        setup_s = time.perf_counter() - t0
        if gpu:
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated() / 2**20
        else:
            baseline = reset_peak_rss()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else peak_rss()
    steps = timer.times
    return {**(finish(steps) if finish else {}),
        "variant": args.child, "regime": regime.name, "setup_s": round(setup_s, 2),
        **step_stats(steps, timer.cpu_times),
        "loss": record["loss"], "loss_step1": record["loss"][0],
        "loss_tokens": record["loss_tokens"], "padded_tokens": record["padded_tokens"],
        "baseline_rss_mb": baseline, "peak_rss_mb": peak, "extra_rss_mb": peak - baseline,
        "optim": str(trainer.args.optim), "threads": torch.get_num_threads(), "device": args.device,
    }


# -- parent --------------------------------------------------------------------------------------
def cached_rows(model_dir: str, regime: Regime, cache: bool) -> list[dict]:
    """`prepare_rows`, kept under ~/.cache/llmkd/bench (the short regime runs the teacher's greedy
    generation, minutes on a busy machine) keyed by the model's config and the regime."""
    if not cache:
        return prepare_rows(model_dir, regime)
    import hashlib

    from llmkd.models.embedded import cache_root

    key = json.dumps([str(Path(model_dir).resolve()), (Path(model_dir) / "config.json").read_text(),
                      asdict(regime), 1], sort_keys=True)
    path = cache_root() / "bench" / f"rows-{regime.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())
    rows = prepare_rows(model_dir, regime)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, path)
    return rows


def write_regime_data(model_dir: str, regime: Regime, path: Path, cache: bool = True) -> dict[str, Any]:
    """Prepare a regime's rows once (in the parent) for every variant's child; return a summary."""
    rows = cached_rows(model_dir, regime, cache)
    path.write_text(json.dumps({"model_dir": model_dir, "regime": asdict(regime), "rows": rows}))
    info = {**asdict(regime),
            "mean_prompt_tokens": statistics.mean(len(r["prompt_ids"]) for r in rows),
            "mean_response_tokens": statistics.mean(len(r["response_ids"]) for r in rows)}
    print(f"[{regime.name}] {len(rows)} rows, prompt ~{info['mean_prompt_tokens']:.0f} tokens, "
          f"response ~{info['mean_response_tokens']:.0f} tokens", flush=True)
    return info


def resolve_model(name: str, quick: bool, workdir: Path) -> str:
    if quick:
        from llmkd.models.tiny import save_tiny_pair

        teacher, _ = save_tiny_pair(workdir / "tiny", teacher_layers=4, pretrain_steps=30)
        return str(teacher)
    from llmkd.models.embedded import resolve_model_name

    return resolve_model_name(name)


def summarize(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per regime and pair: llmkd / TRL ratios of step time and extra peak memory, loss gap."""
    ratios: dict[str, dict] = {}
    for regime, by_variant in results.items():
        for pair, (ours, theirs) in PAIRS.items():
            a, b = by_variant.get(ours), by_variant.get(theirs)
            if not (a and b):
                continue
            ratios[f"{regime}/{pair}"] = {
                "compares": f"{ours} / {theirs}",
                "time_ratio": a["median_step_s"] / b["median_step_s"],
                "cpu_time_ratio": a["median_cpu_step_s"] / b["median_cpu_step_s"],
                "extra_mem_ratio": a["extra_rss_mb"] / max(b["extra_rss_mb"], 1e-9),
                "peak_mem_ratio": a["peak_rss_mb"] / b["peak_rss_mb"],
                "loss_step1_abs_diff": abs(a["loss_step1"] - b["loss_step1"]),
                "comparable_loss": pair == "off",
            }
    return ratios


def print_table(results: dict[str, dict[str, dict]], ratios: dict[str, dict]) -> None:
    head = (f"{'regime':6s} {'variant':13s} {'step s':>8s} {'CPU s':>7s} {'step1 s':>8s} {'extra MB':>9s} "
            f"{'peak MB':>8s} {'loss@1':>11s} {'loss tok/step':>13s} {'padded tok/step':>15s}")
    print(head)
    for regime, by_variant in results.items():
        for variant in VARIANTS:
            r = by_variant.get(variant)
            if r is None:
                continue
            print(f"{regime:6s} {variant:13s} {r['median_step_s']:8.2f} {r['median_cpu_step_s']:7.2f} "
                  f"{r['step1_s']:8.2f} "
                  f"{r['extra_rss_mb']:9.0f} {r['peak_rss_mb']:8.0f} {r['loss_step1']:11.7f} "
                  f"{statistics.mean(r['loss_tokens']):13.0f} {statistics.mean(r['padded_tokens']):15.0f}")
    print(f"\n{'pair':14s} {'compares':28s} {'time':>7s} {'CPU time':>9s} {'extra mem':>10s} "
          f"{'|loss@1 diff|':>14s}")
    for name, r in ratios.items():
        diff = f"{r['loss_step1_abs_diff']:.1e}" if r["comparable_loss"] else "n/a (samples)"
        print(f"{name:14s} {r['compares']:28s} {r['time_ratio']:6.2f}x {r['cpu_time_ratio']:8.2f}x "
              f"{r['extra_mem_ratio']:9.2f}x {diff:>14s}")
    print("targets: llmkd/TRL time <= 0.8x and extra memory <= 1.0x, off-policy step-1 losses equal; "
          "vLLM/HF sampler time <= 0.5x (>= 2x faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="teacher dir (default: embedded)")
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=None,
                        help="default: short long (--quick: short)")
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=None,
                        help="default: off on (the long regime: off, unless --all)")
    parser.add_argument("--all", action="store_true",
                        help="every regime x pair, long on-policy included (HF generate of 512 tokens)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per variant, >= 2 (default 3; --quick: 2)")
    parser.add_argument("--quick", action="store_true", help="tiny random models, smoke run")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda: on a GPU every variant trains in bf16, memory is the GPU's")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--merge", action="store_true",
                        help="keep the other regimes/pairs already in --output (re-measure some pairs)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args)))
        return
    regimes = QUICK_REGIMES if args.quick else REGIMES
    args.steps = args.steps or (2 if args.quick else 3)
    # long on-policy samples 512 tokens per row through transformers' generate: minutes per step
    skip = set() if (args.all or args.pairs or args.regimes) else {("long", "on"), ("long", "sampler")}
    args.regimes = args.regimes or (["short"] if args.quick else list(REGIMES))
    args.pairs = args.pairs or list(PAIRS)
    output = args.output or (RESULTS.with_name("step_vs_trl_quick.json") if args.quick else RESULTS)
    results: dict[str, dict[str, dict]] = {}
    data_info: dict[str, dict] = {}
    previous = json.loads(output.read_text()) if args.merge and output.exists() else {}
    for name, by_variant in previous.get("results", {}).items():   # both sides of a pair or none
        results[name] = {v: r for v, r in by_variant.items()
                         if not (name in args.regimes and any(
                             v in PAIRS[p] and (name, p) not in skip for p in args.pairs))}
        data_info[name] = previous["regimes"][name]
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = resolve_model(args.model, args.quick, Path(tmp))
        for name in args.regimes:
            data = Path(tmp) / f"{name}.json"
            data_info[name] = write_regime_data(model_dir, regimes[name], data, cache=not args.quick)
            results.setdefault(name, {})
            wanted = dict.fromkeys(v for pair in args.pairs if (name, pair) not in skip
                                   for v in PAIRS[pair])
            for variant in wanted:
                r = run_subprocess(["--child", variant, "--data", str(data), "--steps", str(args.steps),
                                    "--device", args.device], script=__file__)
                if r is not None:
                    results[name][variant] = r
                    print(f"  {variant:13s} {r['median_step_s']:.2f} s/step, extra "
                          f"{r['extra_rss_mb']:.0f} MB, loss@1 {r['loss_step1']:.7f}", flush=True)
    ratios = summarize(results)
    print()
    print_table(results, ratios)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "model": "tiny (quick)" if args.quick else args.model, "steps": args.steps, "beta": BETA,
        "device": args.device, "memory": "GPU allocator (MB)" if args.device != "cpu" else "RSS (MB)",
        "cpu_count": os.cpu_count(), "load_avg_1min_at_start": round(load_start, 2),
        "merged_runs": previous.get("merged_runs", 1) + 1 if previous else 1,
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2), "regimes": data_info,
        "results": results, "ratios": ratios}, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
