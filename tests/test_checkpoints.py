"""Crash-safe checkpoints (sft_hf/run/checkpoints.py): a run SIGKILLed mid-epoch or while writing a checkpoint resumes
(`--resume_from_checkpoint true`) from the last complete checkpoint, never a half-written one, and ends with the same
losses and weights as an uninterrupted run; rotation never deletes the newest complete checkpoint."""
import json
import os

import pytest
import torch
import yaml
from transformers.trainer_utils import get_last_checkpoint

from sft_hf.run.checkpoints import (COMPLETE_MARKER, check_resume_recipe, latest_complete_checkpoint, mark_complete, resolve_resume_checkpoint,
                                rotate_checkpoints)
from sft_hf.errors import RecipeError
from tiny_setup import CRASH_WHILE_SAVING_STEP_12, load_weights, run_train, tiny_recipe_args, train_losses, \
    write_tiny_dataset, write_tiny_model



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
    with pytest.raises(RecipeError, match="^resume_from_checkpoint: .*checkpoint-7 is not a checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-7"), str(tmp_path))
    # a finished run without checkpoints (save_strategy "no") is never replaced by a silent fresh start
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "config.json").write_text("{}")
    with pytest.raises(RecipeError, match=r"holds a finished model \(config.json\) and no checkpoint to resume from"):
        resolve_resume_checkpoint("true", str(finished))
    assert os.listdir(finished) == ["config.json"]


def test_check_resume_recipe_names_every_training_value_that_changed(tmp_path):
    (tmp_path / "recipe.yaml").write_text("learning_rate: 0.001\nlora_r: 8\nlogging_steps: 10\n")
    check_resume_recipe(tmp_path, {"learning_rate": 0.001, "lora_r": 8, "logging_steps": 50, "eval_steps": 5})
    with pytest.raises(RecipeError) as error:
        check_resume_recipe(tmp_path, {"learning_rate": 0.002, "logging_steps": 10, "template": "chatml"})
    assert str(error.value).startswith(f"resume_from_checkpoint: {tmp_path} was trained with other values "
                                       "(learning_rate 0.001 → 0.002, lora_r 8 → default, template default → 'chatml')")
    check_resume_recipe(tmp_path / "old-checkpoint", {"learning_rate": 1.0})  # no recipe.yaml: not checked


# Killed in on_save, after Trainer wrote checkpoint-8 (and, before the fix, rotated checkpoint-4 away).
CRASH_BEFORE_ROTATING_AT_STEP_8 = """
import os, signal
from sft_hf.run import checkpoints
rotate = checkpoints.rotate_checkpoints
def crash_before_rotating(output_dir, limit, keep=()):
    if any(str(k).endswith("checkpoint-8") for k in keep if k):
        os.kill(os.getpid(), signal.SIGKILL)
    return rotate(output_dir, limit, keep)
checkpoints.rotate_checkpoints = crash_before_rotating
"""


def test_rotation_keeps_a_complete_checkpoint_through_a_crash_then_resumes(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    data = write_tiny_dataset(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    recipe = dict(per_device_train_batch_size=4, max_length=128, save_strategy="steps", save_steps=4,
                  save_total_limit=1)
    result = run_train(tiny_recipe_args(model, data, out, **recipe), prelude=CRASH_BEFORE_ROTATING_AT_STEP_8,
                       check=False)
    assert result.returncode == -9, result.stderr[-3000:]
    # checkpoint-8 was marked complete before checkpoint-4 was to be rotated out (Trainer alone rotates first)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert (out / "checkpoint-8" / COMPLETE_MARKER).is_file()
    saved_recipe = yaml.safe_load((out / "checkpoint-8" / "recipe.yaml").read_text())
    assert saved_recipe["save_total_limit"] == 1 and saved_recipe["learning_rate"] == 1e-2

    # (a resume with other training values is refused: tests/test_safety.py::test_second_run_into_a_non_empty_output_dir)
    # values that only change how the run is logged, evaluated or saved may change (cpu_threads here)
    result = run_train(tiny_recipe_args(model, data, out, resume_from_checkpoint="true", cpu_threads=1, **recipe))
    assert f"resuming from {out / 'checkpoint-8'}" in result.stderr
    assert "starting from scratch" not in result.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 16
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, 17))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16"]


def test_a_checkpoint_written_again_is_unmarked_until_complete(tmp_path, tiny_model_dir, monkeypatch):
    """Resuming from an older checkpoint re-saves over checkpoint-N: its old marker must go before the first write,
    or a crash during that save leaves a mix of old and new files marked complete."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer

    from sft_hf import InstructionDataCollator, InstructionTrainer, SFTArguments

    stale = tmp_path / "checkpoint-2"
    stale.mkdir()
    mark_complete(stale, 2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = Dataset.from_list([{"input_ids": list(range(3, 3 + n)), "prompt_length": 1} for n in (5, 7, 9, 6)])
    args = SFTArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, save_strategy="steps",
                        save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = InstructionTrainer(model=model, args=args, train_dataset=rows,
                                 data_collator=InstructionDataCollator(pad_token_id=0))

    def crash(self, output_dir):
        assert (stale / "model.safetensors").is_file()  # the new weights are in, the save is not finished
        raise OSError("disk full")

    monkeypatch.setattr(Trainer, "_save_rng_state", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert not (stale / COMPLETE_MARKER).exists()


def test_rotate_checkpoints_never_deletes_the_newest_complete_one(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False), (8, False), (10, True)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            mark_complete(tmp_path / f"checkpoint-{step}", step)

    def names():
        return sorted((p.name for p in tmp_path.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))

    assert rotate_checkpoints(tmp_path, None) == [] and len(names()) == 5
    # half-written leftovers go first, then the oldest complete; the best one (4) is kept on request
    rotate_checkpoints(tmp_path, 3, keep=[tmp_path / "checkpoint-4"])
    assert names() == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    rotate_checkpoints(tmp_path, 1, keep=[tmp_path / "checkpoint-4"])
    assert names() == ["checkpoint-4", "checkpoint-10"]  # the newest complete one and the best: both protected
    (tmp_path / "checkpoint-12").mkdir()  # being written right now, not yet marked
    rotate_checkpoints(tmp_path, 1, keep=[tmp_path / "checkpoint-12"])
    assert names() == ["checkpoint-10", "checkpoint-12"]
