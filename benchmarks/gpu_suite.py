"""The GPU rows in one run: the KD loss vs its matmul floor, TRL and Liger, then a whole KD step.

Run through `benchmarks/gpu_suite.sh` (it installs the carried peer wheels first). Every row is
its own subprocess (peak memory belongs to it alone; a crash or an OOM costs one row):
  loss   at three shapes, bf16, fwd+bwd of JSD beta 0.5 from hidden states + lm_head
         (`loss_memory.py --child`): the matmul floor, llmkd eager (fused off), llmkd fused,
         TRL's chunked loss, Liger's LigerFusedLinearJSD; median time and allocator peak
  step   random models of Qwen2.5-1.5B -> Qwen2.5-0.5B shape on synthetic token rows
         (`step_vs_trl.py`'s trainers): llmkd vs TRL GKD off-policy, llmkd vs TRL's
         DistillationTrainer on-policy, each step split into phases (sampling, teacher and
         student forwards, loss, backward, optimizer, gc pauses, empty_cache calls) with a
         device sync around each, so a stall lands in a named phase or in "other".
A peer that is not importable (Liger on a CPU) is a row with a "skipped" note. Rows past
``--budget-s`` are skipped too, so the JSON is always written. It prints, it never asserts.

    bash benchmarks/gpu_suite.sh --output $OUT/gpu_suite.json      # one H200: ~6 min
    bash benchmarks/gpu_suite.sh --device cpu --tiny                # smoke run, ~1-2 min on 2 cores
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import loss_memory
import step_vs_trl
from common import run_subprocess

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_suite.json"
# (batch, seq, vocab, student hidden, teacher hidden)
SHAPES = {"smollm2_135m": (4, 1024, 49152, 576, 576),
          "qwen2.5_1.5b_to_0.5b": (4, 2048, 151936, 896, 2048),
          "liger_h4096": (2, 4096, 128256, 4096, 4096)}
# one vocabulary: the fused graph is static in V only, so the three shapes share one compile
TINY_SHAPES = {"smollm2_135m": (1, 48, 512, 32, 32), "qwen2.5_1.5b_to_0.5b": (1, 64, 512, 32, 48),
               "liger_h4096": (2, 40, 512, 48, 48)}
LOSS_VARIANTS = ("floor", "llmkd", "llmkd_fused", "trl", "liger")
PEERS = {"trl": "trl", "liger": "liger_kernel"}
# Qwen2.5-1.5B / -0.5B configs (random weights: no hub on the GPU machine), tiny stand-ins
QWEN = {"teacher": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2),
        "student": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                        num_attention_heads=14, num_key_value_heads=2)}
TINY_QWEN = {"teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1),
             "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)}
STEP_PAIRS = ("llmkd_off", "trl_gkd", "llmkd_on", "trl_distill")


def skip_reason(variant: str, device: str) -> str | None:
    """Why a peer's row cannot run here, or None."""
    module = PEERS.get(variant)
    if module and importlib.util.find_spec(module) is None:
        return f"{module} is not installed (the suite installs it from wheels/, see gpu_suite.sh)"
    if variant == "liger" and device == "cpu":
        return "Liger's kernels are Triton: GPU only"
    return None


def loss_rows(args: argparse.Namespace, deadline: float) -> dict[str, dict]:
    """Every loss variant at every shape; ratios to the floor measured in the same run."""
    shapes = TINY_SHAPES if args.tiny else SHAPES
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    out: dict[str, dict] = {}
    for shape, (b, s, v, h, ht) in shapes.items():
        rows: dict[str, dict] = {}
        for variant in LOSS_VARIANTS:
            reason = skip_reason(variant, args.device) or (
                "time budget spent" if time.monotonic() > deadline else None)
            if reason:
                rows[variant] = {"skipped": reason}
                continue
            errors: list[str] = []
            r = run_subprocess(
                ["--child", variant, "--batch", str(b), "--seq", str(s), "--vocab", str(v),
                 "--hidden", str(h), "--teacher-hidden", str(ht), "--chunk-size", str(args.chunk_size),
                 "--device", args.device, "--dtype", dtype, "--repeats", str(args.repeats)],
                script=loss_memory.__file__, timeout=args.row_timeout_s, errors=errors)
            rows[variant] = r if r is not None else {"failed": errors[-1] if errors else "?"}
            if r is not None:
                print(f"[{shape}] {variant:12s} {r['time_s'] * 1e3:9.2f} ms  peak {r['peak_rss_mb']:8.0f} MB"
                      f"  loss {r['loss']}", flush=True)
        floor = rows.get("floor", {}).get("time_s")
        for r in rows.values():
            if "time_s" in r and floor:
                r["time_vs_floor"] = r["time_s"] / floor
        out[shape] = {"batch": b, "seq": s, "vocab": v, "hidden": h, "teacher_hidden": ht,
                      "dtype": dtype, "rows": rows}
    return out


