"""How long a run takes to stop after a fault (docs/scale.md#on-a-cluster-preemption-machines-dead-processes).

    python benchmarks/bench_faults.py                        # every case, about 5 minutes on 2 CPU cores
    python benchmarks/bench_faults.py --cases sigterm-1 kill-2

The tiny test model trains under a launcher, and tests/scripts/cluster_faults.py injects the fault at the end of
step 6 (it writes a file just before: the fault's time). Printed: the seconds from the fault to the end of the
process that has to notice it, its exit code, and its last line.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from cluster_setup import ACCELERATE, CONFIGS, FAULTS, SFT_HF, error_lines, finish, start_machines  # noqa: E402
from tiny_setup import run_env, tiny_recipe_args, write_tiny_dataset, write_tiny_model  # noqa: E402

STEP = 6
CASES = {  # name: (what, launcher, machines, fault, rank that gets it, extra recipe values)
    "sigterm-1": ("SIGTERM to sft-hf launch, 1 process", SFT_HF, 1, "sigterm-launcher", 0, {}),
    "sigterm-2": ("SIGTERM to sft-hf launch, 2 processes", SFT_HF, 1, "sigterm-launcher", 0, {}),
    "kill-2": ("SIGKILL of rank 1 of 2 processes, accelerate launch", ACCELERATE, 1, "sigkill-self", 1, {}),
    "kill-machine": ("SIGKILL of machine 1's process, two machines, sft-hf launch", SFT_HF, 2, "sigkill-self", 1, {}),
    "freeze-6": ("SIGSTOP of machine 1's process, dead_rank_timeout 6", SFT_HF, 2, "sigstop-self", 1,
                 {"dead_rank_timeout": 6}),
    "freeze": ("SIGSTOP of machine 1's process, dead_rank_timeout 60 (default)", SFT_HF, 2, "sigstop-self", 1, {}),
    "freeze-off": ("SIGSTOP of machine 1's process, dead_rank_timeout 0 (no watch)", SFT_HF, 2, "sigstop-self", 1,
                   {"dead_rank_timeout": 0}),
}
PATIENCE = 150  # seconds after the fault before a case counts as "still waiting"


def run_case(name: str, tmp: Path, model: str, data: str) -> str:
    what, launcher, machines, fault, rank, extra = CASES[name]
    out = tmp / name
    out.mkdir()
    argv = tiny_recipe_args(model, data, out / "run", per_device_train_batch_size=4, max_steps=8, max_length=128,
                            save_strategy="steps", save_steps=4, **extra)
    env = {"FAULT": fault, "FAULT_STEP": str(STEP), "FAULT_RANK": str(rank), "FAULT_DIR": str(out)}
    if machines == 2:
        processes = start_machines(launcher, argv, env)
    else:
        config = (["--num_processes", "1", "--cpu"] if name == "sigterm-1"
                  else ["--config_file", str(CONFIGS / "cpu_2proc.yaml")])
        processes = [subprocess.Popen([*launcher, *config, FAULTS, *argv], env={**run_env(), **env}, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    marker = out / f"step-{STEP}-rank-{rank}"
    try:
        while not marker.exists() and processes[0].poll() is None:
            time.sleep(0.05)
        try:
            code, err = finish(processes[0], timeout=PATIENCE)
            seconds = time.time() - marker.stat().st_mtime
            last = (error_lines(err) or [""])[-1]
            result = f"{seconds:5.1f} s, exit {code}: {last[:110]}"
        except subprocess.TimeoutExpired:
            result = f"still waiting {time.time() - marker.stat().st_mtime:.0f} s after the fault"
    finally:
        for process in processes:  # a frozen machine, a launcher still waiting
            if process.poll() is None:
                for child in psutil.Process(process.pid).children(recursive=True):
                    child.kill()
                process.kill()
                process.communicate()
    return f"{name:13} {what}: {result}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        model, data = write_tiny_model(tmp / "model"), write_tiny_dataset(tmp / "data.jsonl")
        for name in args.cases:
            print(run_case(name, tmp, model, data), flush=True)


if __name__ == "__main__":
    main()
