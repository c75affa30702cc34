"""Preemption: SIGTERM or SIGUSR1 ends training at the end of the optimizer step, with a complete checkpoint.

Clusters warn before they kill: SLURM sends SIGTERM (and, asked with `--signal`, SIGUSR1 some time before the time
limit), Kubernetes and spot instances SIGTERM, then SIGKILL after a grace period. Python's default is to die at once,
losing everything since the last `save_steps`. With `StopOnSignal`:

- before training starts (data preparation, model loading) nothing is lost by stopping: the signal raises `Preempted`
  at once;
- during training it only sets a flag. At the end of each optimizer step every process all-reduces it (as the NaN
  guard does: a process that stopped alone would leave the others waiting in their next collective); when any process
  got a signal, all of them ask Trainer for a checkpoint of this step, written by its own save path (so it gets the
  completeness marker and recipe.yaml, sft_hf/run/checkpoints.py), and stop. `raise_if_stopped` then ends the run with
  one line saying where that checkpoint is, exit code 143;
- a second signal changes nothing: the checkpoint being written completes; if a SIGKILL cuts it short, it has no
  marker and the previous complete checkpoint stays the one a resume starts from;
- after training the final save completes (`restore` puts the previous handlers back once the model is saved).

The same command then goes on from the checkpoint with `--resume_from_checkpoint true` (the newest complete
checkpoint, or a fresh start when there is none).
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import weakref
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sft_hf.errors import Interrupted, Preempted
from sft_hf.run.checkpoints import resumes_latest
from sft_hf.run.peers import leave_process_group
from sft_hf.run.safety import agreed_max

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopOnSignal(TrainerCallback):
    """SIGTERM / SIGUSR1: finish the optimizer step, save a complete checkpoint on every process, stop training.

    Create it before the data is prepared (its handlers are installed then), pass it to the Trainer, and call
    `raise_if_stopped(trainer)` after `trainer.train()` and `restore()` once the model is saved.
    """

    def __init__(self, signals=SIGNALS):
        self.received = 0  # the first signal this process got
        self.agreed = 0  # the signal every process stopped for (another process may have been the one to get it)
        self.training: bool | None = None  # None: not started yet, True: in the training loop, False: finished
        self.stopped_step: int | None = None
        self._pid = os.getpid()
        self._installed = {}  # signal → (our handler, the one before)
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only
            for sig in signals:
                handler = functools.partial(_dispatch, weakref.ref(self), signal.getsignal(sig))
                self._installed[sig] = (handler, signal.signal(sig, handler))

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked worker (DataLoader, datasets.map): it serves batches until the end
            return
        name = signal.Signals(signum).name
        if self.received:  # a launcher forwarding the same SIGTERM, an impatient scheduler: the save goes on
            logger.warning("%s again: still stopping (the checkpoint being written completes)", name)
            return
        self.received = signum
        if isinstance(sys.exc_info()[1], (KeyboardInterrupt, Interrupted)):  # Ctrl-C is ending the run already
            return  # (accelerate launch follows it with a SIGTERM): its line says what is kept
        if self.training is None:
            raise Preempted(f"stopped by {name} before training started: nothing was trained, so nothing is saved; "
                            "run the same command to start")
        if self.training:
            logger.warning("%s: finishing this optimizer step, then saving a checkpoint and stopping", name)
        else:
            logger.warning("%s after training: the trained model is being saved", name)

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_step_end(self, args, state, control, **kwargs):
        # the number of a signal some process received, 0 when none did: one all-reduced integer per optimizer step
        self.agreed = agreed_max(self.received, args.device)
        if self.agreed:
            control.should_save = True  # Trainer's own save: marked complete once every process wrote its part
            control.should_training_stop = True
            control.should_evaluate = False  # an evaluation due now would spend the grace period
            self.stopped_step = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_step is not None:  # this step's checkpoint is written already
            control.should_save = control.should_evaluate = False
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    @property
    def stopped(self) -> bool:
        return self.stopped_step is not None

    def checkpoint(self, output_dir) -> Path | None:
        return Path(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.stopped_step}") if self.stopped else None

    def raise_if_stopped(self, trainer) -> None:
        """After `trainer.train()`: when a signal stopped it, every process leaves the process group (they all
        stopped at the same step) and raises `Preempted`, one line saying where the checkpoint is (exit code 143).
        The final save and evaluation are for a finished run."""
        if not self.stopped:
            return
        leave_process_group(trainer.accelerator)  # all stopped at this step: they leave together
        self.restore()
        command = ("run the same command" if resumes_latest(trainer.args.resume_from_checkpoint)
                   else "run the same command with --resume_from_checkpoint true")
        raise Preempted(f"stopped by {signal.Signals(self.agreed).name} at step {self.stopped_step} of "
                        f"{trainer.state.max_steps}: {self.checkpoint(trainer.args.output_dir)} is saved and "
                        f"complete; {command} to go on from it")

    def restore(self) -> None:
        """The handlers from before (a process that trains again, or goes on with other work, gets them back)."""
        for sig, (handler, previous) in self._installed.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._installed = {}


def _dispatch(stopper_ref, previous, signum, frame) -> None:
    """The handler installed: the StopOnSignal's while it exists; once it is gone (its run ended in an error, before
    `restore`), the one from before, so that a process that goes on is not left with a stale one."""
    stopper = stopper_ref()
    if stopper is not None:
        return stopper._on_signal(signum, frame)
    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    else:
        signal.raise_signal(signum)  # SIG_DFL: end as without sft-hf; SIG_IGN: ignored