# -- the KD step, phase by phase ------------------------------------------------------------------
def phase_profiler(trainer: Any, device: str) -> Callable[[list[float]], dict]:
    """Time each phase of every step with a device sync on both sides (measurement only: the
    syncs serialise what would overlap, so phases sum to a little more than a plain step)."""
    import torch

    cuda = device != "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = [0]
    phases: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    depth = [0]   # forwards inside generate belong to "sample"

    def add(name: str, seconds: float) -> None:
        phases[name][step[0]] += seconds

    def wrap(obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a: Any, **k: Any) -> Any:
            sync()
            start = time.perf_counter()
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                sync()
                add(name, time.perf_counter() - start)
        setattr(obj, attr, timed)

    def hooks(module: Any, name: str) -> None:
        started: list[float] = []

        def pre(*_: Any) -> None:
            if depth[0] == 0:
                sync()
                started.append(time.perf_counter())

        def post(*_: Any) -> None:
            if depth[0] == 0 and started:
                sync()
                add(name, time.perf_counter() - started.pop())
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    teacher = getattr(trainer, "teacher", None) or getattr(trainer, "teacher_model", None)
    wrap(trainer.model, "generate", "sample")
    hooks(teacher, "teacher_forward")
    hooks(trainer.model, "student_forward")
    wrap(trainer.accelerator, "backward", "backward")
    if cuda:
        wrap(torch.cuda, "empty_cache", "empty_cache")
    gc_start: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start.append(time.perf_counter())
        elif gc_start:
            add("gc", time.perf_counter() - gc_start.pop())
    gc.callbacks.append(on_gc)

    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        opt_start = 0.0

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            phases.clear()   # set-up (model loading, imports) belongs to no step

        def on_pre_optimizer_step(self, *a: Any, **k: Any) -> None:
            sync()
            self.opt_start = time.perf_counter()

        def on_optimizer_step(self, *a: Any, **k: Any) -> None:
            sync()
            add("optimizer", time.perf_counter() - self.opt_start)

        def on_step_end(self, *a: Any, **k: Any) -> None:
            step[0] += 1
    trainer.add_callback(Steps())

    def finish(step_s: list[float]) -> dict:
        gc.callbacks.remove(on_gc)
        table = []
        for i, wall in enumerate(step_s):
            row = {name: round(by_step.get(i, 0.0), 4) for name, by_step in sorted(phases.items())}
            # gc pauses happen inside the other phases: reported, not subtracted
            row["other"] = round(wall - sum(v for k, v in row.items() if k != "gc"), 4)
            table.append({"step": i + 1, "wall_s": round(wall, 4), **row})
        return {"phases_per_step": table}
    return finish


def synthetic_tokenizer(vocab: int) -> Any:
    """A byte-level BPE tokenizer of exactly ``vocab`` ids and no merges (the chat markers, the
    256 byte symbols, then filler tokens): llmkd compares the tokenizer's rows only, so it must
    cover the whole head. Text tokenizes byte by byte; sampled filler ids decode to filler."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmkd.models.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

    symbols = [*SPECIAL_TOKENS, *pre_tokenizers.ByteLevel.alphabet()]
    symbols += [f"<filler{i}>" for i in range(vocab - len(symbols) - 1)]
    symbols.append("<|endoftext|>")   # what AutoTokenizer adds when config.json says qwen2
    inner = Tokenizer(models.BPE({t: i for i, t in enumerate(symbols)}, []))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<|begin|>", eos_token="<|end|>",
                                  pad_token="<|pad|>", additional_special_tokens=SPECIAL_TOKENS[3:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_random_pair(root: Path, tiny: bool) -> str:
    """Random Qwen2-architecture teacher (root) and student (root/student), bf16 safetensors, and
    a tokenizer of the same vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    vocab = 512 if tiny else 151936
    tok = synthetic_tokenizer(vocab)
    for name, dims in (TINY_QWEN if tiny else QWEN).items():
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=4096,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **dims)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(root / ("student" if name == "student" else ""))
    tok.save_pretrained(root)
    return str(root)


