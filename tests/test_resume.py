"""A run SIGKILLed mid-epoch while writing a checkpoint resumes (`--resume_from_checkpoint true`) from the last
complete checkpoint, never the half-written one, and ends with the same losses and weights as an uninterrupted run."""
import json

import pytest
import torch
from transformers.trainer_utils import get_last_checkpoint

from sft_hf.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint, resolve_resume_checkpoint
from tiny_setup import load_weights, run_train, tiny_recipe_args, train_losses, write_tiny_dataset, write_tiny_model

# Killed inside Trainer._save_checkpoint for step 12: the weights and optimizer of checkpoint-12 are on disk, its
# RNG and trainer state are not. SIGKILL: no Python cleanup, no atexit, like the OOM killer or a preempted node.
CRASH_WHILE_SAVING_STEP_12 = """
import os, signal
from transformers import Trainer
save_rng_state = Trainer._save_rng_state
def crash_while_saving(self, output_dir):
    if self.state.global_step == 12:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng_state(self, output_dir)
Trainer._save_rng_state = crash_while_saving
"""


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    model = write_tiny_model(tmp_path / "model", dropout=0.1)  # dropout: the restored RNG state matters
    data = write_tiny_dataset(tmp_path / "data.jsonl")  # 64 train records, batch 4 → 16 steps in the one epoch
    recipe = dict(per_device_train_batch_size=4, max_length=128, save_strategy="steps", save_steps=4,
                  learning_rate=5e-3)

    run_train(tiny_recipe_args(model, data, tmp_path / "straight", **recipe))

    crashed = tmp_path / "crashed"
    result = run_train(tiny_recipe_args(model, data, crashed, **recipe), prelude=CRASH_WHILE_SAVING_STEP_12,
                       check=False)
    assert result.returncode == -9, result.stderr[-3000:]  # killed by SIGKILL
    assert (crashed / "checkpoint-12" / "model.safetensors").is_file()  # half-written at crash time
    assert not (crashed / "checkpoint-12" / COMPLETE_MARKER).exists()
    assert not (crashed / "checkpoint-12" / "trainer_state.json").exists()
    assert all((crashed / f"checkpoint-{s}" / COMPLETE_MARKER).is_file() for s in (4, 8))
    assert not (crashed / "model.safetensors").exists()  # the run never finished
    # plain transformers would pick the half-written folder; resume picks the last complete one
    assert get_last_checkpoint(str(crashed)) == str(crashed / "checkpoint-12")
    assert resolve_resume_checkpoint("true", str(crashed)) == str(crashed / "checkpoint-8")

    run_train(tiny_recipe_args(model, data, crashed, resume_from_checkpoint="true", **recipe))

    resumed_state = json.loads((crashed / "trainer_state.json").read_text())
    assert resumed_state["global_step"] == 16
    straight_losses, resumed_losses = train_losses(tmp_path / "straight"), train_losses(crashed)
    assert len(straight_losses) == len(resumed_losses) == 16
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(straight_losses), rtol=1e-6, atol=1e-6)
    assert (crashed / "checkpoint-12" / COMPLETE_MARKER).is_file()  # rewritten completely this time
    straight, resumed = load_weights(tmp_path / "straight"), load_weights(crashed)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-6, atol=1e-6, msg=name)


def test_resolve_resume_checkpoint(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False), (100, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / COMPLETE_MARKER).write_text(f"{step}\n")
    (tmp_path / "checkpoint-notes").mkdir()  # not a checkpoint name: ignored
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_resume_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    assert resolve_resume_checkpoint("false", str(tmp_path)) is None
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-5"), str(tmp_path)) == str(tmp_path / "checkpoint-5")
    assert resolve_resume_checkpoint("true", str(tmp_path / "empty")) is None  # fresh start, with a warning
    with pytest.raises(FileNotFoundError, match="checkpoint-7"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-7"), str(tmp_path))
