"""`llmkd eval` (reasoning accuracy of models on recipes) and `llmkd report` (compare run dirs).

Eval YAML (every key optional except models/model and recipes)::

    models: {teacher: embedded, student: runs/quickstart/student}   # or a list of dirs
    recipes: [arithmetic, syllogism]      # names in data_recipes/ or recipe YAML paths
    backend: vllm                         # vllm | hf
    num_examples: 100
    offset: 0
    seed: 0
    max_new_tokens: 256
    batch_size: 16                        # hf backend only
    use_chat_template: true
    prompt_prefix: ""                     # before every prompt, e.g. "[label] " (rationale method)
    out: runs/eval                        # results in OUT/<label>/<recipe>/metrics.json
    overwrite: false
    speculative: runs/taid/student        # draft: measure speculative decoding of each model with it
    gamma: 4                              # draft tokens per target call (with speculative)
    teachers: {arithmetic: runs/math-teacher}   # or one DIR for every recipe: closeness of each
                                          # model to its recipe's teacher (KL, top-1, alpha)
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class EvalSpec:
    """What `llmkd eval` runs; built from the YAML or the flags, validated before any model loads."""

    models: Any = None          # {label: dir} or [dir, ...]; "embedded" = the default teacher
    model: str | None = None    # a single model dir (shorthand for models: [dir])
    recipes: Any = field(default_factory=list)   # list of names/paths, or "a,b"
    backend: str = "vllm"
    num_examples: int = 100
    offset: int = 0
    seed: int = 0
    max_new_tokens: int = 256
    batch_size: int = 16
    use_chat_template: bool = True
    prompt_prefix: str = ""     # task prefix of a multi-task student ("[label] ", "[rationale] ")
    out: str = "runs/eval"
    overwrite: bool = False
    speculative: str | None = None   # draft model dir: measured speculative decoding (targets = models)
    gamma: int = 4                   # draft tokens per target call, with `speculative`
    teachers: Any = None             # {recipe: teacher dir} or one dir for every recipe: closeness

    def teacher_dirs(self, recipes: list[Any]) -> dict[str, str]:
        """{recipe name: teacher dir}; a key may be a recipe's name or the name as given."""
        given = self.teachers
        if given is None:
            return {}
        if isinstance(given, str):
            return {rec.name: given for rec in recipes}
        if not isinstance(given, dict):
            raise ValueError(f"eval: teachers={given!r}; give a mapping recipe: teacher dir or one dir")
        names = dict(zip(self.recipe_names(), recipes)) | {rec.name: rec for rec in recipes}
        unknown = [k for k in given if str(k) not in names]
        if unknown:
            raise ValueError(f"eval: teachers names recipe {str(unknown[0])!r}, which is not among the "
                             f"recipes {self.recipe_names()}; add it to recipes or drop its teacher")
        return {names[str(k)].name: str(v) for k, v in given.items()}

    def model_dirs(self) -> dict[str, str]:
        """{label: dir}; a label defaults to the directory name, or as many trailing path parts
        as tell the dirs apart (runs/a/model, runs/b/model -> a/model, b/model)."""
        given = self.models if self.models is not None else ([self.model] if self.model else [])
        if isinstance(given, str):
            given = [given]
        if isinstance(given, dict):
            pairs = {str(k): str(v) for k, v in given.items()}
        elif isinstance(given, list):
            pairs = dict(zip(unique_labels([str(m) for m in given]), [str(m) for m in given]))
        else:
            raise ValueError(f"eval: models={given!r}; give a mapping label: dir or a list of dirs")
        if not pairs:
            raise ValueError("eval: no model given; pass --model PATH or set `models` in the YAML")
        return pairs

    def recipe_names(self) -> list[str]:
        names = self.recipes.split(",") if isinstance(self.recipes, str) else list(self.recipes)
        names = [str(n).strip() for n in names if str(n).strip()]
        if not names:
            raise ValueError("eval: no recipe given; pass --recipes a,b or set `recipes` in the YAML")
        return names


def unique_labels(paths: list[str]) -> list[str]:
    """The shortest trailing parts of each resolved path that no other path shares."""
    parts = [("embedded",) if p == "embedded" else Path(p).expanduser().resolve().parts for p in paths]
    for i, (p, mine) in enumerate(zip(paths, parts)):
        if mine in parts[:i]:
            raise ValueError(f"eval: model {p!r} is given twice; give each model once")
    labels = []
    for mine in parts:
        n = 1
        while n < len(mine) and any(other[-n:] == mine[-n:] for other in parts if other is not mine):
            n += 1
        labels.append("/".join(mine[-n:]).lstrip("/") or "/")
    return labels


