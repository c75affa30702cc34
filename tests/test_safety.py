"""Safety (sft_hf/run/safety.py): a non-finite loss stops before the update, an fp16 run whose every step overflows
stops, saves are atomic (an interrupted save never loads as a model), a second run into a non-empty output_dir says
what to do, weights only as safetensors, remote code only when asked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from sft_hf import train as train_recipe  # noqa: E402  (recipes/train.py runs it)
from sft_hf.collator import InstructionDataCollator
from sft_hf.errors import NonFiniteLossError, run_cli
from sft_hf.modeling import load_model, load_tokenizer
from sft_hf.run import safety
from sft_hf.run.config import ModelArguments, RecipeError, SFTArguments
from sft_hf.run.safety import StopOnNonFiniteLoss, atomic_save, staging_dir
from sft_hf.tokenization import tokenize_dataset
from sft_hf.trainer import InstructionTrainer

from tiny_setup import ROOT, train_argv


def test_inspect_outputs_do_not_make_the_output_dir_a_run(tmp_path):
    from types import SimpleNamespace

    from sft_hf.run.safety import check_output_dir

    out = tmp_path / "run"
    (out / "data_report").mkdir(parents=True)
    (out / "inspect.html").write_text("<html></html>")
    args = SimpleNamespace(output_dir=str(out), resume_from_checkpoint=None, overwrite_output_dir=False)
    check_output_dir(args)  # no error: looking at the data first is not a run
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(RecipeError, match=r"is not empty \(model.safetensors\)"):
        check_output_dir(args)


class NaNLossAtStep(InstructionTrainer):
    """The loss of the 4th optimizer step is NaN (as from a bad batch or an overflow)."""

    def compute_loss(self, *args, **kwargs):
        loss = super().compute_loss(*args, **kwargs)
        return loss * float("nan") if self.state.global_step == 3 else loss


class WeightsAfterStep(TrainerCallback):
    def __init__(self, step):
        self.step, self.weights = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


def nan_trainer(tiny, out, callbacks, precision="fp32"):
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    rows = tokenize_dataset(Dataset.from_list(tiny["records"]), tokenizer, "alpaca", max_length=128, verbose=False)
    args = SFTArguments(output_dir=str(out), max_steps=6, save_strategy="steps", save_steps=2, logging_steps=1,
                        per_device_train_batch_size=4, learning_rate=1e-3, report_to="none", seed=0,
                        precision=precision)
    return NaNLossAtStep(model=AutoModelForCausalLM.from_pretrained(tiny["model"]), args=args, train_dataset=rows,
                         processing_class=tokenizer, data_collator=InstructionDataCollator(tokenizer.pad_token_id),
                         callbacks=callbacks)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: bf16 weights, fp32 masters (speed/master_weights.py)
def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tiny, tmp_path, precision):
    # Without the callback the NaN step poisons the weights and a NaN checkpoint-4 is written: what we prevent.
    unguarded = nan_trainer(tiny, tmp_path / "unguarded", [], precision)
    unguarded.train()
    assert not all(torch.isfinite(p).all() for p in load_weights(tmp_path / "unguarded" / "checkpoint-4").values())

    after_step_3 = WeightsAfterStep(3)
    trainer = nan_trainer(tiny, tmp_path / "out", [after_step_3, StopOnNonFiniteLoss()], precision)
    with pytest.raises(NonFiniteLossError, match=(
            r"^non-finite loss at step 4: the gradient model\.\S+\.grad is NaN/inf \(before the update\)\. Training "
            rf"stopped and nothing was saved for this step; last good checkpoint: {tmp_path}/out/checkpoint-2\.")):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-2"]
    # The bad update was never applied: the weights in memory are exactly those after step 3, all finite (with
    # master weights: the fp32 masters of step 3, whose bf16 roundings the model held then).
    for name, value in trainer.model.state_dict().items():
        expected = after_step_3.weights[name]
        assert torch.equal(value.to(expected.dtype), expected), name
    checkpoint = load_weights(tmp_path / "out" / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in checkpoint.values())
    assert any(not torch.equal(checkpoint[k], after_step_3.weights[k]) for k in checkpoint)  # step 3 is not in it


def test_cli_non_finite_loss_exits_non_zero_without_a_final_model(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_argv(tiny, out, "--max_steps", "4", "--learning_rate", "1e38", "--lr_scheduler_type", "constant")
    assert run_cli(train_recipe.main, argv) == 3  # step 1's update makes the weights ~1e38: step 2's loss is NaN
    [error] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    error = error[error.index("error:"):]  # after a progress bar's carriage return
    assert error.startswith("error: non-finite loss at step 2: the gradient ")
    assert error.endswith(f"last good checkpoint: {out}/checkpoint-1. Try a lower learning_rate, max_grad_norm > 0, "
                          "fp32 instead of fp16, or check the data.")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # no final model, no checkpoint-2


def test_save_that_raises_leaves_nothing(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_save(out) as folder:
        model.save_pretrained(folder)
        raise KeyboardInterrupt  # Ctrl-C during the save
    assert not out.exists() and not staging_dir(out).exists()


KILLED_DURING_SAVE = """
import os, sys
from transformers import AutoModelForCausalLM
from sft_hf.run.safety import atomic_save
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with atomic_save(sys.argv[2]) as folder:
    model.save_pretrained(folder)
    os._exit(9)  # killed: no exception handler, no cleanup
