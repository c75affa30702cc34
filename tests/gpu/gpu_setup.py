"""What tests/gpu shares: skip conditions and `accelerate launch` of recipes/train.py with a hang timeout. (No
conftest.py here: other test modules import names from tests/conftest.py as `conftest`, which a second one would
shadow.)"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/tiny_setup.py

from tiny_setup import ROOT, TRAIN, run_or_kill_group  # noqa: E402

CONFIGS = ROOT / "accelerate_configs"
LAUNCH_TIMEOUT = 900  # seconds: a run still going by then hangs (e.g. processes out of step) and fails its test


# every test module here: `pytestmark = CUDA`, so `python -m pytest -q` collects tests/gpu everywhere, runs it on GPUs
CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA GPU here: tests/gpu runs on a GPU machine (docs/scale.md)")


def needs(gpus: int = 1, module: str | None = None, extra: str | None = None, bf16: bool = False):
    """Skip unless this machine has `gpus` CUDA GPUs, the Python `module` (installed by the `extra` of
    pyproject.toml), and (bf16) a GPU that multiplies bf16 natively."""
    reasons = []
    if torch.cuda.is_available() and torch.cuda.device_count() < gpus:
        reasons.append(f"needs {gpus} GPUs, {torch.cuda.device_count()} here")
    if module and importlib.util.find_spec(module) is None:
        reasons.append(f"needs {module} (pip install -e \".[{extra or module}]\")")
    if bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        reasons.append("needs a GPU that multiplies bf16 natively (Ampere or newer)")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


def launch(config: str, processes: int, argv: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/<config>.yaml --num_processes N recipes/train.py argv`;
    a run that outlives LAUNCH_TIMEOUT is killed with all its processes (they would hold the GPUs) and fails."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
           "--num_processes", str(processes), TRAIN, *argv]
    result = run_or_kill_group(cmd, LAUNCH_TIMEOUT, f"{config} × {processes}")
    if result.returncode != 0:
        pytest.fail(f"{config} × {processes} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                    f"{result.stderr[-6000:]}")
    return result
