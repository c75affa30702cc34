"""`sft-hf launch`: `accelerate launch` whose failed run ends with the script's own error, not the launcher's.

    sft-hf launch --config_file accelerate_configs/cpu_2proc.yaml recipes/train.py --dataset_name data.jsonl

`accelerate launch` answers a script's non-zero exit with a traceback of its own (`CalledProcessError` for one
process, torchrun's `ChildFailedError` report for several) after the script's one-line error, and exits 1. Here the
same launch runs in-process: the script's error line stays the last thing printed, and its exit code (2 for bad
input, 3 for a non-finite loss) is the launcher's. Ctrl-C reaches the launcher and the script alike: the launcher
lets the first one pass, waits for the script's line (what was kept, how to resume) and exits 130, where `accelerate
launch` prints a KeyboardInterrupt traceback (<= 1.15) or terminates the script at once (1.16). Every `accelerate
launch` option works the same.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys


def main(argv=None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # torchrun's agent logs one line per failed or stopped process before raising: the script has said why
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # Ctrl-C in a terminal reaches the whole foreground group, the script included. accelerate >= 1.16 answers it
    # in the launcher by terminating the script at once, before the script can say what it kept: so the launcher
    # lets the first Ctrl-C pass (the script answers it and exits 130) and stops only at a second one.
    global _ctrl_c_seen
    _ctrl_c_seen = False
    previous = signal.signal(signal.SIGINT, _second_ctrl_c_interrupts)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as e:  # one process
        return e.returncode if e.returncode > 0 else 1
    except ChildFailedError as e:  # several: the exit code of the process that failed first
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    except (KeyboardInterrupt, SignalException):  # Ctrl-C (torchrun's agent raises SignalException for it)
        wait_for_children()  # they got the Ctrl-C too; the script's own line is the last thing printed
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


_ctrl_c_seen = False


def _second_ctrl_c_interrupts(signum, frame):
    global _ctrl_c_seen
    if _ctrl_c_seen:
        raise KeyboardInterrupt
    _ctrl_c_seen = True


def wait_for_children() -> None:
    while True:
        try:
            os.wait()
        except ChildProcessError:  # none left
            return
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
            return


if __name__ == "__main__":
    sys.exit(main())
