"""`sft-hf launch`: `accelerate launch` whose run ends with the script's own line and exit code, and whose signals
reach the training processes.

    sft-hf launch --config_file accelerate_configs/cpu_2proc.yaml recipes/train.py --dataset_name data.jsonl

Errors. `accelerate launch` answers a script's non-zero exit with a traceback of its own (`CalledProcessError` for
one process, torchrun's `ChildFailedError` report for several) after the script's one-line error, and exits 1. Here
the script's error line stays the last thing printed, and its exit code (2 bad input, 3 non-finite loss, 4 another
process died, 143 stopped by SIGTERM) is the launcher's; a process killed by a signal gives 128 + its number, as in a
shell. Every `accelerate launch` option works the same.

Signals. The launch runs in a thread: accelerate and torchrun install their signal handlers only in the main thread,
so here they install none, and the main thread decides:
- SIGTERM, SIGUSR1 (a scheduler about to stop the job) are forwarded to the training processes, which save a
  checkpoint at the end of their step and exit 143 (sft_hf/run/preemption.py), and the launcher waits for them as
  long as they take: the scheduler's own kill is the only deadline. `accelerate launch` SIGKILLs them a few seconds
  after forwarding a SIGTERM, and dies of a SIGUSR1 without forwarding it (docs/scale.md has the details);
- Ctrl-C: the first is the script's, which says what was kept and how to go on, then exits 130 (a terminal sends it
  to the launcher's process group, where one process is; torchrun starts several in sessions of their own, so it is
  forwarded to those); a second Ctrl-C stops the processes at once.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import psutil

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def main(argv=None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # torchrun's agent logs one line per failed or stopped process before raising: the script has said why
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    outcome: dict = {}
    launcher = threading.Thread(target=_launch, args=(launch_command, args, outcome), name="accelerate launch",
                                daemon=True)
    forwarder = SignalForwarder()
    previous = {sig: signal.signal(sig, forwarder.on_signal) for sig in (signal.SIGINT, *FORWARDED)}
    try:
        launcher.start()
        while launcher.is_alive():
            launcher.join(0.1)
            forwarder.forward_pending()  # to processes started after the signal came, too
    except KeyboardInterrupt:  # a second Ctrl-C
        forwarder.kill_children()
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["code"]


def _launch(launch_command, args, outcome: dict) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_command(args)
        code = 0
    except subprocess.CalledProcessError as e:  # one process
        code = e.returncode
    except ChildFailedError as e:  # several: the exit code of the process that failed first
        _, failure = e.get_first_failure()
        code = failure.exitcode
    except SystemExit as e:  # accelerate's own exits (`--quiet`)
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - raised again in the main thread
        outcome["error"] = e
        return
    outcome["code"] = 128 - code if code < 0 else code  # killed by a signal: 128 + its number, as a shell says


class SignalForwarder:
    """The launcher's signal handlers: what each signal does is in the module's docstring."""

    def __init__(self):
        self.pending: list[int] = []  # signals received, forwarded to processes started later too
        self.sent: set[tuple[int, int]] = set()  # (pid, signal) forwarded since the signal last came
        self.ctrl_c = False

    def on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.ctrl_c:
                raise KeyboardInterrupt
            self.ctrl_c = True
        if signum not in self.pending:
            self.pending.append(signum)
        self.sent = {(pid, sent) for pid, sent in self.sent if sent != signum}  # each one is forwarded: a second
        self.forward_pending()  # SIGTERM reaches the processes too (they keep saving)

    def forward_pending(self) -> None:
        if not self.pending:
            return
        session = os.getsid(0)
        for child in psutil.Process().children():
            for signum in self.pending:
                if (child.pid, signum) in self.sent:
                    continue
                try:
                    # the processes of the launcher's own session had a terminal's Ctrl-C already
                    if signum != signal.SIGINT or os.getsid(child.pid) != session:
                        child.send_signal(signum)
                except (psutil.NoSuchProcess, ProcessLookupError):
                    continue
                self.sent.add((child.pid, signum))

    def kill_children(self) -> None:
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(psutil.Process().children(), timeout=10)


if __name__ == "__main__":
    sys.exit(main())
