"""CLI: `llmkd distill`, `llmkd quickstart`, `llmkd models prepare`."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from llmkd.training.checkpoint import RunFailed

DISTILL_HELP = """\
Train a student to match a teacher as the YAML CONFIG says (examples: configs/distill/*.yaml).
The whole config is checked before any model loads; a mistake gives one line and exit code 2.

resume, interrupt, overwrite:
  Ctrl-C or SIGTERM   the current step finishes, OUTPUT_DIR/checkpoint-N is saved, one line gives
                      the resume command; exit 130 (SIGTERM: 143). A second Ctrl-C stops at once.
  --set resume_from_checkpoint=true
                      continue from the newest complete checkpoint in output_dir (or =PATH for a
                      given checkpoint-N). Checkpoints are written to output_dir/.staging and
                      renamed when complete, so a killed save never leaves one that breaks resume.
  --set overwrite_output_dir=true
                      start over in an earlier llmkd run's output_dir; its old checkpoint-* dirs
                      are deleted. A directory llmkd did not write (no .llmkd-run mark) is refused.
  --set allow_config_change=true
                      resume although the training config (learning rate, method, data, ...)
                      differs from the checkpoint's; without it the differing fields are listed.
  Without resume or overwrite, a non-empty output_dir is refused and nothing is written. An
  output_dir inside (or holding) a model or data directory is always refused; one run at a time
  holds output_dir/.llmkd.lock. Disk full or a NaN/inf loss: one line, exit 1, last good
  checkpoint kept.
"""


def register(sub: Any) -> None:
    from llmkd.training.config import config_help

    p = sub.add_parser("distill", help="distil a teacher into a student from a YAML config",
                       description=DISTILL_HELP, epilog=config_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="distillation YAML, e.g. configs/distill/token_kd.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set method.beta=0.5 (repeatable)")
    p.set_defaults(func=cmd_distill)

    q = sub.add_parser("quickstart", help="the whole pipeline on the embedded default teacher")
    q.add_argument("--config", default=None, help="quickstart YAML (default configs/quickstart.yaml)")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    q.set_defaults(func=cmd_quickstart)

    m = sub.add_parser("models", help="model utilities")
    msub = m.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="convert the embedded teacher (GGUF) to safetensors once")
    prep.add_argument("--force", action="store_true")
    prep.set_defaults(func=cmd_models_prepare)


def cmd_distill(args: argparse.Namespace) -> int:
    code = _distill(args)
    if code == 0:   # every rank finished (a failed one may not reach the barrier)
        from llmkd.training.pipeline import shutdown_distributed

        shutdown_distributed(exit_code=code)   # under torchrun the process ends here (see its docstring)
    return code


def _distill(args: argparse.Namespace) -> int:
    from llmkd.training.config import load_config
    from llmkd.training.outdir import OutputDirBusy, claim_output_dir

    with _signals_stop_startup() as phase:   # before anything loads: SIGTERM is one line, exit 143
        cfg = load_config(args.config, args.overrides)   # every user error is raised here, nothing written
        out = Path(cfg.output_dir)
        created = not out.exists()
        try:
            with claim_output_dir(out, main=_is_main_process()):
                return _run(cfg, phase)
        except OutputDirBusy:              # another run owns output_dir: touch nothing of it
            raise
        except KeyboardInterrupt as err:   # the trainer saved a checkpoint first (unless told twice)
            _remove_if_nothing_to_resume(out, created)
            if _is_main_process():
                print(f"llmkd distill: {_interrupted(err, args, out)}", file=sys.stderr)
            return getattr(err, "exit_code", 130)
        except RunFailed as err:           # disk full, a non-finite loss: the last good checkpoint stays
            _remove_if_nothing_to_resume(out, created)
            if _is_main_process():
                print(f"llmkd distill: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 1
        except ConnectionError as err:     # a served teacher gone: resume only if something was saved
            _remove_if_nothing_to_resume(out, created)
            raise type(err)(f"{err}; then {_next_step(args, out)}") from None
        except (ValueError, OSError):      # a user error found while loading: leave nothing behind
            _remove_if_nothing_to_resume(out, created)
            raise


def _run(cfg: Any, phase: dict[str, str]) -> int:
    from llmkd.training.pipeline import build_trainer

    trainer = build_trainer(cfg)
    trainer.train()
    phase["now"] = "after training, before its final save"
    trainer.save_model(cfg.output_dir)
    trainer.save_state()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return 0


class StartupInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM outside the training loop (which saves on its own); exit 128 + signal."""

    def __init__(self, signum: int, phase: str) -> None:
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} {phase}")


@contextmanager
def _signals_stop_startup() -> Iterator[dict[str, str]]:
    """SIGTERM's default action kills the process silently (exit -15) while models load: raise
    instead, so the run ends with one line and exit 143 like an interrupt during training.
    `trainer.train` installs its own (saving) handlers and restores these after."""
    phase = {"now": "before training started"}

    def handle(signum: int, frame: Any) -> None:
        raise StartupInterrupted(signum, phase["now"])

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield phase
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _remove_if_nothing_to_resume(out: Path, created: bool) -> None:
    """A run that created output_dir and failed before its first checkpoint removes it again."""
    from llmkd.training.checkpoint import find_checkpoint

    if created and out.is_dir() and _is_main_process() and find_checkpoint(out)[0] is None:
        shutil.rmtree(out, ignore_errors=True)


def _interrupted(err: KeyboardInterrupt, args: argparse.Namespace, out: Path) -> str:
    """One line: what happened, and the exact command that continues the run."""
    from llmkd.training.checkpoint import find_checkpoint

    what = " ".join(str(err).split()) or "interrupted before training started"
    if find_checkpoint(out)[0] is None:
        return f"{what}; nothing to resume in {out}"
    return f"{what}; resume: {_resume_command(args)}"


def _resume_command(args: argparse.Namespace) -> str:
    keep = [o for o in args.overrides
            if o.partition("=")[0].strip() not in ("resume_from_checkpoint", "overwrite_output_dir")]
    return shlex.join(["llmkd", "distill", args.config, *[x for o in keep for x in ("--set", o)],
                       "--set", "resume_from_checkpoint=true"])


def _next_step(args: argparse.Namespace, out: Path) -> str:
    """Resume when output_dir holds a checkpoint, else run the same command again."""
    from llmkd.training.checkpoint import find_checkpoint

    if find_checkpoint(out)[0] is not None:
        return f"resume: {_resume_command(args)}"
    return "run the same command again (nothing was saved to resume from)"


def cmd_quickstart(args: argparse.Namespace) -> int:
    from llmkd.cli.quickstart import run_quickstart

    run_quickstart(args.config, args.out, args.overrides)
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from llmkd.models.embedded import embedded_teacher_dir

    print(embedded_teacher_dir(force=args.force))
    return 0
