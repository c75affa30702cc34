"""The command surface (sft_hf/cli.py): `--help` of every entry point runs: the recipes (train.py, evaluate.py, merge_lora.py) and every `sft-hf` command
in sft_hf.cli.COMMANDS (commands added later are covered by the same loop). argparse formats each help string with
`%`, so a help text saying "95 % intervals" crashes --help (TypeError) until it is written "95%%"."""
import os
import re
import subprocess
import sys

import pytest

from sft_hf.cli import COMMANDS, TRAINS, main

from conftest import ROOT

SCRIPTS = {  # run as a user runs them: their own process (the train commands also re-exec on the allocator)
    "recipes/train.py": [sys.executable, "recipes/train.py"],
    "recipes/evaluate.py": [sys.executable, "recipes/evaluate.py"],
    "recipes/merge_lora.py": [sys.executable, "recipes/merge_lora.py"],
    "sft-hf": [sys.executable, "-m", "sft_hf"],
    **{f"sft-hf {name}": [sys.executable, "-m", "sft_hf", name] for name in sorted(TRAINS)},
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_help_of_each_script_runs_and_prints_usage(name):
    done = subprocess.run([*SCRIPTS[name], "--help"], capture_output=True, text=True, cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"), timeout=300)
    assert done.returncode == 0, f"{name} --help exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert re.search(r"^usage: ", done.stdout, re.MULTILINE | re.IGNORECASE), done.stdout[:500]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - TRAINS))
def test_help_of_each_sft_hf_command_runs_and_prints_usage(name, capsys):
    """In this process (the same `sft_hf.cli.main` the console script calls), to spare an interpreter start each."""
    try:
        code = main([name, "--help"])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    assert code in (0, None), f"sft-hf {name} --help exited {code}:\n{err[-3000:]}"
    assert re.search(r"^usage: ", out, re.MULTILINE | re.IGNORECASE), out[:500]
    assert "Traceback" not in err


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
