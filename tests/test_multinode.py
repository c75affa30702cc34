"""Two machines on one box: `accelerate launch` started twice through accelerate_configs/multi_node.yaml trains like one
process with gradient accumulation 2, and accelerate_configs/slurm_multinode.sh, run under a fake SLURM (its
variables, and stub `srun` / `scontrol` / `sbatch` that do their work here), saves a checkpoint on SIGUSR1 and
requeues itself, saves one on a SIGTERM at a random step, and goes on from them to the very same model."""
import json
import os
import random
import signal
import stat
import subprocess
import sys

import pytest
import torch

from cluster_setup import ACCELERATE, CONFIGS, error_lines, finish, free_port, start_machines, wait_for
from sft_hf.run.checkpoints import COMPLETE_MARKER
from tiny_setup import ROOT, load_weights, run_env, run_train, tiny_recipe_args, train_losses, write_tiny_dataset, \
    write_tiny_model

STEPS = 6
SCRIPT = str(CONFIGS / "slurm_multinode.sh")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    return write_tiny_model(tmp / "model"), write_tiny_dataset(tmp / "data.jsonl"), tmp


def recipe(assets, out, per_device_batch=4, accumulation=1):
    model, data, _ = assets
    return tiny_recipe_args(model, data, out, per_device_train_batch_size=per_device_batch,
                            gradient_accumulation_steps=accumulation, max_steps=STEPS, max_length=128,
                            save_strategy="steps", save_steps=2)


@pytest.fixture(scope="module")
def two_machines(assets):
    """The same global batch of 8 from one process (4 × accumulation 2) and from two machines (4 each)."""
    tmp = assets[2]
    run_train(recipe(assets, tmp / "one", accumulation=2))
    machines = start_machines(ACCELERATE, recipe(assets, tmp / "two"), env={"PROCESS_LOG": str(tmp / "processes")})
    results = [finish(machine) for machine in machines]
    for code, err in results:
        assert code == 0, err[-4000:]
    return tmp


def test_multi_node_config_meets_at_the_main_process():
    """What torchrun gets from the config and each machine's flags: on one box both machines would also meet at a
    wrong address (localhost), so the address is checked here."""
    import torch.distributed.run as torchrun
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import _filter_args, prepare_multi_gpu_env

    for machine in (0, 1):
        args = launch_command_parser().parse_args([
            "--config_file", str(CONFIGS / "multi_node.yaml"), "--num_machines", "2", "--machine_rank", str(machine),
            "--num_processes", "16", "--main_process_ip", "10.1.2.3", "--main_process_port", "12345", "train.py"])
        args, _, _ = _validate_launch_command(args)
        prepare_multi_gpu_env(args)
        config, _, _ = torchrun.config_from_args(_filter_args(args, torchrun.get_args_parser(), [
            "--training_script", args.training_script, "--training_script_args", args.training_script_args]))
        assert (config.rdzv_backend, config.rdzv_endpoint) == ("static", "10.1.2.3:12345")
        assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)
        assert config.rdzv_configs["rank"] == machine


def test_two_machines_on_one_box_train_like_one_process_with_gradient_accumulation(two_machines):
    tmp = two_machines
    # two machines of one process each, met at the port given: world size 2, ranks 0 and 1
    port = {line.split()[2] for line in (tmp / "processes").read_text().splitlines()}
    assert {tuple(line.split()[:2]) for line in (tmp / "processes").read_text().splitlines()} == {("0", "2"),
                                                                                                   ("1", "2")}
    assert len(port) == 1 and port.pop().startswith("127.0.0.1:")
    one, two = train_losses(tmp / "one"), train_losses(tmp / "two")
    assert len(two) == STEPS and two[-1] < two[0] - 0.5  # it learned: matching is not trivial
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)
    weights, reference = load_weights(tmp / "two"), load_weights(tmp / "one")
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-4, atol=1e-4, msg=name)


SRUN = """#!{python}
# srun here: the step's command once per node, on this machine, with that node's SLURM variables; a signal sent to srun
# goes on to every task (as srun forwards it); the exit code is the highest.
import os, signal, subprocess, sys
tasks = [subprocess.Popen(sys.argv[1:], env={{**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node),
                                               "SLURM_LOCALID": "0"}})
         for node in range(int(os.environ["SLURM_NNODES"]))]
def forward(signum, frame):
    for task in tasks:
        if task.poll() is None:
            task.send_signal(signum)
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
    signal.signal(signum, forward)
codes = [task.wait() for task in tasks]
sys.exit(max(128 - code if code < 0 else code for code in codes))
"""
# scontrol here: each node's host name is this machine's; a requeue is written down
SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") for ((node = 0; node < SLURM_NNODES; node++)); do echo localhost; done ;;
    requeue*) echo "requeue $2" >> "$SLURM_STUB_LOG" ;;
    *) exit 1 ;;