"""


def test_process_killed_during_save_leaves_no_directory_that_loads(tiny, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)  # the run's checkpoints are already there
    (out / "checkpoint-1" / "weights").write_text("last good")
    result = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE, tiny["model"], str(out)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 9, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # untouched, and it does not load as a model
    with pytest.raises((OSError, ValueError), match="config.json"):
        AutoModelForCausalLM.from_pretrained(out)
    assert (staging_dir(out) / "model.safetensors").is_file()  # the unpublished save is hidden beside it
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    with atomic_save(out) as folder:  # the next save clears it and publishes
        model.save_pretrained(folder)
    assert not staging_dir(out).exists()
    assert (out / "checkpoint-1" / "weights").read_text() == "last good"
    for name, value in load_weights(out).items():
        assert torch.equal(value, model.state_dict()[name])


def test_publish_interrupted_midway_never_mixes_old_and_new_models(tiny, tmp_path, monkeypatch):
    old = AutoModelForCausalLM.from_pretrained(tiny["model"])
    new = AutoModelForCausalLM.from_pretrained(tiny["model"])
    torch.manual_seed(1)
    new.model.embed_tokens.weight.data.normal_()
    out = tmp_path / "out"
    old.save_pretrained(out)  # a model from an earlier run (overwrite_output_dir)
    torch.save({"stale": 1}, out / "pytorch_model.bin")  # and a stale weight file of another format
    (out / "checkpoint-1").mkdir()

    real_replace, moved = os.replace, []

    def replace_then_die(src, dst):
        if len(moved) == 1:
            raise KeyboardInterrupt
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(safety.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt), atomic_save(out) as folder:
        new.save_pretrained(folder)
    assert "config.json" not in moved and not (out / "config.json").exists()  # config goes last: never reached
    with pytest.raises((OSError, ValueError), match="config.json"):
        AutoModelForCausalLM.from_pretrained(out)  # neither the old nor a half-new model loads
    assert (out / "checkpoint-1").is_dir()

    monkeypatch.setattr(safety.os, "replace", real_replace)
    with atomic_save(out) as folder:
        new.save_pretrained(folder)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-1", "config.json", "generation_config.json", "model.safetensors"]  # the stale .bin is gone
    assert torch.equal(load_weights(out)["model.embed_tokens.weight"], new.model.embed_tokens.weight)


def test_second_run_into_a_non_empty_output_dir(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    train_recipe.main(train_argv(tiny, out, "--max_steps", "3"))
    first = sorted(p.name for p in out.iterdir())
    assert {"checkpoint-1", "checkpoint-2", "checkpoint-3", "config.json", "model.safetensors"} <= set(first)
    weights = (out / "model.safetensors").read_bytes()

    with pytest.raises(RecipeError, match=rf"^output_dir {out} is not empty \(README.md, all_results.json, "
                                          r"checkpoint-1, checkpoint-2, ...\): pass --overwrite_output_dir true"):
        train_recipe.main(train_argv(tiny, out))
    assert run_cli(train_recipe.main, train_argv(tiny, out)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: output_dir {out} is not empty")
    assert not staging_dir(out).exists()
    assert sorted(p.name for p in out.iterdir()) == first and (out / "model.safetensors").read_bytes() == weights

    # Resuming is allowed, with the values checkpoint-3 was trained with (a longer max_steps would re-stretch its
    # learning-rate schedule mid-run: refused, output_dir untouched)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert run_cli(train_recipe.main, train_argv(tiny, out, "--max_steps", "4", "--learning_rate", "5e-3",
                                                 "--resume_from_checkpoint", "true")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: resume_from_checkpoint: {out / 'checkpoint-3'} was trained with other values "
                            "(max_steps 3 → 4, learning_rate 0.001 → 0.005); resuming would mix the two"), error
    assert f"--config {out / 'checkpoint-3' / 'recipe.yaml'}" in error
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
    train_recipe.main(train_argv(tiny, out, "--max_steps", "3", "--resume_from_checkpoint", "true"))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3  # transformers alone trains a 4th
    # the card's train_loss is the whole run's (Trainer's own covers the steps after the resume: none, 0.0)
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 3 and json.loads((out / "all_results.json").read_text())["train_loss"] == pytest.approx(
        sum(losses) / 3)

    # Overwriting is allowed when asked: the old run's checkpoints go, a new model replaces the old one, and the old
    # run's logs that this run (no exact match, no samples) would not rewrite go too, not left beside the new model.
    (out / "eval_generations.jsonl").write_text('{"step": 3, "response": "old"}\n')
    (out / "test_responses.json").write_text("[]\n")
    train_recipe.main(train_argv(tiny, out, "--overwrite_output_dir", "true", "--seed", "7", "--max_steps", "2"))
    assert not (out / "eval_generations.jsonl").exists() and not (out / "test_responses.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "model.safetensors").read_bytes() != weights
    assert not staging_dir(out).exists()


def test_weights_saved_and_loaded_only_as_safetensors(tiny, tmp_path):
    out = tmp_path / "out"
    train_recipe.main(train_argv(tiny, out, "--max_steps", "1"))
    weight_files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                          if p.name.startswith(("model", "pytorch_model")) and p.suffix in (".bin", ".safetensors"))
    assert weight_files == ["checkpoint-1/model.safetensors", "model.safetensors"]

    pickled = tmp_path / "pickled"  # a model shipped only as a pickle (pytorch_model.bin): refused, not unpickled
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(pickled)
    args = ModelArguments(model_name_or_path=str(pickled))
    with pytest.raises(OSError, match="no file named model.safetensors"):
        load_model(args, load_tokenizer(args))


def test_remote_code_is_not_run_unless_asked(tiny, tmp_path):
    folder = tmp_path / "remote"
    AutoModelForCausalLM.from_pretrained(tiny["model"]).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(folder)
    (folder / "evil_model.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('CODE_RAN').write_text('yes')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil_model.EvilConfig",
                                               "AutoModelForCausalLM": "evil_model.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    args = ModelArguments(model_name_or_path=str(folder))
    assert args.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_model(args, load_tokenizer(args))
    assert not (folder / "CODE_RAN").exists()


def test_every_process_stops_when_one_shard_is_non_finite(tmp_path):
    """2 gloo processes, only process 1's shard NaN (tests/scripts/non_finite_shards.py): both must stop."""
    subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "non_finite_shards.py"), str(tmp_path)],
                   check=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == {
        "gradient on_pre_optimizer_step": "non-finite loss at step 7: the gradient a tensor on another process",
        "deepspeed weight on_pre_optimizer_step": None,  # not checked: DeepSpeed hides gradients until its step
        "deepspeed weight on_step_end": "non-finite loss at step 7: the weight a tensor on another process",
    }
    assert results[1] == {
        "gradient on_pre_optimizer_step": "non-finite loss at step 7: the gradient weight.grad",
        "deepspeed weight on_pre_optimizer_step": None,
        "deepspeed weight on_step_end": "non-finite loss at step 7: the weight weight",
    }


