"""Compare runs: a markdown table, a JSON summary and PNG plots from run directories.

A *run dir* holds any of these (found at any depth, except under `checkpoint-*/` and inside an
earlier report):

- ``metrics.json`` — one evaluation, as written by `evaluate_reasoning` (e.g.
  ``eval/<label>/metrics.json``). Keys read: ``accuracy``, ``ci_low``, ``ci_high``, ``n``,
  ``label`` (else the directory name), ``model``, ``recipe``, ``backend`` and, when present,
  the teacher-agreement numbers in `EXTRA_COLUMNS` (``teacher``, ``kl_to_teacher``,
  ``top1_agreement``, ``acceptance_rate``, ``block_efficiency``; from ``llmkd eval --teacher``
  or ``--speculative``). Any key may be missing; the table shows "—".
- ``trainer_state.json`` (from `transformers.Trainer`, e.g. ``train/trainer_state.json``) or
  ``log_history.json`` (a list of Trainer log dicts, or ``{"log_history": [...]}``): every
  numeric key (``loss``, ``kl``, ``taid_t``, ``eval_kl``, ...) is plotted against ``step``.
  When it holds a golden metric (``eval_golden_*``, from the ``monitor:`` section) the proxy
  (``eval_proxy_kl``, else ``eval_loss``) and the golden curve are drawn together and the
  teacher-hacking detector (`llmkd.eval.monitor`) gives the step where hacking began.

Outputs in the report dir: ``report.md``, ``report.json``, ``accuracy.png`` (bars with CI error
bars, grouped by recipe), ``training_curves.png`` (one panel per logged key, one line per run) and
``proxy_vs_golden.png`` (one panel per monitored run, the hacking onset marked).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from llmkd.eval.monitor import PATIENCE, detect_hacking, evaluations

EXTRA_COLUMNS = {"teacher": "Teacher", "kl_to_teacher": "KL to teacher",
                 "top1_agreement": "top-1 agreement", "acceptance_rate": "α (acceptance)",
                 "block_efficiency": "τ (block eff.)", "tokens_per_target_call": "tokens / target call",
                 "speedup": "speed-up vs target alone"}
TRAIN_LOGS = ("trainer_state.json", "log_history.json")
# Trainer bookkeeping, not curves: the x axis, and the one-off end-of-training summary.
NOT_CURVES = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second",
              "train_steps_per_second", "train_loss"}


def _skipped(path: Path, root: Path) -> bool:
    """Checkpoint copies and earlier reports are not runs of their own."""
    parts = path.relative_to(root).parts[:-1]
    return any(p.startswith("checkpoint-") for p in parts) or any(
        (root.joinpath(*parts[:i + 1]) / "report.json").exists() for i in range(len(parts)))


def _find(root: Path, names: tuple[str, ...]) -> list[Path]:
    return sorted(p for name in names for p in root.rglob(name) if not _skipped(p, root))


def _eval_rows(root: Path, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for path in _find(root, ("metrics.json",)):
        m = json.loads(path.read_text())
        label = m.get("label") or (path.parent.name if path.parent != root else root.resolve().name)
        rows.append({**m, "label": prefix + label, "path": str(path)})
    return rows


def _train_logs(root: Path, prefix: str) -> list[dict[str, Any]]:
    logs = []
    for path in _find(root, TRAIN_LOGS):
        raw = json.loads(path.read_text())
        history = raw.get("log_history", []) if isinstance(raw, dict) else raw
        curves: dict[str, list[tuple[float, float]]] = {}
        for i, entry in enumerate(history):
            step = entry.get("step", i)
            for key, value in entry.items():
                if (key not in NOT_CURVES and isinstance(value, (int, float))
                        and not isinstance(value, bool) and math.isfinite(value)):
                    curves.setdefault(key, []).append((step, float(value)))
        golden, proxy, evals = evaluations(history)
        patience = _patience(path.parent)
        hacking = detect_hacking(evals, patience) if evals else None
        rel = path.parent.relative_to(root)
        base = root.resolve().name
        label = base if str(rel) in (".", "train") else f"{prefix}{rel}"
        logs.append({"label": label, "path": str(path), "curves": curves,
                     "steps": max((s for c in curves.values() for s, _ in c), default=0),
                     "last": {k: c[-1][1] for k, c in curves.items()},
                     "monitor": None if golden is None else {
                         "golden": golden, "proxy": proxy,
                         "best_step": min(evals, key=lambda e: e.golden).step if evals else None,
                         "patience": patience,
                         "hacking": None if hacking is None else dataclasses.asdict(hacking)}})
    return logs


def _patience(run: Path) -> int:
    """The run's own monitor.patience (its training_args.json), so the report flags hacking where
    the run did; the default when the log stands alone."""
    try:
        monitor = json.loads((run / "training_args.json").read_text()).get("monitor") or {}
        value = monitor.get("patience")
    except (OSError, ValueError, AttributeError):
        return PATIENCE
    return value if isinstance(value, int) and value >= 1 else PATIENCE


def _fmt(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _acc_cell(row: dict[str, Any]) -> str:
    acc = row.get("accuracy")
    if acc is None:
        return "—"
    ci = (f" [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
          if row.get("ci_low") is not None and row.get("ci_high") is not None else "")
    return f"{100 * acc:.1f} %{ci}"


def _markdown(evals: list[dict], logs: list[dict], plots: list[str]) -> str:
    lines = ["# llmkd report", ""]
    if evals:
        extra = [k for k in EXTRA_COLUMNS if any(k in r for r in evals)]
        head = ["Model", "Recipe", "Accuracy (95 % CI)", "n", *(EXTRA_COLUMNS[k] for k in extra),
                "Backend"]
        lines += ["## Evaluation", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join("---" for _ in head) + "|"]
        for r in evals:
            cells = [r["label"], r.get("recipe", "—"), _acc_cell(r), _fmt(r.get("n")),
                     *(_fmt(r.get(k)) for k in extra), r.get("backend", "—")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        on = sorted({r["closeness_on"] for r in evals if r.get("closeness_on")})
        if on:
            lines += ["", f"KL to teacher is KL(teacher ‖ model) in nats per token, on the {', '.join(on)}."]
        lines.append("")
    if logs:
        keys = sorted({k for log in logs for k in log["last"]})
        head = ["Run", "Steps", *(f"last {k}" for k in keys)]
        lines += ["## Training", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join("---" for _ in head) + "|"]
        for log in logs:
            cells = [log["label"], _fmt(log["steps"]), *(_fmt(log["last"].get(k)) for k in keys)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    monitored = [log for log in logs if log.get("monitor")]
    if monitored:
        lines += ["## Teacher hacking (proxy vs golden)", "",
                  "| Run | Golden | Proxy | Best golden at step | Hacking began at step |", "|---|---|---|---|---|"]
        for log in monitored:
            m = log["monitor"]
            began = m["hacking"]["began_step"] if m["hacking"] else f"not detected (patience {m['patience']})"
            lines.append(f"| {log['label']} | {m['golden']} | {m['proxy']} | {_fmt(m['best_step'])} | {began} |")
        lines.append("")
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot_accuracy(evals: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: recipes on the x axis, one bar per model, Wilson CI as error bars."""
    from matplotlib.figure import Figure

    rows = [r for r in evals if r.get("accuracy") is not None]
    recipes = list(dict.fromkeys(r.get("recipe", "?") for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    width = 0.8 / max(1, len(labels))
    fig = Figure(figsize=(max(5.0, 1.6 * len(recipes) * max(1, len(labels)) ** 0.5), 4.0), dpi=120)
    ax = fig.add_subplot()
    for j, label in enumerate(labels):
        xs, ys, lo, hi = [], [], [], []
        for i, recipe in enumerate(recipes):
            for r in rows:
                if r["label"] == label and r.get("recipe", "?") == recipe:
                    acc = r["accuracy"]
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(acc)
                    lo.append(acc - r.get("ci_low", acc))
                    hi.append(r.get("ci_high", acc) - acc)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(range(len(recipes)), recipes)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95 % Wilson CI)")
    ax.set_title("Reasoning accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def plot_training(logs: list[dict[str, Any]], path: Path) -> None:
    """One panel per logged key against step; one line per run."""
    from matplotlib.figure import Figure

    keys = sorted({k for log in logs for k in log["curves"]})
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * nrows), dpi=110)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for log in logs:
            if key in log["curves"]:
                steps, values = zip(*log["curves"][key])
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=log["label"])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(logs) > 1:
            ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)


