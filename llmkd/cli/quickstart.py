"""`llmkd quickstart`: the whole pipeline on the embedded default, end to end.

prepare teacher -> generate teacher responses (vLLM) -> distil a layer-dropped student ->
evaluate teacher / student-before / student-after (accuracy on held-out prompts, KL to the
teacher on held-out teacher responses) -> report (markdown table, JSON, PNG plots).
Every stage writes to disk under --out, so a stage can be inspected or rerun on its own.
"""
from __future__ import annotations

import copy
import gc
import json
import time
from pathlib import Path
from typing import Any

from llmkd.validation import check_keys
from llmkd.yaml_reader import apply_overrides, read_yaml_mapping

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
DRAFT_GAMMA = 4   # draft length for the analytic block efficiency (student as a speculative draft)
KEYS = ["recipe", "num_train_prompts", "num_eval_prompts", "generate", "distill", "eval"]
EVAL_KEYS = ["backend", "max_new_tokens"]


def load_quickstart_config(path: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    raw = apply_overrides(read_yaml_mapping(path or DEFAULT_CONFIG, "quickstart config"), overrides)
    check_keys("", raw, KEYS)
    return raw


def _distill_dict(q: dict[str, Any], out: Path, data: dict[str, Any]) -> dict[str, Any]:
    dcfg = copy.deepcopy(q.get("distill") or {})
    if not isinstance(dcfg, dict):
        raise ValueError(f"quickstart config: distill={dcfg!r} must be a mapping of llmkd distill fields")
    # allow_fewer: prompts the teacher could not answer within max_model_len are skipped
    dcfg.setdefault("data", {}).update(num_train=int(q["num_train_prompts"]),
                                       num_eval=int(q["num_eval_prompts"]), allow_fewer=True, **data)
    dcfg.update(output_dir=str(out / "student"), overwrite_output_dir=True, report_to="none")
    return dcfg


def check_stages(q: dict[str, Any], out: Path) -> Any:
    """Every stage's config, validated before the first stage runs: a typo under distill.* must
    not wait for the teacher's generation. Returns the generation config (model: embedded)."""
    from dataclasses import fields

    from llmkd.training.config import config_from_dict
    from llmkd.generation.run import GenerationConfig
    from llmkd.validation import coerce

    gen_raw = q.get("generate") or {}
    if not isinstance(gen_raw, dict):
        raise ValueError(f"quickstart config: generate={gen_raw!r} must be a mapping of llmkd generate fields")
    fixed = {"model": "embedded", "recipe": q["recipe"], "num_prompts": int(q["num_train_prompts"])
             + int(q["num_eval_prompts"]), "offset": 0, "mode": "response", "keep_incorrect": True,
             "output_dir": str(out / "generate")}
    raw = {**gen_raw, **fixed}
    check_keys("generate.", raw, [f.name for f in fields(GenerationConfig)])
    try:
        gen = GenerationConfig(**coerce("generate.", raw, GenerationConfig))
    except ValueError as err:
        raise ValueError(f"{err} (in the quickstart config's generate section)") from None
    try:   # the data is generated later: check the rest with the recipe in its place
        config_from_dict(_distill_dict(q, out, {"path": None, "recipe": q["recipe"]}))
    except ValueError as err:
        raise ValueError(f"{err} (in the quickstart config's distill section)") from None
    check_keys("eval.", q.get("eval") or {}, EVAL_KEYS)
    return gen


def _stage(name: str, timings: dict[str, float], start: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - start, 1)
    print(f"[quickstart] {name} done in {timings[name]:.0f} s", flush=True)
    return now


def run_quickstart(config: str | Path | None, out: str | Path, overrides: list[str]) -> dict[str, Any]:
    q = load_quickstart_config(config, overrides)
    out = Path(out)
    gen = check_stages(q, out)

    from dataclasses import replace

    from llmkd.training.config import config_from_dict
    from llmkd.eval.closeness import teacher_closeness
    from llmkd.eval.reasoning import evaluate_reasoning
    from llmkd.eval.speculative import block_efficiency
    from llmkd.eval.report import write_report
    from llmkd.generation.run import run_generation
    from llmkd.models.embedded import embedded_teacher_dir
    from llmkd.training.pipeline import build_trainer

    n_train, n_eval = int(q["num_train_prompts"]), int(q["num_eval_prompts"])
    timings: dict[str, float] = {}
    t0 = t = time.perf_counter()

    teacher_dir = embedded_teacher_dir()
    t = _stage("prepare teacher", timings, t)

    # Teacher responses for train + held-out prompts in one engine run (rows keep prompt order).
    gen = replace(gen, model=str(teacher_dir))
    run_generation(gen)
    t = _stage("generate", timings, t)

    trainer = build_trainer(config_from_dict(_distill_dict(q, out, {"path": str(out / "generate")})))
    trainer.model.save_pretrained(out / "student-before")
    trainer.processing_class.save_pretrained(out / "student-before")
    closeness = {"student-before": teacher_closeness(trainer.model, trainer.teacher, trainer.eval_dataset,
                                                     trainer.data_collator)}
    trainer.train()
    trainer.save_model(str(out / "student"))
    trainer.save_state()
    closeness["student-after"] = teacher_closeness(trainer.model, trainer.teacher, trainer.eval_dataset,
                                                   trainer.data_collator)
    del trainer
    gc.collect()
    t = _stage("distill", timings, t)

    ev = q.get("eval", {})
    models = {"teacher": teacher_dir, "student-before": out / "student-before", "student-after": out / "student"}
    results = {}
    for label, path in models.items():
        res = evaluate_reasoning(str(path), q["recipe"], backend=ev.get("backend", "vllm"),
                                 num_examples=n_eval, offset=n_train, seed=gen.seed,
                                 max_new_tokens=int(ev.get("max_new_tokens", 48)),
                                 output_dir=out / "eval" / label, label=label, overwrite=True)
        close = closeness.get(label, {"kl": 0.0, "top1_agreement": 1.0, "acceptance": 1.0})
        res.update(kl_to_teacher=close["kl"], top1_agreement=close["top1_agreement"],
                   acceptance_rate=close["acceptance"],
                   block_efficiency=block_efficiency(close["acceptance"], DRAFT_GAMMA))
        (out / "eval" / label / "metrics.json").write_text(json.dumps(res, indent=2))
        results[label] = res
    t = _stage("evaluate", timings, t)

    write_report([out], out / "report")
    timings["total"] = round(time.perf_counter() - t0, 1)
    summary = {"recipe": q["recipe"], "timings_s": timings, "closeness": closeness,
               "accuracy": {k: {m: v[m] for m in ("accuracy", "ci_low", "ci_high", "n")}
                            for k, v in results.items()}}
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2))
    print((out / "report" / "report.md").read_text())
    before, after = closeness["student-before"]["kl"], closeness["student-after"]["kl"]
    print(f"[quickstart] held-out KL(teacher || student): {before:.3f} -> {after:.3f} "
          f"({100 * (1 - after / before):.0f}% lower); total {timings['total']:.0f} s; "
          f"report: {out / 'report' / 'report.md'}")
    return summary
