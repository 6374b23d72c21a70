"""Ctrl-C (SIGINT) and SIGTERM (what Slurm and torchrun send before a kill) stop training cleanly.

The first signal lets the current optimizer step finish, saves a checkpoint at that step (even
with save_strategy=no) and makes `train` raise `TrainingInterrupted`, which the CLI turns into one
line with the step, the checkpoint and the resume command, and exit code 128 + signal (130 for
SIGINT, 143 for SIGTERM). A second signal stops at once, without saving. A step waiting on a
served teacher that does not answer within a few seconds of the first signal stops without saving
it (`llmkd.teacher_server.abandon_waits`): a frozen server must not outlive a scheduler's grace
period. Under several processes the ranks agree on the stop at every step end, so they all save and stop at the same step.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llmkd.training.checkpoint import find_checkpoint
from llmkd.teacher_server import TeacherWaitAbandoned, abandon_waits

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal; `checkpoint` is the newest complete one (None: there is none)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, *, at_once: bool = False,
                 waiting: bool = False) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if at_once:
            msg = f"stopped at once by a second {name} during step {step + 1}, without saving"
        elif waiting:
            msg = (f"interrupted by {name} during step {step + 1} while waiting for the teacher server, "
                   "without saving that step; " + (f"newest checkpoint: {checkpoint}" if checkpoint
                                                   else "no checkpoint was saved"))
        else:
            msg = f"interrupted by {name} at step {step}; " + (
                f"checkpoint: {checkpoint}" if checkpoint else "no checkpoint was saved")
        super().__init__(msg)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal(TrainerCallback):
    """Records the first SIGINT/SIGTERM; at the next step end asks the Trainer to save and stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.step = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return      # Python delivers signals to the main thread only
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:      # the second one: stop now
            self.restore()
            raise TrainingInterrupted(signum, self.step, None, at_once=True)
        self.signum = signum
        abandon_waits()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        self.step = state.global_step
        signum = _agree(self.signum or 0, args)
        if signum:
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True
        return control


def _agree(signum: int, args: TrainingArguments) -> int:
    """The largest signal number any rank received (0: none), the same on every rank."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signum
    flag = torch.tensor([signum], device=args.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


@contextmanager
def stop_on_signal(trainer: Trainer) -> Iterator[StopOnSignal]:
    """Around `Trainer.train`: graceful SIGINT/SIGTERM; raises `TrainingInterrupted` after the
    checkpoint of the interrupted step is saved. The previous signal handlers come back after."""
    callback = StopOnSignal()
    trainer.add_callback(callback)
    callback.install()
    try:
        yield callback
    except TeacherWaitAbandoned:
        found, _ = find_checkpoint(trainer.args.output_dir)
        raise TrainingInterrupted(callback.signum or signal.SIGINT, trainer.state.global_step,
                                  str(found) if found else None, waiting=True) from None
    finally:
        callback.restore()
        abandon_waits(False)
        trainer.remove_callback(callback)
    if callback.signum is not None:
        step = trainer.state.global_step
        saved = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        if not saved.is_dir():            # e.g. the signal came during the final evaluation
            found, _ = find_checkpoint(trainer.args.output_dir)
            saved = found
        raise TrainingInterrupted(callback.signum, step, str(saved) if saved else None)
