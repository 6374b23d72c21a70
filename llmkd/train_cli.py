"""CLI: `llmkd distill`, `llmkd quickstart`, `llmkd models prepare`."""
from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a student from a YAML config")
    p.add_argument("config")
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
    from llmkd.config import load_config
    from llmkd.pipeline import build_trainer

    cfg = load_config(args.config, args.overrides)
    trainer = build_trainer(cfg)
    trainer.train()
    trainer.save_model(cfg.output_dir)
    trainer.save_state()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    _shutdown_distributed()
    return 0


def _shutdown_distributed() -> None:
    """Tear the process group down before exit: left to interpreter shutdown, gloo's threads can
    abort a rank ("terminate called without an active exception") after all work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_quickstart(args: argparse.Namespace) -> int:
    from llmkd.quickstart import run_quickstart

    run_quickstart(args.config, args.out, args.overrides)
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from llmkd.models.embedded import embedded_teacher_dir

    print(embedded_teacher_dir(force=args.force))
    return 0
