"""CPU threads (sft_hf/speed/threads.py) as a user meets them through `accelerate launch recipes/train.py` and
`recipes/evaluate.py`: every core unless the user chose, a CPU run on a GPU machine too; the first run also checks
that its effective recipe, saved as recipe.yaml, re-runs to the same arguments."""
import dataclasses
import os
import re
import subprocess
import sys

import psutil
import pytest
import yaml

from sft_hf.run.config import parse_recipe

from tiny_setup import ROOT, TRAIN, write_tiny_dataset, write_tiny_model

SECRET = "hf_NotARealTokenButSecret123"


def cores() -> int:
    return min(psutil.cpu_count(logical=False) or 1, len(os.sched_getaffinity(0)))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_files")
    return write_tiny_model(folder / "model"), write_tiny_dataset(folder / "data.jsonl")


def launch(tiny_files, out, omp: str | None, *extra) -> subprocess.CompletedProcess:
    """`accelerate launch recipes/train.py ...` (no accelerate config: its launcher sets OMP_NUM_THREADS=1)."""
    model, data = tiny_files
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "OMP_NUM_THREADS"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **({"OMP_NUM_THREADS": omp} if omp else {}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", TRAIN, "--model_name_or_path", model,
           "--dataset_name", data, "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
           "--max_length", "64", "--learning_rate", "1e-3", "--report_to", "none", "--save_strategy", "no", *extra]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def threads_logged(result) -> int:
    (line,) = [line for line in result.stderr.splitlines() if "CPU threads:" in line]
    return int(re.search(r"CPU threads: (\d+)", line).group(1))


@pytest.mark.skipif(cores() < 2, reason="needs 2 cores to tell every core from accelerate's 1")
def test_accelerate_launch_uses_every_core_unless_the_user_sets_omp_num_threads(tiny_files, tmp_path):
    default = launch(tiny_files, tmp_path / "a", None, "--hub_token", SECRET)
    assert threads_logged(default) == cores()
    assert "accelerate launch's default OMP_NUM_THREADS=1 not taken" in default.stderr
    assert threads_logged(launch(tiny_files, tmp_path / "b", "1")) == 1  # the user's choice stands
    assert threads_logged(launch(tiny_files, tmp_path / "c", None, "--cpu_threads", "1")) == 1  # so does the recipe's

    # the effective recipe: logged, saved (re-runnable), in the model card; the token nowhere
    recipe = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    assert recipe["max_steps"] == 2 and recipe["learning_rate"] == 1e-3 and "hub_token" not in recipe
    assert "num_train_epochs" not in recipe and "seed" not in recipe  # defaults are not repeated
    assert "recipe: model_name_or_path=" in default.stderr
    card = (tmp_path / "a" / "README.md").read_text()
    assert "## Recipe" in card and "max_steps: 2" in card
    for text in (default.stdout, default.stderr, card, (tmp_path / "a" / "recipe.yaml").read_text()):
        assert SECRET not in text

    original = parse_recipe(["--model_name_or_path", tiny_files[0], "--dataset_name", tiny_files[1], "--output_dir",
                             str(tmp_path / "a"), "--max_steps", "2", "--per_device_train_batch_size", "4",
                             "--max_length", "64", "--learning_rate", "1e-3", "--report_to", "none",
                             "--save_strategy", "no"])
    rerun = parse_recipe(["--config", str(tmp_path / "a" / "recipe.yaml")])
    assert [dataclasses.asdict(a) for a in rerun[:2]] == [dataclasses.asdict(a) for a in original[:2]]
    assert rerun[2].to_dict() == original[2].to_dict()


@pytest.mark.skipif(cores() < 2, reason="needs 2 cores to tell every core from accelerate's 1")
def test_evaluate_under_accelerate_launch_uses_every_core(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "OMP_NUM_THREADS"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", str(ROOT / "recipes" / "evaluate.py"),
                             "--model", "builtin:tiny-llama", "--dataset_name", "builtin:toy-tasks", "--max_samples",
                             "2", "--max_new_tokens", "2", "--output_dir", str(tmp_path / "eval")],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert threads_logged(result) == cores()


def test_a_cpu_run_on_a_gpu_machine_gets_the_cpu_thread_policy(monkeypatch):
    """accelerate_configs/cpu.yaml (ACCELERATE_USE_CPU) or --use_cpu on a machine with a GPU: the node's cores shared
    by its processes, as without a GPU; a GPU run leaves torch's threads alone."""
    from types import SimpleNamespace

    import torch

    from sft_hf.speed import threads

    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(threads, "node_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for name in ("OMP_NUM_THREADS", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    gpu_run = SimpleNamespace(use_cpu=False, device=torch.device("cuda", 0))
    assert not threads.run_on_cpu(gpu_run)
    threads.set_cpu_threads(None, threads.run_on_cpu(gpu_run))
    assert set_to == []
    for args, environ in ((SimpleNamespace(use_cpu=True, device=torch.device("cpu")), {}),
                          # one process under cpu.yaml: TrainingArguments' device reads cuda:0, the flag says CPU
                          (gpu_run, {"ACCELERATE_USE_CPU": "true"})):
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        assert threads.run_on_cpu(args)
        assert threads.set_cpu_threads(None, threads.run_on_cpu(args)) == 4
    assert set_to == [4, 4]
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")  # what accelerate launch exports for a GPU config
    assert not threads.run_on_cpu(gpu_run)
