"""The other processes of a run (sft_hf/run/peers.py): a process that dies ends the run within dead_rank_timeout with
one line naming it and the checkpoint to resume from; a machine that freezes too; the main process may prepare the
data for longer than the process-group timeout, and the others and the next run reuse what it cached."""
import atexit
import json
import os
import subprocess
import sys
import threading
from datetime import timedelta

import psutil
import pytest
import torch.distributed as dist

from cluster_setup import ACCELERATE, CONFIGS, SFT_HF, error_lines, finish, launch, start_machines
from sft_hf.run.checkpoints import COMPLETE_MARKER, mark_complete
from sft_hf.run.peers import PeerWatch, is_communication_error, machine_id
from tiny_setup import tiny_recipe_args, train_losses, write_tiny_dataset, write_tiny_model

# --- the watch, on a store of its own ---------------------------------------------------------------------------


@pytest.fixture
def store(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # PeerWatch.start sets its own: put back afterwards
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    yield dist.PrefixStore("sft_hf/0", server)


def watch(store, tmp_path, rank, world_size=2, local_world_size=1, timeout=0.6):
    verdicts = []
    done = threading.Event()

    def on_verdict(line):
        verdicts.append(line)
        done.set()

    peers = PeerWatch(store, rank, world_size, rank % local_world_size, local_world_size, timeout, str(tmp_path),
                      on_verdict=on_verdict, running=lambda: not done.is_set())
    peers.start()
    atexit.unregister(peers.leave)  # this test's store is gone when pytest exits
    return peers, verdicts, done


def publish(store, rank, pid, machine="another machine", host="node-7"):
    store.set(f"process/{rank}", json.dumps({"host": host, "machine": machine, "pid": pid, "local_rank": 0}))
    store.add(f"beat/{rank}", 1)


def test_a_process_whose_heartbeat_stops_is_named_with_the_checkpoint_to_resume_from(store, tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    mark_complete(tmp_path / "checkpoint-4", 4)
    publish(store, 1, pid=4242)  # on another machine: only its heartbeat tells, and it beat once
    _, verdicts, done = watch(store, tmp_path, rank=0)
    assert done.wait(30)
    assert verdicts == [(f"error: rank 1 (pid 4242 on node-7) gave no sign of life for 0.5 s (dead_rank_timeout 0.6): "
                         f"its machine froze, died or lost the network; the run stops. {tmp_path}/checkpoint-4 is the "
                         "newest complete checkpoint: run the same command with --resume_from_checkpoint true to go on "
                         "from it")]
    assert json.loads(store.get("verdict"))["rank"] == 1  # for every other process to read


def test_a_process_of_this_machine_is_dead_when_its_pid_is_gone(store, tmp_path, capfd):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    publish(store, 0, pid=gone.pid, machine=machine_id(), host="here")
    _, verdicts, done = watch(store, tmp_path, rank=1, local_world_size=2, timeout=6)  # its pid tells first
    assert done.wait(30)
    line = (f"error: rank 0 (pid {gone.pid} on here) died: its process is gone (killed by the OOM killer or a "
            "signal?); the run stops. no checkpoint was saved yet (save_strategy: steps keeps them)")
    assert verdicts == [line]
    assert capfd.readouterr().err.strip() == line  # printed by rank 1: the first process of its machine is the dead one


def test_a_process_that_ended_with_its_own_error_stops_the_others_once_a_collective_fails(store, tmp_path):
    publish(store, 1, pid=4242)
    store.set("left/1", "1")  # it exited through Python: its own error is printed already
    peers, verdicts, done = watch(store, tmp_path, rank=0, timeout=6)
    assert not done.wait(2)  # maybe it was Ctrl-C, reaching every process: this one is given time to end too
    peers.failed_collective.set()  # ... but a collective failed: nobody is left to answer it
    assert done.wait(30)
    assert verdicts[0].startswith("error: rank 1 (pid 4242 on node-7) ended with an error of its own (see its "
                                  "message), and the others cannot go on without it; the run stops.")


def test_when_the_store_stops_answering_rank_0s_launcher_is_gone(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = dist.PrefixStore("sft_hf/0", dist.TCPStore("127.0.0.1", server.port, is_master=False,
                                                        wait_for_workers=False, timeout=timedelta(seconds=6)))
    publish(client, 0, pid=4242)
    _, verdicts, done = watch(client, tmp_path, rank=1, timeout=6)
    del server  # the launcher that held it died (accelerate launch dies of a SIGUSR1 it does not handle)
    assert done.wait(30)
    assert verdicts[0].startswith("error: the launcher of rank 0's machine is gone (it held the store at ")
    # no process is known dead: the first process of each machine says it (here rank 1, alone on its machine)
    assert error_lines(capfd.readouterr().err) == verdicts


def test_a_failed_collective_with_every_process_alive_is_shown_as_it_is(store, tmp_path):
    publish(store, 1, pid=4242)
    peers, verdicts, _ = watch(store, tmp_path, rank=0, timeout=6)
    peers.failed_collective.set()
    for _ in range(400):  # rank 1 beats on
        store.add("beat/1", 1)
        if peers.all_alive.wait(0.05):
            break
    assert peers.all_alive.is_set() and not verdicts  # not a death: the error itself is the message
    assert is_communication_error(RuntimeError(
        "[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1420. This is "
        "typically caused by a remote worker crashing."))
    assert not is_communication_error(ValueError("bad data"))


# --- processes ------------------------------------------------------------------------------------------------

STEPS = 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peers")
    return write_tiny_model(tmp / "model"), write_tiny_dataset(tmp / "data.jsonl"), tmp


def recipe(assets, out, **extra):
    model, data, _ = assets
    return tiny_recipe_args(model, data, out, per_device_train_batch_size=4, max_steps=STEPS, max_length=128,
                            save_strategy="steps", save_steps=4, resume_from_checkpoint="true", **extra)


@pytest.fixture(scope="module")
def killed_then_resumed(assets):
    """2 processes; the main one tokenizes for longer than the process-group timeout (3 splits × 4 s > ddp_timeout
    8 s); rank 1 is SIGKILLed at the end of step 6; then the same command again."""
    tmp = assets[2]
    out, log = tmp / "run", tmp / "tokenized"
    env = {"HF_DATASETS_CACHE": str(tmp / "datasets"), "TOKENIZE_LOG": str(log)}
    config = ["--config_file", str(CONFIGS / "cpu_2proc.yaml")]
    killed = launch(ACCELERATE, config, recipe(assets, out, ddp_timeout=8),
                    env={**env, "TOKENIZE_SECONDS": "4", "FAULT": "sigkill-self", "FAULT_STEP": "6", "FAULT_RANK": "1"})
    tokenized_first = log.read_text().split()
    resumed = launch(ACCELERATE, config, recipe(assets, out, ddp_timeout=8), env=env)
    return out, killed, resumed, tokenized_first, log.read_text().split()


def test_a_killed_process_ends_the_run_with_one_line_naming_it_and_the_checkpoint(killed_then_resumed):
    out, killed, _, _, _ = killed_then_resumed
    assert killed.returncode == 1  # accelerate launch's own code for a failed process (sft-hf launch: the first's)
    [line] = error_lines(killed.stderr)
    assert line.startswith("error: rank 1 (pid ")
    assert line.endswith(f"died: its process is gone (killed by the OOM killer or a signal?); the run stops. "
                         f"{out}/checkpoint-4 is the newest complete checkpoint: run the same command with "
                         "--resume_from_checkpoint true to go on from it")
    assert "exitcode  : 4" in killed.stderr  # the survivor's: another process died
    assert (out / "checkpoint-4" / COMPLETE_MARKER).is_file() and not (out / "checkpoint-6").exists()


def test_the_same_command_goes_on_from_the_last_complete_checkpoint(killed_then_resumed):
    out, _, resumed, _, _ = killed_then_resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out}/checkpoint-4" in resumed.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS and [h["step"] for h in state["log_history"] if "loss" in h] == list(
        range(1, STEPS + 1))
    assert len(train_losses(out)) == STEPS


def test_data_preparation_longer_than_the_process_group_timeout(killed_then_resumed):
    out, killed, _, tokenized_first, tokenized_both = killed_then_resumed
    assert "Timed out" not in killed.stderr and (out / "checkpoint-4").is_dir()  # past the preparation, training
    assert tokenized_first == ["0", "0", "0"]  # train, validation, test: by the main process only
    assert tokenized_both == tokenized_first  # the next run tokenized nothing: rank 0's cache


def test_a_frozen_machine_ends_the_run_within_dead_rank_timeout(assets, tmp_path):
    """Machine 1's process stops answering (SIGSTOP: no closed connection, no exit, like a machine that froze or lost
    the network): machine 0 ends within dead_rank_timeout, naming it."""
    machines = start_machines(SFT_HF, recipe(assets, tmp_path / "run", dead_rank_timeout=6),
                              env={"FAULT": "sigstop-self", "FAULT_STEP": "6", "FAULT_RANK": "1"})
    try:
        code, err = finish(machines[0])
    finally:
        for process in psutil.Process(machines[1].pid).children(recursive=True):
            process.kill()  # the frozen one
        frozen_code, _ = finish(machines[1])
    assert code == 4, err[-3000:]  # sft-hf launch: its process's exit code
    assert frozen_code == 128 + 9  # a process killed by SIGKILL, as a shell reports it
    [line] = error_lines(err)
    assert line.startswith("error: rank 1 (pid ") and line.endswith(
        f"gave no sign of life for 5 s (dead_rank_timeout 6): its machine froze, died or lost the network; the run "
        f"stops. {tmp_path}/run/checkpoint-4 is the newest complete checkpoint: run the same command with "
        "--resume_from_checkpoint true to go on from it")
    assert os.listdir(tmp_path / "run") == ["checkpoint-4"]