class InfLossBeforeStep(InstructionTrainer):
    """The loss overflows (inf) at every optimizer step before `self.until` (all of them by default), as an fp16
    forward pass that overflows does."""

    until = 10**9

    def compute_loss(self, *args, **kwargs):
        loss = super().compute_loss(*args, **kwargs)
        return loss * float("inf") if self.state.global_step < self.until else loss


def fp16_trainer(tiny, out, callbacks, max_steps, until=10**9):
    """An fp16 run through accelerate's real loss-scaling path: autocast to fp16, the loss scaled by torch's
    GradScaler, its step skipped on inf/NaN gradients and the skip reported by accelerate's optimizer wrapper. On a
    GPU accelerate builds that scaler itself; it leaves it out on a CPU, so the test hands it torch's CPU one."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    rows = tokenize_dataset(Dataset.from_list(tiny["records"]), tokenizer, "alpaca", max_length=128, verbose=False)
    args = SFTArguments(output_dir=str(out), max_steps=max_steps, save_strategy="no", logging_steps=1,
                        per_device_train_batch_size=4, learning_rate=1e-3, report_to="none", seed=0,
                        precision="fp16", disable_tqdm=True)
    trainer = InfLossBeforeStep(model=AutoModelForCausalLM.from_pretrained(tiny["model"]), args=args,
                                train_dataset=rows, processing_class=tokenizer,
                                data_collator=InstructionDataCollator(tokenizer.pad_token_id), callbacks=callbacks)
    trainer.until = until
    assert trainer.accelerator.mixed_precision == "fp16" and trainer.accelerator.scaler is None
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.accelerator.native_amp = True  # fp16 autocast, and unscaling before the gradient clipping
    return trainer


def test_fp16_run_whose_every_step_overflows_stops_in_one_line(tiny, tmp_path):
    initial = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny["model"]).state_dict().items()}
    # Without the stop: every step skipped, the run "finishes", nothing learned, and the log shows a finite loss.
    silent = fp16_trainer(tiny, tmp_path / "silent", [StopOnNonFiniteLoss()], max_steps=33)
    silent.train()
    assert silent.state.global_step == 33
    assert all(torch.equal(v, initial[k]) for k, v in silent.model.state_dict().items())
    assert [h["loss"] for h in silent.state.log_history if "loss" in h][:3] == [0.0, 0.0, 0.0]
    assert silent.accelerator.scaler.get_scale() == 2.0**16 / 2**33  # halved at each of the 33 skips
    # accelerate's own flag misses these skips: fused AdamW (Trainer's default) runs its step and skips inside
    assert not silent.accelerator.optimizer_step_was_skipped

    trainer = fp16_trainer(tiny, tmp_path / "out", [StopOnNonFiniteLoss(), safety.StopOnSkippedSteps()],
                           max_steps=33)
    with pytest.raises(NonFiniteLossError) as stopped:
        trainer.train()
    assert safety.MAX_SKIPPED_STEPS == 32
    assert str(stopped.value) == (
        "fp16 overflow: the loss scaler skipped 32 optimizer steps in a row (steps 1-32, loss scale now 1.52588e-05): "
        "the gradients are inf/NaN at every scale, so the weights have not changed since step 0. Training stopped; "
        "last good checkpoint: none saved yet. Use precision bf16 (Ampere or newer GPUs) or fp32, a lower "
        "learning_rate, or check the data.")
    assert trainer.state.global_step == 32 and "\n" not in str(stopped.value)
    assert all(torch.equal(v, initial[k]) for k, v in trainer.model.state_dict().items())


def test_fp16_run_that_overflows_for_fewer_steps_trains_on(tiny, tmp_path):
    """31 skipped steps in a row (the scale brought down from 2^16 to 2^-15), then finite gradients: it trains on."""
    callback = safety.StopOnSkippedSteps()
    trainer = fp16_trainer(tiny, tmp_path / "out", [callback], max_steps=33, until=31)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert trainer.state.global_step == 33 and callback.skipped == 0
    assert trainer.accelerator.scaler.get_scale() == 2.0**16 / 2**31
    assert any(not torch.equal(v, initial[k]) for k, v in trainer.model.state_dict().items())


def load_weights(folder) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())
