"""A script for `sft-hf launch` that waits for Ctrl-C and answers it as recipes/train.py does (tests/test_launch.py)."""
import sys
import time
from pathlib import Path

from sft_hf.errors import Interrupted, run_cli


def main(argv):
    Path((argv or sys.argv[1:])[0]).write_text("waiting\n")
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        time.sleep(0.5)  # the launcher got the Ctrl-C first: it must wait for this line
        raise Interrupted("interrupted at step 3 of 5; run the same command with --resume_from_checkpoint true") from None
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