def plot_proxy_vs_golden(logs: list[dict[str, Any]], path: Path) -> None:
    """One panel per monitored run: proxy (left axis) and golden (right axis) against step, a
    dashed line where the detector says hacking began."""
    from matplotlib.figure import Figure

    runs = [log for log in logs if log.get("monitor")]
    fig = Figure(figsize=(5.0 * min(3, len(runs)), 3.4 * math.ceil(len(runs) / 3)), dpi=110)
    for i, log in enumerate(runs):
        m = log["monitor"]
        ax = fig.add_subplot(math.ceil(len(runs) / 3), min(3, len(runs)), i + 1)
        for axis, key, colour in ((ax, m["proxy"], "tab:blue"), (ax.twinx(), m["golden"], "tab:red")):
            steps, values = zip(*log["curves"][key])
            axis.plot(steps, values, marker=".", color=colour)
            axis.set_ylabel(key, color=colour)
        if m["hacking"]:
            ax.axvline(m["hacking"]["began_step"], color="k", linestyle="--", alpha=0.6)
        ax.set_title(f"{log['label']}: hacking " + (f"from step {m['hacking']['began_step']}"
                                                     if m["hacking"] else "not detected"), fontsize="small")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Collect evals and training logs from `run_dirs`, write report.md/.json and PNGs to `out_dir`.

    `out_dir` may hold an earlier report (it is refreshed) but no other files.
    """
    roots = [Path(d).expanduser() for d in run_dirs]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"run dir {str(root)!r} does not exist")
    out = Path(out_dir).expanduser()
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").exists():
        raise FileExistsError(f"report dir {str(out)!r} exists and holds other files; choose another "
                              "--out (nothing was written)")
    evals: list[dict] = []
    logs: list[dict] = []
    for root in roots:
        prefix = f"{root.resolve().name}/" if len(roots) > 1 else ""
        evals += _eval_rows(root, prefix)
        logs += _train_logs(root, prefix)
    if not evals and not logs:
        raise ValueError(f"no metrics.json, trainer_state.json or log_history.json found under "
                         f"{[str(r) for r in roots]}; see `llmkd.eval.report` for the run-dir layout")
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if any(r.get("accuracy") is not None for r in evals):
        plot_accuracy(evals, out / "accuracy.png")
        plots.append("accuracy.png")
    if any(log["curves"] for log in logs):
        plot_training(logs, out / "training_curves.png")
        plots.append("training_curves.png")
    if any(log.get("monitor") for log in logs):
        plot_proxy_vs_golden(logs, out / "proxy_vs_golden.png")
        plots.append("proxy_vs_golden.png")
    summary = {"run_dirs": [str(r) for r in roots], "evals": evals,
               "training": [{k: v for k, v in log.items() if k != "curves"} for log in logs],
               "plots": plots}
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(evals, logs, plots))
    return summary
