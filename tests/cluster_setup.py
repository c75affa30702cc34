"""Helpers for the cluster tests (test_preemption.py, test_peers.py, test_multinode.py): recipes/train.py with a fault
injected (tests/scripts/cluster_faults.py) under `accelerate launch`, `sft-hf launch`, or two launchers started as the
two machines of a multi-node run on this box."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from tiny_setup import ROOT, run_env

FAULTS = str(ROOT / "tests" / "scripts" / "cluster_faults.py")
CONFIGS = ROOT / "accelerate_configs"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
SFT_HF = [sys.executable, "-m", "sft_hf", "launch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], launcher_args: list[str], argv: list[str], env: dict | None = None,
           timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *launcher_args, FAULTS, *argv], env={**run_env(), **(env or {})}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def start_machines(launcher: list[str], argv: list[str], env: dict | None = None) -> list[subprocess.Popen]:
    """Two launchers as machines 0 and 1 of accelerate_configs/multi_node.yaml, one process each, on 127.0.0.1."""
    port = free_port()
    return [subprocess.Popen(
        [*launcher, "--config_file", str(CONFIGS / "multi_node.yaml"), "--num_machines", "2", "--machine_rank",
         str(machine), "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         FAULTS, *argv], env={**run_env(), **(env or {})}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for machine in (0, 1)]


def finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"exited with {process.returncode} before {path.name}:\n{process.stderr.read()}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.1)


def error_lines(stderr: str) -> list[str]:
    return [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]
