"""CPU threads: every core of the node, shared among its processes, unless the user chose a number.

`accelerate launch` without `use_cpu` in its config sets `OMP_NUM_THREADS=1` for the script (its
`num_cpu_threads_per_process` defaults to the launcher's own `OMP_NUM_THREADS`, else 1), so a CPU run would train on
one core. Inside the script that 1 looks like a user's `OMP_NUM_THREADS=1`; the difference is in the launcher's own
environment and command line, which it was started with: a user's `OMP_NUM_THREADS` is there, accelerate's default
is not.
"""
from __future__ import annotations

import logging
import os

import psutil
import torch

logger = logging.getLogger("sft_hf")


def node_cores() -> int:
    """Physical cores this process may run on (hyper-threads add little to matmuls)."""
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else physical  # taskset, cgroups
    return max(1, min(physical, allowed))


def local_processes() -> int:
    """Processes of this run on this node (torchrun / accelerate set LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _launcher_default_omp() -> bool:
    """True when OMP_NUM_THREADS was set by `accelerate launch` itself, not by the user.

    accelerate's launcher always exports ACCELERATE_MIXED_PRECISION to the script. Its process (our parent: the
    script's own process under the simple launcher, the worker's under torchrun's in-process agent) still shows the
    environment it was started with; if that had no OMP_NUM_THREADS and its command line no
    --num_cpu_threads_per_process, the value is the launcher's default."""
    if "OMP_NUM_THREADS" not in os.environ or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return False
    for process in psutil.Process().parents():
        try:
            environ, cmdline = process.environ(), process.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
            return False  # cannot tell: respect the value
        if "ACCELERATE_MIXED_PRECISION" in environ:
            continue  # a process started by the launcher (e.g. a wrapper): look further up
        return "OMP_NUM_THREADS" not in environ and not any(
            a.startswith("--num_cpu_threads_per_process") for a in cmdline)
    return False


def run_on_cpu(args=None) -> bool:
    """The run computes on the CPU, though the machine may have GPUs (sft_hf/precision.py `run_device` decides, for
    precision and threads alike)."""
    from sft_hf.precision import run_device

    return run_device(args) == "cpu"


def set_cpu_threads(requested: int | None = None, on_cpu: bool | None = None) -> int:
    """Set torch's intra-op threads and log how many and why; returns the number. `on_cpu`: whether the run computes
    on the CPU (`run_on_cpu(args)`; default: `run_on_cpu()`); a GPU run keeps the CPU's default."""
    if on_cpu is None:
        on_cpu = run_on_cpu()
    if requested is not None and requested > 0:
        threads, why = requested, "the recipe's cpu_threads"
    elif "OMP_NUM_THREADS" in os.environ and not _launcher_default_omp():
        threads = int(os.environ["OMP_NUM_THREADS"])
        why = f"OMP_NUM_THREADS={threads} set by the user"
    elif not on_cpu:
        return torch.get_num_threads()  # the GPU does the work; leave the CPU's default alone
    else:
        cores, procs = node_cores(), local_processes()
        threads = max(1, cores // procs)
        why = f"all {cores} cores of the node / {procs} local process{'es' if procs > 1 else ''}"
        if "OMP_NUM_THREADS" in os.environ:
            why += f"; accelerate launch's default OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} not taken"
    torch.set_num_threads(threads)
    logger.info("CPU threads: %d (%s); set OMP_NUM_THREADS or cpu_threads to choose", threads, why)
    return threads
