"""Teacher-hacking monitor, the torch-free half: metric names, config checks, the detector.

The student is trained towards the teacher (the *proxy*: held-out KL to the teacher), but the
teacher only stands in for what the user wants (the *golden* metric: loss on gold answers, task
accuracy, or KL to a better oracle model). Tiapkin et al. (2025, "On Teacher Hacking in Language
Model Distillation") show that many epochs over a fixed offline dataset make the proxy keep
improving while the golden metric gets worse. `detect_hacking` flags exactly that pattern in the
series of evaluations; `llmkd.eval.golden` measures the metrics during training.

Everything here is plain Python so that config validation (which must not import torch) and the
report (which reads logged JSON) can use it.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GOLDEN = ("gold_nll", "accuracy", "oracle_kl")
ON_HACKING = ("warn", "stop")
# golden kind -> the key logged beside the proxy (and usable as metric_for_best_model)
GOLDEN_KEYS = {"gold_nll": "eval_golden_nll", "accuracy": "eval_golden_accuracy",
               "oracle_kl": "eval_golden_oracle_kl"}
HIGHER_IS_BETTER = {"eval_golden_accuracy"}
PATIENCE = 3                        # monitor.patience's default (also what the report uses)
SE_SUFFIX = "_se"                   # eval_golden_nll_se: the metric's standard error at that eval
PROXY_KEY = "eval_proxy_kl"         # KL(teacher || student) on the held-out set (live teacher)
FALLBACK_PROXY = "eval_loss"        # the method's own held-out divergence (offline / served teacher)
Z = 3.0   # "beyond its noise": > Z standard errors of the difference (the best so far is a
          # minimum of noisy values, biased low: at Z=2 pure noise fired on 13 % of 30-eval runs)


# -- config-time checks (no model library) ----------------------------------------------------------
def check_monitor(spec: Any, top: dict[str, Any], model: Any, data: Any) -> None:
    """Validate the `monitor:` section against the rest of the config; one line per problem.
    Sets `greater_is_better` when metric_for_best_model names a golden metric (transformers'
    default, "greater unless the name ends in loss", would pick the worst checkpoint)."""
    best = top.get("metric_for_best_model")
    best_key = None if best is None else (best if best.startswith("eval_") else f"eval_{best}")
    if spec.golden is None:
        if best_key in GOLDEN_KEYS.values() or best_key == PROXY_KEY:
            raise ValueError(f"config: metric_for_best_model={best!r} is logged by the monitor, but "
                             "monitor.golden is not set; e.g. monitor: {golden: gold_nll}")
        return
    if spec.golden not in GOLDEN:
        raise ValueError(f"config: monitor.golden={spec.golden!r} is unknown; use one of {', '.join(GOLDEN)}")
    if spec.on_hacking not in ON_HACKING:
        raise ValueError(f"config: monitor.on_hacking={spec.on_hacking!r} is unknown; use warn or stop")
    for key in ("patience", "num_prompts", "max_new_tokens"):
        value = getattr(spec, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config: monitor.{key}={value!r} must be an integer >= 1")
    if top.get("eval_strategy", "no") == "no":
        raise ValueError(f"config: monitor.golden={spec.golden} is measured on the eval schedule, but "
                         "eval_strategy is 'no' (no eval set is used); set eval_strategy: steps and "
                         "eval_steps: N (the held-out split is data.num_eval)")
    if spec.golden == "oracle_kl":
        _check_oracle(spec, model)
    elif spec.oracle is not None:
        raise ValueError(f"config: monitor.oracle is only used by golden=oracle_kl (found golden="
                         f"{spec.golden}); drop monitor.oracle or set monitor.golden: oracle_kl")
    else:
        problem = gold_answers_problem(data)
        if problem:
            raise ValueError(f"config: monitor.golden={spec.golden} needs the recipe's gold answers, but "
                             f"{problem}; use golden: oracle_kl, or a recipe whose rows have answers")
    if best_key is not None and best_key.startswith("eval_golden_") and best_key != GOLDEN_KEYS[spec.golden]:
        raise ValueError(f"config: metric_for_best_model={best!r} but monitor.golden={spec.golden} logs "
                         f"{GOLDEN_KEYS[spec.golden]!r}; use that name")
    if best_key in GOLDEN_KEYS.values() or best_key == PROXY_KEY:
        top.setdefault("greater_is_better", best_key in HIGHER_IS_BETTER)


def _check_oracle(spec: Any, model: Any) -> None:
    from llmkd.preflight import check_model_dir

    if spec.oracle is None:
        raise ValueError("config: monitor.golden=oracle_kl needs monitor.oracle, a model directory "
                         "(or 'embedded') better than the teacher, with the student's tokenizer")
    oracle = _local_dir(spec.oracle)
    if oracle is None:
        if spec.oracle == "embedded":
            return          # converted on first use; the pipeline compares tokenizers after that
        raise ValueError(f"config: monitor.oracle={spec.oracle!r} is not a model directory; give a "
                         "local directory with config.json + safetensors, or 'embedded'")
    check_model_dir(str(oracle), "monitor.oracle")
    student = _local_dir(model.student if model.student is not None else model.teacher)
    if student is None:
        return
    ours, theirs = tokenizer_vocab(student), tokenizer_vocab(oracle)
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(f"config: monitor.oracle={spec.oracle!r} has a different tokenizer from the "
                         f"student's ({len(theirs)} vs {len(ours)} tokens, or other ids): oracle_kl "
                         "compares next-token distributions id by id; use an oracle with the student's tokenizer")


def _local_dir(name: str | None) -> Path | None:
    if name is None:
        return None
    if name == "embedded":
        from llmkd.models.embedded import EMBEDDED_NAME, cache_root

        cached = cache_root() / "models" / EMBEDDED_NAME
        return cached if (cached / "config.json").exists() else None
    p = Path(name).expanduser()
    return p if p.is_dir() else None


def tokenizer_vocab(model_dir: Path) -> dict[str, int] | None:
    """token -> id (tokenizer.json, or vocab.json), read as JSON; None when neither file exists."""
    try:
        if (model_dir / "tokenizer.json").exists():
            data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab")
            vocab = dict(vocab) if isinstance(vocab, dict) else {p: i for i, (p, _) in enumerate(vocab or [])}
            return vocab | {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
        if (model_dir / "vocab.json").exists():
            return json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return None


def gold_answers_problem(data: Any) -> str | None:
    """Why the configured data has no gold answers, or None. Generated dirs keep the gold in a
    `gold` column; recipes read `answer_field` from their rows (local files are peeked at)."""
    path = Path(data.path).expanduser() if data.path else None
    if path is not None and (path / "manifest.json").exists():
        return None         # `llmkd generate` stores every row's gold answer
    from llmkd.data.recipes import load_recipe

    recipe = load_recipe(data.recipe or "arithmetic", path=data.path)
    if not recipe.path:
        return None         # reasoning_gym generates answers; hub columns are checked when loaded
    local = Path(recipe.path).expanduser()
    files = sorted(local.rglob("*.json*")) if local.is_dir() else [local]
    if not files or files[0].suffix not in (".json", ".jsonl"):
        return None
    try:
        text = files[0].read_text(encoding="utf-8")
        first = json.loads(text.splitlines()[0]) if files[0].suffix == ".jsonl" else json.loads(text)
        first = first[0] if isinstance(first, list) and first else first
    except (OSError, ValueError, IndexError):
        return None
    if isinstance(first, dict) and first.get(recipe.answer_field) in (None, ""):
        return (f"recipe {recipe.name}'s rows ({files[0]}) have no {recipe.answer_field!r} "
                f"(its answer_field); found columns {sorted(first)}")
    return None


# -- detection ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """One evaluation: the proxy and the golden metric oriented so that lower is better."""

    step: int
    proxy: float
    golden: float
    se: float | None = None     # the golden metric's standard error (None: estimated from the series)


@dataclass(frozen=True)
class Hacking:
    """Proxy better, golden worse than at `best_step` beyond noise, from `began_step` on, for
    `patience` evaluations in a row (flagged at `flagged_step`)."""

    began_step: int
    flagged_step: int
    best_step: int
    golden_best: float
    golden_now: float
    proxy_best_golden: float
    proxy_now: float


def _jitter(golden: list[float]) -> float:
    """Noise of a series with no standard errors: robust sd of one value from consecutive
    differences (MAD / 0.6745 / sqrt 2), so a steady trend barely counts as noise."""
    diffs = [abs(b - a) for a, b in zip(golden, golden[1:])]
    return statistics.median(diffs) / 0.6745 / math.sqrt(2) if len(diffs) >= 2 else 0.0


def detect_hacking(evals: list[Evaluation], patience: int, z: float = Z) -> Hacking | None:
    """The first point where, for `patience` evaluations in a row, the proxy is better than at the
    best golden evaluation so far while the golden metric is worse than that best by more than
    `z` standard errors of the difference. A new golden best resets the count."""
    fallback = _jitter([e.golden for e in evals])
    best = streak_start = None
    streak = 0
    for i, e in enumerate(evals):
        if best is None or e.golden < evals[best].golden:
            best, streak = i, 0
            continue
        ref = evals[best]
        noise = z * math.hypot(e.se if e.se is not None else fallback, ref.se if ref.se is not None else fallback)
        if e.proxy < ref.proxy and e.golden - ref.golden > noise:
            streak_start = i if streak == 0 else streak_start
            streak += 1
            if streak >= patience:
                return Hacking(began_step=evals[streak_start].step, flagged_step=e.step,
                               best_step=ref.step, golden_best=ref.golden, golden_now=e.golden,
                               proxy_best_golden=ref.proxy, proxy_now=e.proxy)
        else:
            streak = 0
    return None


def evaluations(log_history: list[dict[str, Any]]) -> tuple[str | None, str | None, list[Evaluation]]:
    """(golden key, proxy key, evaluations) from Trainer log entries (trainer_state.json's
    log_history): the entries that carry both a golden metric and a proxy."""
    golden = next((k for e in log_history for k in e if k in HIGHER_IS_BETTER or k in GOLDEN_KEYS.values()), None)
    if golden is None:
        return None, None, []
    proxy = PROXY_KEY if any(PROXY_KEY in e for e in log_history) else FALLBACK_PROXY
    sign = -1.0 if golden in HIGHER_IS_BETTER else 1.0
    out = [Evaluation(step=int(e.get("step", i)), proxy=float(e[proxy]), golden=sign * float(e[golden]),
                      se=e.get(golden + SE_SUFFIX))
           for i, e in enumerate(log_history) if golden in e and proxy in e]
    return golden, proxy, out


def describe(h: Hacking, golden_key: str, proxy_key: str) -> str:
    """The one-line warning."""
    sign = -1.0 if golden_key in HIGHER_IS_BETTER else 1.0
    return (f"llmkd: teacher hacking from step {h.began_step} (flagged at step {h.flagged_step}): "
            f"{proxy_key} improved {h.proxy_best_golden:.4g} -> {h.proxy_now:.4g} while {golden_key} "
            f"worsened beyond its noise {sign * h.golden_best:.4g} -> {sign * h.golden_now:.4g} since "
            f"its best at step {h.best_step}; keep that checkpoint: load_best_model_at_end=true, "
            f"metric_for_best_model={golden_key.removeprefix('eval_')}")
