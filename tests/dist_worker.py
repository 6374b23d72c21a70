"""One rank of a distributed distillation run, for tests/test_distributed.py.

Started by `python -m torch.distributed.run --standalone --nproc_per_node N tests/dist_worker.py
CONFIG --info OUT.json [--set k=v ...]`. It does what `llmkd distill` does (load the YAML, build the
trainer, train, save) and, on rank 0, writes a JSON record of how the run was laid out (world
size, ZeRO stage, how the teacher was placed and whether its parameters are sharded) so the test
can assert on it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--info", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    import torch

    from llmkd.training.config import load_config
    from llmkd.training.pipeline import build_trainer, shutdown_distributed
    from llmkd.training.trainer import _zero_stage

    cfg = load_config(args.config, args.overrides)
    trainer = build_trainer(cfg)
    teacher = trainer.teacher
    params = list(teacher.parameters())
    info = {
        "world_size": trainer.args.world_size,
        "distributed": torch.distributed.is_initialized(),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "deepspeed": trainer.is_deepspeed_enabled,
        "zero_stage": _zero_stage(trainer.args),
        "teacher_type": type(teacher).__name__,
        "teacher_is_method_teacher": trainer.method.teacher is teacher,
        # ZeRO-3 partitioned parameters carry ds_id/ds_numel and hold an empty local tensor
        "teacher_sharded": bool(params) and all(hasattr(p, "ds_id") for p in params),
        # what this rank holds: its ZeRO-3 shard (ds_tensor), else the whole tensor
        "teacher_local_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                   for p in params),
        "teacher_full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "teacher_requires_grad": any(p.requires_grad for p in params),
        "teacher_dtype": str(params[0].dtype) if params else None,
    }
    result = trainer.train()
    trainer.save_model(cfg.output_dir)
    info["train_loss"] = result.training_loss
    info["global_step"] = trainer.state.global_step
    info["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    info["on_policy"] = [h["on_policy"] for h in trainer.state.log_history if "on_policy" in h]
    if trainer.is_world_process_zero():
        tmp = Path(args.info + ".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, args.info)
    shutdown_distributed(exit_code=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