esac
"""
SBATCH = """#!/bin/bash
echo "sbatch $*" >> "$SLURM_STUB_LOG"
"""


def fake_slurm(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN.format(python=sys.executable)), ("scontrol", SCONTROL), ("sbatch", SBATCH)):
        (stubs / name).write_text(text)
        (stubs / name).chmod((stubs / name).stat().st_mode | stat.S_IEXEC)
    return dict(run_env(), PATH=f"{stubs}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                SLURM_STUB_LOG=str(tmp_path / "slurm.log"))


def test_the_slurm_script_outside_a_job_makes_its_log_folder_and_submits_itself(tmp_path):
    env = fake_slurm(tmp_path)
    env.pop("SLURM_JOB_ID", None)
    subprocess.run(["bash", SCRIPT, "--config", "recipes/x.yaml"], env=env, cwd=tmp_path, check=True, timeout=60)
    assert (tmp_path / "logs").is_dir()  # SLURM opens logs/%x-%j.out before the job starts: it must exist
    assert (tmp_path / "slurm.log").read_text() == f"sbatch {SCRIPT} --config recipes/x.yaml\n"


def test_slurm_job_saves_on_sigusr1_or_sigterm_requeues_itself_and_ends_like_an_uninterrupted_run(
        assets, two_machines, tmp_path):
    """Three jobs of the same script: SIGUSR1 before the time limit (saved, requeued), SIGTERM to one process at a
    random step (saved, not requeued: a cancelled or preempted job is SLURM's to requeue), then to the end."""
    rng = random.Random(34)
    first = rng.randint(2, 3)
    second = rng.randint(first + 1, STEPS - 1)
    out = tmp_path / "run"
    env = dict(fake_slurm(tmp_path), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2",
               GPUS_PER_NODE="1", MAIN_PORT=str(free_port()), ACCELERATE_CONFIG=str(CONFIGS / "multi_node.yaml"),
               TRAIN_SCRIPT=str(ROOT / "tests" / "scripts" / "cluster_faults.py"))

    def job(fault=None):
        return subprocess.Popen(["bash", SCRIPT, *recipe(assets, out)], env={**env, **(fault or {})}, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # rank 1 waits at the end of step `first` for the signal; rank 0 never sees it (blocked), so both stop only if
    # they agree; and a SIGTERM comes on top while the checkpoint is written
    running = job(dict(FAULT="wait", FAULT_STEP=str(first), FAULT_RANK="1", FAULT_DIR=str(tmp_path),
                       BLOCK_SIGNALS_RANK="0", SIGTERM_WHILE_SAVING="self"))
    wait_for(tmp_path / f"step-{first}-rank-1", running)
    running.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` does 120 s before the time limit
    out_text, err = running.communicate(timeout=300)
    assert running.returncode == 143, err[-4000:]
    assert error_lines(err) == [(f"error: stopped by SIGUSR1 at step {first} of {STEPS}: {out}/checkpoint-{first} is "
                                 "saved and complete; run the same command to go on from it")]
    assert err.count("SIGUSR1: finishing this optimizer step") == 1  # rank 1's: rank 0 stopped because they agreed
    assert "SIGTERM again: still stopping" in err
    assert "requeueing job 4242" in out_text
    assert (tmp_path / "slurm.log").read_text() == "requeue 4242\n"
    assert (out / f"checkpoint-{first}" / COMPLETE_MARKER).is_file() and (tmp_path / "logs").is_dir()

    running = job(dict(FAULT="sigterm-self", FAULT_STEP=str(second), FAULT_RANK="1"))  # the requeued job
    out_text, err = running.communicate(timeout=300)
    assert running.returncode == 143, err[-4000:]
    assert f"resuming from {out}/checkpoint-{first}" in err
    assert error_lines(err) == [(f"error: stopped by SIGTERM at step {second} of {STEPS}: {out}/checkpoint-{second} "
                                 "is saved and complete; run the same command to go on from it")]
    assert "requeueing" not in out_text and (tmp_path / "slurm.log").read_text() == "requeue 4242\n"

    running = job()  # submitted again
    out_text, err = running.communicate(timeout=300)
    assert running.returncode == 0, err[-4000:]
    assert f"resuming from {out}/checkpoint-{second}" in err
    assert (tmp_path / "slurm.log").read_text() == "requeue 4242\n"  # finished: not requeued
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == STEPS
    straight = two_machines / "two"
    assert train_losses(out) == train_losses(straight)  # bit for bit
    weights, reference = load_weights(out), load_weights(straight)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)