def _spec_from_args(args: argparse.Namespace) -> EvalSpec:
    if args.config:
        from llmkd.validation import check_keys, coerce
        from llmkd.yaml_reader import read_yaml_mapping

        raw = read_yaml_mapping(args.config, "eval config")
        check_keys("", raw, [f.name for f in fields(EvalSpec)])
        spec = EvalSpec(**coerce("", raw, EvalSpec))
    else:
        spec = EvalSpec()
    flags = {"models": args.model, "recipes": args.recipes, "backend": args.backend,
             "num_examples": args.num_examples, "offset": args.offset, "seed": args.seed,
             "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "out": args.out,
             "prompt_prefix": args.prompt_prefix, "speculative": args.speculative,
             "gamma": args.gamma}
    for key, value in flags.items():
        if value is not None:
            setattr(spec, key, value)
    if args.teacher:
        spec.teachers = _teacher_flags(args.teacher, spec)
    if args.no_chat_template:
        spec.use_chat_template = False
    if args.overwrite:
        spec.overwrite = True
    # options that would otherwise be silently ignored
    if args.gamma is not None and not spec.speculative:
        raise ValueError(f"eval: --gamma {args.gamma} only applies with --speculative DRAFT")
    if args.backend == "vllm" and spec.speculative:
        raise ValueError("eval: --speculative runs transformers assisted generation (counted target "
                         "calls); drop --backend vllm")
    if spec.speculative and spec.teachers:
        raise ValueError("eval: --speculative already measures closeness to the target; run --teacher "
                         "in a separate eval")
    return spec


def _teacher_flags(values: list[str], spec: EvalSpec) -> dict[str, str]:
    """--teacher RECIPE=DIR (repeatable) and at most one --teacher DIR (every other recipe)."""
    mapped: dict[str, str] = {}
    default = None
    for value in values:
        recipe, sep, path = value.partition("=")
        if sep and recipe in spec.recipe_names() and not Path(value).is_dir():
            mapped[recipe] = path
        elif sep and not Path(value).is_dir():
            raise ValueError(f"eval: --teacher {value}: {recipe!r} is not among the recipes "
                             f"{spec.recipe_names()}; use --teacher RECIPE=DIR or --teacher DIR")
        elif default is not None:
            raise ValueError(f"eval: --teacher {default} and --teacher {value} both name a teacher for "
                             "every recipe; use --teacher RECIPE=DIR for each")
        else:
            default = value
    base = spec.teachers if isinstance(spec.teachers, dict) else (
        {} if spec.teachers is None else dict.fromkeys(spec.recipe_names(), spec.teachers))
    if default is not None:
        base = dict.fromkeys(spec.recipe_names(), default)
    return base | mapped


def run_eval(args: argparse.Namespace) -> int:
    from llmkd.data.recipes import load_recipe
    from llmkd.eval.reasoning import evaluate_reasoning
    from llmkd.generation.backends import BACKENDS, check_model_dir
    from llmkd.models.embedded import resolve_model_name
    from llmkd.preflight import check_output_dir

    spec = _spec_from_args(args)
    # Everything the user typed is checked here, before any dataset or model is loaded.
    if spec.backend not in BACKENDS:
        raise ValueError(f"eval: backend={spec.backend!r} is unknown; use one of {BACKENDS}")
    recipes = [load_recipe(name) for name in spec.recipe_names()]
    models = spec.model_dirs()
    for label, path in models.items():
        if path != "embedded":
            check_model_dir(path)
    if spec.speculative:   # one result per target+draft pair, beside plain evals of the targets
        if spec.speculative != "embedded":
            check_model_dir(spec.speculative, "speculative")
        from llmkd.eval.speculative import check_gamma

        check_gamma(spec.gamma)
        models = {f"{label}+{Path(spec.speculative).name}": path for label, path in models.items()}
    teachers = spec.teacher_dirs(recipes)
    for name, teacher in teachers.items():
        if teacher != "embedded":
            check_model_dir(teacher, f"teachers.{name}")
    if teachers:   # tokenizers only: a mismatch fails before any weights load
        from llmkd.eval.closeness import check_shared_tokenizer

        for name, teacher in teachers.items():
            for label, path in models.items():
                check_shared_tokenizer(resolve_model_name(path), resolve_model_name(teacher),
                                       label=label, recipe=name)
    out = Path(spec.out)
    check_output_dir(out, "out")
    for label in models:
        for rec in recipes:
            if (out / label / rec.name / "metrics.json").exists() and not spec.overwrite:
                raise FileExistsError(f"{out / label / rec.name / 'metrics.json'} exists; pass "
                                      "--overwrite or another --out (nothing was run)")
    for label, path in models.items():
        path = resolve_model_name(path)
        for rec in recipes:
            if spec.speculative:
                from llmkd.eval.speculative import evaluate_speculative

                m = evaluate_speculative(
                    path, resolve_model_name(spec.speculative), rec, gamma=spec.gamma,
                    num_examples=spec.num_examples, offset=spec.offset, seed=spec.seed,
                    max_new_tokens=spec.max_new_tokens, use_chat_template=spec.use_chat_template,
                    prompt_prefix=spec.prompt_prefix, output_dir=out / label / rec.name,
                    label=label, overwrite=spec.overwrite)
                print(f"{label:>20s}  {rec.name:<24s} {m['tokens_per_target_call']:.2f} tokens per "
                      f"target call (gamma {m['gamma']}; greedy prediction from top-1 agreement "
                      f"{m['block_efficiency_greedy']:.2f}), speed-up {m['speedup']:.2f}x, identical "
                      f"{m['identical_outputs']}/{m['prompts']}; sampling: alpha "
                      f"{m['acceptance_rate']:.3f}, tau {m['block_efficiency']:.2f}")
                continue
            m = evaluate_reasoning(
                path, rec, backend=spec.backend, num_examples=spec.num_examples,
                offset=spec.offset, seed=spec.seed, max_new_tokens=spec.max_new_tokens,
                batch_size=spec.batch_size, use_chat_template=spec.use_chat_template,
                output_dir=out / label / rec.name, label=label, overwrite=spec.overwrite,
                prompt_prefix=spec.prompt_prefix)
            print(f"{label:>20s}  {rec.name:<24s} accuracy {100 * m['accuracy']:5.1f} % "
                  f"[{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]  n={m['n']}")
    for rec in recipes:
        if rec.name in teachers:
            _closeness(spec, models, teachers[rec.name], rec, out)
    print(f"results in {out}/; compare with: llmkd report {out}")
    return 0