def step_rows(args: argparse.Namespace, deadline: float, workdir: Path) -> dict[str, Any]:
    """Off- and on-policy KD steps, llmkd vs TRL, on the same synthetic rows."""
    import random

    from transformers import AutoTokenizer

    batch, prompt_words, response, new = (2, 4, 24, 8) if args.tiny else (8, 20, 960, 128)
    steps = 3 if args.tiny else 4
    regime = step_vs_trl.Regime("qwen_synthetic", "arithmetic", rows=batch * steps, batch=batch,
                                response_tokens=response, max_new_tokens=new)
    model_dir = save_random_pair(workdir / "pair", args.tiny)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    rows = []
    for _ in range(regime.rows):
        text = " ".join(str(rng.randrange(100)) for _ in range(prompt_words))
        messages = [{"role": "user", "content": text}]
        ids = [rng.randrange(10, len(tok)) for _ in range(response - 1)] + [tok.eos_token_id]
        rows.append({"messages": messages, "prompt_ids": step_vs_trl.prompt_ids(tok, messages),
                     "response_ids": ids})
    data = workdir / "rows.json"
    data.write_text(json.dumps({"model_dir": model_dir, "regime": asdict(regime), "rows": rows}))
    results: dict[str, Any] = {"regime": asdict(regime), "steps": steps,
                               "models": "Qwen2.5-1.5B -> Qwen2.5-0.5B configs, random weights, "
                                         "bf16 mixed precision" if not args.tiny else "tiny Qwen2"}
    for variant in STEP_PAIRS:
        reason = (skip_reason("trl", args.device) if variant.startswith("trl") else None) or (
            "time budget spent" if time.monotonic() > deadline else None)
        if reason:
            results[variant] = {"skipped": reason}
            continue
        errors: list[str] = []
        r = run_subprocess(["--child", variant, "--data", str(data), "--steps", str(steps),
                            "--device", args.device], script=__file__,
                           timeout=args.row_timeout_s, errors=errors)
        results[variant] = r if r is not None else {"failed": errors[-1] if errors else "?"}
        if r is not None:
            print(f"[step] {variant:12s} median {r['median_step_s']:.3f} s/step, extra "
                  f"{r['extra_rss_mb']:.0f} MB, step times {[p['wall_s'] for p in r['phases_per_step']]}",
                  flush=True)
    for pair, (ours, theirs) in {"off": ("llmkd_off", "trl_gkd"), "on": ("llmkd_on", "trl_distill")}.items():
        a, b = results.get(ours, {}), results.get(theirs, {})
        if "median_step_s" in a and "median_step_s" in b:
            results[f"{pair}_time_ratio"] = a["median_step_s"] / b["median_step_s"]
            results[f"{pair}_extra_mem_ratio"] = a["extra_rss_mb"] / max(b["extra_rss_mb"], 1e-9)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda | cpu (with --tiny: the smoke run)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and models (CPU smoke run)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="llmkd token chunk")
    parser.add_argument("--repeats", type=int, default=None, help="timed loss runs (median); GPU 10")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="rows not started by then are skipped (the JSON is always written)")
    parser.add_argument("--row-timeout-s", type=float, default=150.0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["loss", "step"])
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--child", choices=STEP_PAIRS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step_vs_trl.run_child(args, instrument=phase_profiler)))
        return
    args.repeats = args.repeats or (1 if args.device == "cpu" else 10)
    output = args.output or (RESULTS.with_name("gpu_suite_tiny.json") if args.tiny else RESULTS)
    start = time.monotonic()
    deadline = start + args.budget_s
    import torch

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
        "torch": torch.__version__, "tiny": args.tiny, "chunk_size": args.chunk_size,
        "beta": loss_memory.BETA, "memory": "GPU allocator peak (MB)" if args.device != "cpu" else "ru_maxrss (MB)",
        "peers": {m: (importlib.util.find_spec(m) is not None) for m in PEERS.values()}}
    if "loss" not in args.skip:
        report["loss"] = loss_rows(args, deadline)
    if "step" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            report["step"] = step_rows(args, deadline, Path(tmp))
    report["wall_s"] = round(time.monotonic() - start, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = output.with_suffix(f".tmp{os.getpid()}")
    tmp_out.write_text(json.dumps(report, indent=2))
    os.replace(tmp_out, output)
    print(f"wrote {output} ({report['wall_s']} s)")
    for shape, block in report.get("loss", {}).items():
        cells = [f"{v} {r['time_vs_floor']:.2f}x" for v, r in block["rows"].items() if "time_vs_floor" in r]
        print(f"{shape:22s} time / floor: {', '.join(cells)}")


if __name__ == "__main__":
    main()
