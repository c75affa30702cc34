"""`--help` of every entry point runs: the recipes (train.py, evaluate.py, merge_lora.py) and every `sft-hf` command
in sft_hf.cli.COMMANDS (commands added later are covered by the same loop). argparse formats each help string with
`%`, so a help text saying "95 % intervals" crashes --help (TypeError) until it is written "95%%"."""
import os
import re
import subprocess
import sys

import pytest

from sft_hf.cli import COMMANDS

from conftest import ROOT

ENTRY_POINTS = {
    "recipes/train.py": [sys.executable, "recipes/train.py"],
    "recipes/evaluate.py": [sys.executable, "recipes/evaluate.py"],
    "recipes/merge_lora.py": [sys.executable, "recipes/merge_lora.py"],
    "sft-hf": [sys.executable, "-m", "sft_hf"],
    **{f"sft-hf {name}": [sys.executable, "-m", "sft_hf", name] for name in COMMANDS},
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_help_runs_and_prints_usage(name):
    done = subprocess.run([*ENTRY_POINTS[name], "--help"], capture_output=True, text=True, cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"), timeout=300)
    assert done.returncode == 0, f"{name} --help exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert re.search(r"^usage: ", done.stdout, re.MULTILINE | re.IGNORECASE), done.stdout[:500]
    assert "Traceback" not in done.stderr