def _closeness(spec: EvalSpec, models: dict[str, str], teacher: str, rec: Any, out: Path) -> None:
    """Each model's closeness to the recipe's teacher, added to its metrics.json beside accuracy."""
    import json

    from llmkd.eval.closeness import recipe_closeness
    from llmkd.fsutil import atomic_write_text
    from llmkd.models.embedded import resolve_model_name

    close = recipe_closeness(
        {label: resolve_model_name(path) for label, path in models.items()},
        resolve_model_name(teacher), rec, num_examples=spec.num_examples, offset=spec.offset,
        seed=spec.seed, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size,
        use_chat_template=spec.use_chat_template, prompt_prefix=spec.prompt_prefix)
    for label, c in close.items():
        path = out / label / rec.name / "metrics.json"
        atomic_write_text(path, json.dumps(json.loads(path.read_text()) | c, indent=2) + "\n")
        print(f"{label:>20s}  {rec.name:<24s} to teacher {teacher}: KL {c['kl_to_teacher']:.4f} "
              f"nats/token, top-1 agreement {c['top1_agreement']:.3f}, alpha {c['acceptance_rate']:.3f} "
              f"({c['closeness_tokens']} tokens of the teacher's greedy responses)")


def run_report(args: argparse.Namespace) -> int:
    from llmkd.eval.report import write_report

    if args.out is None and len(args.run_dirs) > 1:
        raise ValueError("report: several run dirs need --out DIR for the combined report")
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report"
    summary = write_report(args.run_dirs, out)
    print(f"report: {out / 'report.md'} ({len(summary['evals'])} evals, "
          f"{len(summary['training'])} training logs, plots: {', '.join(summary['plots']) or 'none'})")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="reasoning accuracy (math-verify) of models on data recipes",
        description="Greedy generation -> answer extraction -> accuracy with a 95% Wilson CI.")
    p.add_argument("config", nargs="?", help="eval YAML (see llmkd.cli.eval); flags override it")
    p.add_argument("--model", action="append", metavar="PATH",
                   help="model dir or 'embedded' (repeat to compare several)")
    p.add_argument("--recipes", metavar="A,B", help="comma-separated recipe names or YAML paths")
    p.add_argument("--backend", choices=("vllm", "hf"))
    p.add_argument("--num-examples", type=int)
    p.add_argument("--offset", type=int, help="skip this many rows (a held-out slice)")
    p.add_argument("--seed", type=int, help="reasoning_gym generation seed")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--batch-size", type=int, help="batch size of the hf backend")
    p.add_argument("--no-chat-template", action="store_true", help="feed raw prompts")
    p.add_argument("--prompt-prefix", metavar="TEXT",
                   help='text before every prompt, e.g. "[label] " or "[rationale] " for a student '
                        "distilled with method rationale")
    p.add_argument("--out", metavar="DIR", help="results in DIR/<label>/<recipe>/ (default runs/eval)")
    p.add_argument("--overwrite", action="store_true", help="replace existing results")
    p.add_argument("--speculative", metavar="DRAFT",
                   help="draft model dir: measure speculative decoding (transformers assisted "
                        "generation, greedy) of each --model with it: tokens per target call, "
                        "speed-up, analytic alpha/tau")
    p.add_argument("--gamma", type=int, help="draft tokens per target call (default 4)")
    p.add_argument("--teacher", action="append", metavar="[RECIPE=]DIR",
                   help="closeness of each model to this teacher (KL(teacher||model) per token, "
                        "top-1 agreement, alpha) on the recipe's prompts with the teacher's greedy "
                        "responses; RECIPE=DIR for one recipe (repeat), DIR for every recipe")
    p.set_defaults(func=run_eval)

    r = subparsers.add_parser(
        "report", help="markdown/JSON/PNG report comparing run dirs (evals and training logs)")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", metavar="DIR", help="report dir (default RUN_DIR/report for one run)")
    r.set_defaults(func=run_report)
