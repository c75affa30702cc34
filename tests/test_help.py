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


def test_no_help_string_in_the_repository_has_a_bare_percent_sign():
    """Every `help=` argument and `"help":` field (dataclass metadata that HfArgumentParser hands to argparse):
    a `%` must be `%%` or a format such as `%(default)s`, also in scripts no test runs with --help."""
    import ast

    bare = []
    for path in sorted(ROOT.glob("**/*.py")):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            values = [node.value] if isinstance(node, ast.keyword) and node.arg == "help" else []
            if isinstance(node, ast.Dict):
                values += [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "help"]
            for value in values:
                for part in ast.walk(value):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str) and \
                            re.search(r"%(?![(])", part.value.replace("%%", "")):
                        bare.append(f"{path.relative_to(ROOT)}:{part.lineno}: {part.value!r}")
    assert not bare, "\n".join(bare)
