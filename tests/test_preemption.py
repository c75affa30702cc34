"""SIGTERM / SIGUSR1 (sft_hf/run/preemption.py): the run finishes its optimizer step, saves a complete checkpoint, says
where in one line and exits 143; the same command goes on from it and ends exactly like a run never interrupted.
(With 2 processes and two machines: tests/test_multinode.py, the SLURM job that requeues itself.)"""
import json
import random
import signal

import pytest
import torch

from cluster_setup import SFT_HF, error_lines, launch
from sft_hf.errors import Preempted
from sft_hf.run.checkpoints import COMPLETE_MARKER
from sft_hf.run.preemption import StopOnSignal
from sft_hf.run.safety import agreed_max
from tiny_setup import load_weights, run_train, tiny_recipe_args, train_losses, write_tiny_dataset, write_tiny_model

STEPS = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preemption")
    # dropout: the resumed run must restore the RNG state too
    return write_tiny_model(tmp / "model", dropout=0.1), write_tiny_dataset(tmp / "data.jsonl")


def recipe(assets, out):
    model, data = assets
    # the command that starts the run and goes on after a stop: one and the same
    return tiny_recipe_args(model, data, out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                            max_steps=STEPS, max_length=128, learning_rate=5e-3, save_strategy="steps", save_steps=2,
                            resume_from_checkpoint="true")


def test_sigterm_at_a_random_step_saves_a_checkpoint_and_the_same_command_goes_on_bit_for_bit(assets, tmp_path):
    step = random.Random(33).randint(3, STEPS - 1)  # a step between two save_steps or on one
    run_train(recipe(assets, tmp_path / "straight"))

    out = tmp_path / "preempted"
    # SIGTERM to `sft-hf launch` at the end of `step` (it forwards it), and again while that checkpoint is written
    result = launch(SFT_HF, ["--num_processes", "1", "--cpu"], recipe(assets, out),
                    env={"FAULT": "sigterm-launcher", "FAULT_STEP": str(step), "SIGTERM_WHILE_SAVING": "launcher"})
    assert result.returncode == 143, result.stderr[-3000:]
    assert error_lines(result.stderr) == [
        (f"error: stopped by SIGTERM at step {step} of {STEPS}: {out}/checkpoint-{step} is saved and complete; run the "
         "same command to go on from it")]
    assert result.stderr.strip().splitlines()[-1] == error_lines(result.stderr)[0]  # the launcher adds nothing
    assert "SIGTERM again: still stopping" in result.stderr  # the second one came while the checkpoint was written
    assert (out / f"checkpoint-{step}" / COMPLETE_MARKER).is_file()
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step and len([h for h in state["log_history"] if "loss" in h]) == step
    assert not (out / "config.json").exists()  # no final model: the run is not over

    resumed = run_train(recipe(assets, out))
    assert f"resuming from {out}/checkpoint-{step}" in resumed.stderr
    assert train_losses(out) == train_losses(tmp_path / "straight")  # bit for bit
    straight, weights = load_weights(tmp_path / "straight"), load_weights(out)
    assert straight.keys() == weights.keys()
    assert all(torch.equal(weights[name], straight[name]) for name in straight)


class Control:
    should_save = should_training_stop = should_evaluate = False


class State:
    global_step, max_steps = 4, 10


class Args:
    device = torch.device("cpu")


def test_signal_before_training_stops_at_once_and_during_training_at_the_step_end():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    stopper = StopOnSignal()
    try:
        with pytest.raises(Preempted, match="^stopped by SIGUSR1 before training started: nothing was trained"):
            signal.raise_signal(signal.SIGUSR1)  # data preparation, model loading: nothing to lose
        stopper.received = 0
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:  # Ctrl-C is ending the run (accelerate launch then sends SIGTERM): its line stays
            signal.raise_signal(signal.SIGTERM)
        stopper.received = 0
        stopper.on_train_begin(Args, State, Control())
        control = stopper.on_step_end(Args, State, Control())
        assert not control.should_save and not control.should_training_stop  # no signal: one flag read, nothing else
        signal.raise_signal(signal.SIGTERM)  # only a flag now: the step finishes
        assert stopper.received == signal.SIGTERM and not stopper.stopped
        control = stopper.on_step_end(Args, State, Control())
        assert control.should_save and control.should_training_stop and not control.should_evaluate
        assert stopper.stopped_step == 4 and agreed_max(0, "cpu") == 0  # one process: no collective
        signal.raise_signal(signal.SIGTERM)  # a second one changes nothing
        assert stopper.agreed == signal.SIGTERM and stopper.stopped_step == 4
    finally:
        stopper.restore()
    assert {sig: signal.getsignal(sig) for sig in previous} == previous

    # a run that ended in an error never restores: once its StopOnSignal is gone, the handler from before answers
    received = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        StopOnSignal()  # not kept: collected at once
        signal.raise_signal(signal.SIGUSR1)
        assert received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous[signal.SIGUSR1])
