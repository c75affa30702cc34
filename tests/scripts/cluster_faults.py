"""recipes/train.py with a fault injected, for the cluster tests (tests/test_preemption.py, test_peers.py,
test_multinode.py). Environment variables choose it:

  FAULT=<action> FAULT_STEP=k [FAULT_RANK=r]   at the end of optimizer step k, on rank r (default: every rank):
      sigterm-self, sigusr1-self        signal this process, then go on (the handler sets its flag at once)
      sigterm-launcher, sigusr1-launcher  signal the launcher (this process's parent), wait until it forwards it
      wait                              wait (up to 60 s) for a signal from outside
      sigkill-self, sigstop-self        die, or freeze like a machine that stopped answering
  FAULT_DIR=path                       the fault writes FAULT_DIR/step-k-rank-r first (when, for the test)
  SIGTERM_WHILE_SAVING=self|launcher   a second SIGTERM while the checkpoint of step FAULT_STEP is written
  TOKENIZE_SECONDS=s                   the main process's tokenization takes s seconds longer (each split)
  TOKENIZE_LOG=path                    each tokenization (one per split, per process that runs it) appends its rank
  PROCESS_LOG=path                     each process appends "rank world_size MASTER_ADDR:MASTER_PORT"
  BLOCK_SIGNALS_RANK=r                 rank r never sees SIGTERM / SIGUSR1 (blocked): it stops only if it agrees
"""
import os
import runpy
import signal
import sys
import time
from pathlib import Path

from transformers import Trainer
from transformers.trainer_callback import CallbackHandler

import sft_hf.tokenization as tokenization
from sft_hf.run.preemption import StopOnSignal

TRAIN = str(Path(__file__).resolve().parents[2] / "recipes" / "train.py")
RANK = int(os.environ.get("RANK", "0"))
FAULT, STEP = os.environ.get("FAULT"), int(os.environ.get("FAULT_STEP", "0"))
ON_THIS_RANK = os.environ.get("FAULT_RANK") in (None, str(RANK))


def wait_for_signal(callbacks, seconds: float) -> None:
    stopper = next(c for c in callbacks if isinstance(c, StopOnSignal))
    deadline = time.monotonic() + seconds
    while not stopper.received and time.monotonic() < deadline:
        time.sleep(0.05)


on_step_end = CallbackHandler.on_step_end


def on_step_end_with_fault(self, args, state, control):
    if FAULT and ON_THIS_RANK and state.global_step == STEP:
        if os.environ.get("FAULT_DIR"):  # its time (the file's), e.g. to measure how long the others take to stop
            Path(os.environ["FAULT_DIR"], f"step-{STEP}-rank-{RANK}").write_text(f"{FAULT}\n")
        if FAULT in ("sigterm-self", "sigusr1-self"):
            os.kill(os.getpid(), signal.SIGTERM if FAULT == "sigterm-self" else signal.SIGUSR1)
        elif FAULT in ("sigterm-launcher", "sigusr1-launcher"):
            os.kill(os.getppid(), signal.SIGTERM if FAULT == "sigterm-launcher" else signal.SIGUSR1)
            wait_for_signal(self.callbacks, 60)
        elif FAULT == "wait":
            wait_for_signal(self.callbacks, 60)
        elif FAULT in ("sigkill-self", "sigstop-self"):
            os.kill(os.getpid(), signal.SIGKILL if FAULT == "sigkill-self" else signal.SIGSTOP)
    return on_step_end(self, args, state, control)


save_rng_state = Trainer._save_rng_state


def save_rng_state_with_sigterm(self, output_dir):
    # inside Trainer._save_checkpoint: the weights and optimizer of the checkpoint are written, its marker is not
    again = os.environ.get("SIGTERM_WHILE_SAVING")
    if again and ON_THIS_RANK and self.state.global_step == STEP:
        os.kill(os.getppid() if again == "launcher" else os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the forwarded signal arrives while this checkpoint is still being written
    return save_rng_state(self, output_dir)


tokenize_batch = tokenization._tokenize_batch


def slow_tokenize_batch(*args, **kwargs):
    # the same function on every process and in every run (its hash is datasets' cache key): what differs is read here
    if os.environ.get("TOKENIZE_LOG"):
        with open(os.environ["TOKENIZE_LOG"], "a") as log:
            log.write(f"{os.environ.get('RANK', '0')}\n")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        time.sleep(float(os.environ.get("TOKENIZE_SECONDS", "0")))
    return tokenize_batch(*args, **kwargs)


if os.environ.get("BLOCK_SIGNALS_RANK") == str(RANK):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
if os.environ.get("PROCESS_LOG"):
    with open(os.environ["PROCESS_LOG"], "a") as log:
        log.write(f"{RANK} {os.environ['WORLD_SIZE']} {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}\n")
CallbackHandler.on_step_end = on_step_end_with_fault
Trainer._save_rng_state = save_rng_state_with_sigterm
tokenization._tokenize_batch = slow_tokenize_batch
sys.argv = [TRAIN] + sys.argv[1:]
runpy.run_path(TRAIN, run_name="__main__")
