"""InstructionTrainer (sft_hf/trainer.py): the loss is a mean over trained tokens, however the global batch is split
into micro-batches and processes; logits only where a token is trained; exact token counts, tokens per second of
training time only and the padding fraction in the logs; the private Trainer methods it overrides still exist."""
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from sft_hf import InstructionDataCollator
from sft_hf.run.config import SFTArguments
from sft_hf.trainer import InstructionTrainer

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import one_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def reference_loss(model_dir: str) -> tuple[float, float]:
    """Token-mean cross-entropy over the whole global batch, and the (wrong) mean of per-row means."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = one_step.rows(model.config.vocab_size, model.config.eos_token_id)
    batch = InstructionDataCollator(pad_token_id=model.config.pad_token_id, completion_only_loss=True)(data)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    trained = targets != -100
    token_mean = losses[trained].sum() / trained.sum()
    row_means = (losses * trained).sum(1) / trained.sum(1)
    return token_mean.item(), row_means.mean().item()


def test_loss_is_token_mean_across_gradient_accumulation(tiny_model_dir, tmp_path):
    token_mean, row_mean = reference_loss(tiny_model_dir)
    assert abs(token_mean - row_mean) > 1e-3  # the rows differ enough for a wrong average to show

    full = one_step.run(tiny_model_dir, str(tmp_path / "b8"), batch_size=8, accumulation=1)
    split = one_step.run(tiny_model_dir, str(tmp_path / "b2x4"), batch_size=2, accumulation=4)
    assert full["loss"] == pytest.approx(token_mean, rel=1e-4)
    assert split["loss"] == pytest.approx(token_mean, rel=1e-4)
    w_full, w_split = load_file(tmp_path / "b8/weights.safetensors"), load_file(tmp_path / "b2x4/weights.safetensors")
    w_start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for name in w_full:
        # the step moved the weights, and by the same gradient in both layouts
        torch.testing.assert_close(w_split[name], w_full[name], rtol=1e-5, atol=1e-6)
    assert any((w_full[n] - w_start[n]).abs().max() > 1e-4 for n in w_full)


def test_two_processes_match_one(tiny_model_dir, tmp_path):
    """2 gloo processes × batch 2 × accumulation 2 == 1 process × batch 8."""
    one_step.run(tiny_model_dir, str(tmp_path / "b8"), batch_size=8, accumulation=1)
    out = tmp_path / "ddp"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(ROOT / "tests/scripts/one_step.py"), tiny_model_dir, str(out), "2", "2",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "result.json").read_text())
    single = json.loads((tmp_path / "b8/result.json").read_text())
    assert ddp["world_size"] == 2  # really two processes, not one
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-4)
    w_single, w_ddp = load_file(tmp_path / "b8/weights.safetensors"), load_file(out / "weights.safetensors")
    for name in w_single:
        torch.testing.assert_close(w_ddp[name], w_single[name], rtol=1e-5, atol=1e-6)


def test_trained_token_total_counts_steps_after_the_last_log(tiny_model_dir, tmp_path):
    from datasets import Dataset

    from sft_hf import InstructionTrainer, SFTArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = one_step.rows(model.config.vocab_size, model.config.eos_token_id)
    args = SFTArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, logging_steps=2,
                        save_strategy="no", train_sampling_strategy="sequential", disable_tqdm=True, use_cpu=True)
    collator = InstructionDataCollator(pad_token_id=model.config.pad_token_id, completion_only_loss=True)
    trainer = InstructionTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), data_collator=collator)
    trainer.train()
    # 3 steps of 2 rows = the first 6 rows; step 3 comes after the last training log (step 2)
    expected = sum((collator([row])["labels"][0, 1:] != -100).sum().item() for row in data[:6])
    assert trainer.trained_tokens_total == expected


def test_tokens_per_second_counts_training_time_only(tiny_model_dir, tmp_path, monkeypatch):
    """A fake clock: each training step takes 1 s, each evaluation 100 s, each save 50 s. train_tokens_per_second
    must be the window's trained tokens / its training seconds (2 steps of 1 s), whatever evaluation and saving cost."""
    import types

    from datasets import Dataset

    from sft_hf import InstructionTrainer, SFTArguments
    from sft_hf import trainer as trainer_module

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    class Costs(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step: still training
            clock.now += 1.0

        def on_evaluate(self, args, state, control, **kwargs):
            clock.now += 100.0

        def on_save(self, args, state, control, **kwargs):
            clock.now += 50.0

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = Dataset.from_list(one_step.rows(model.config.vocab_size, model.config.eos_token_id))
    args = SFTArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, logging_steps=2,
                        eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                        train_sampling_strategy="sequential", disable_tqdm=True, use_cpu=True, report_to="none")
    collator = InstructionDataCollator(pad_token_id=model.config.pad_token_id, completion_only_loss=True)
    trainer = InstructionTrainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(2)),
                                 data_collator=collator, callbacks=[Costs()])
    trainer.train()
    rates = [h["train_tokens_per_second"] for h in trainer.state.log_history if "train_tokens_per_second" in h]
    trained = [sum((collator([row])["labels"][0, 1:] != -100).sum().item() for row in data.to_list()[i:i + 4])
               for i in (0, 4)]  # the rows of steps 1-2 and of steps 3-4
    assert rates == [pytest.approx(trained[0] / 2.0, abs=0.05), pytest.approx(trained[1] / 2.0, abs=0.05)]


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("use_lora", [False, True])
def test_logits_only_where_trained_keep_loss_and_gradient(tiny_model_dir, tmp_path, padding_free, use_lora):
    """`logits_where_trained` projects only the positions that have a target, yet gives the stock forward's loss
    and gradient: prompt-masked padded batches, padding-free rows, and a PEFT-wrapped model."""
    from sft_hf import InstructionTrainer, SFTArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if use_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    data = one_step.rows(model.config.vocab_size, model.config.eos_token_id)
    batch = InstructionDataCollator(pad_token_id=model.config.pad_token_id, completion_only_loss=True,
                                    padding_free=padding_free)(data)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert trained < batch["input_ids"].numel() * 0.75  # prompts and padding: many positions without a target

    def loss_and_grads(where_trained: bool):
        args = SFTArguments(output_dir=str(tmp_path), use_cpu=True, logits_where_trained=where_trained,
                            report_to="none", disable_tqdm=True)
        trainer = InstructionTrainer(model=model, args=args, train_dataset=None,
                                     data_collator=InstructionDataCollator(pad_token_id=0))
        assert trainer.logits_where_trained == where_trained
        model.train()
        model.zero_grad()
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True,
                                             num_items_in_batch=torch.tensor(trained))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), outputs.logits.shape, grads

    loss, logits_shape, grads = loss_and_grads(True)
    stock_loss, stock_shape, stock_grads = loss_and_grads(False)
    assert logits_shape == (trained, model.config.vocab_size)  # one row of logits per trained token, no more
    assert stock_shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert loss == pytest.approx(stock_loss, rel=1e-6)
    assert grads.keys() == stock_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-5, atol=1e-7)


def test_the_private_trainer_methods_we_override_are_still_called_as_we_define_them():
    """InstructionTrainer overrides a few private Trainer methods, for want of a public hook. A transformers release
    that renames one, changes its parameters or stops calling it would leave our override silently dead: fail here."""
    import inspect

    from transformers import Trainer

    from sft_hf.trainer import InstructionTrainer

    ours = {name for name, value in vars(InstructionTrainer).items()
            if callable(value) and name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)}
    assert ours == {"_clip_grad_norm", "_get_grad_norm", "_issue_warnings_after_load"}
    source = inspect.getsource(Trainer)
    for name in sorted(ours) + ["get_batch_samples", "compute_loss", "training_step", "log", "create_optimizer"]:
        theirs, mine = inspect.signature(getattr(Trainer, name)), inspect.signature(getattr(InstructionTrainer, name))
        assert list(theirs.parameters) == list(mine.parameters), name
        assert f"self.{name}(" in source, f"Trainer no longer calls {name}"


def test_a_tied_output_head_is_not_reported_missing_at_resume(tmp_path, caplog):
    from torch.nn.modules.module import _IncompatibleKeys

    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)  # lm_head tied
    trainer = InstructionTrainer(model=transformers.GPT2LMHeadModel(config),
                                 args=SFTArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                                 data_collator=InstructionDataCollator(pad_token_id=0))
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        trainer._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight"], []))  # saved once, as the embedding
        assert "missing keys" not in caplog.text
        trainer._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight", "transformer.ln_f.weight"], []))
    assert "There were missing keys in the checkpoint model loaded: ['transformer.ln_f.weight']" in caplog.text


def _rows(vocab_size: int, eos: int) -> list[dict]:
    rng = random.Random(0)
    return [{"input_ids": [rng.randrange(3, vocab_size) for _ in range(n - 1)] + [eos]} for n in (9, 5, 7, 3)]


def test_trainer_logs_exact_token_counts_and_batching(tiny_model_dir, tmp_path, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = Dataset.from_list(_rows(model.config.vocab_size, model.config.eos_token_id))
    args = SFTArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                        save_strategy="no", report_to="none", train_sampling_strategy="sequential",
                        disable_tqdm=True, use_cpu=True)
    with caplog.at_level(logging.INFO, logger="sft_hf.trainer"):
        trainer = InstructionTrainer(model=model, args=args, train_dataset=data,
                                     data_collator=InstructionDataCollator(model.config.pad_token_id))
    assert "Batching: padded batches in sequential order" in caplog.text
    trainer.train()
    logs = [h for h in trainer.state.log_history if "padding_fraction" in h]
    # batch 1: rows of 9 and 5 tokens → 18 positions, 4 of them padding; batch 2: 7 and 3 → 14 positions, 4 padding
    assert [h["padding_fraction"] for h in logs] == [round(4 / 18, 4), round(4 / 14, 4)]
    assert trainer.trained_tokens_total == (9 - 1) + (5 - 1) + (7 - 1) + (3 - 1)  # every token after the first


def test_trainer_counts_the_padding_free_filler_as_padding(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa_varlen")
    data = Dataset.from_list(_rows(model.config.vocab_size, model.config.eos_token_id))
    args = SFTArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                        save_strategy="no", report_to="none", train_sampling_strategy="sequential",
                        disable_tqdm=True, use_cpu=True)
    collator = InstructionDataCollator(model.config.pad_token_id, padding_free=True, pad_to_multiple_of=8)
    trainer = InstructionTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "padding_fraction" in h]
    # rows of 9 + 5 tokens → 16 positions, 2 of them filler; rows of 7 + 3 → 16 positions, 6 of them filler
    assert [h["padding_fraction"] for h in logs] == [round(2 / 16, 4), round(6 / 16, 4)]
    # each example's first token is not a target, nor is the filler
    assert trainer.trained_tokens_total == (9 - 1) + (5 - 1) + (7 - 1) + (3 - 1)


def test_padding_free_without_varlen_kernel_is_flagged(tiny_model_dir, tmp_path, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")  # no varlen kernel
    data = Dataset.from_list(_rows(model.config.vocab_size, model.config.eos_token_id))
    args = SFTArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, save_strategy="no",
                        report_to="none", use_cpu=True)
    collator = InstructionDataCollator(model.config.pad_token_id, padding_free=True)
    with caplog.at_level(logging.INFO, logger="sft_hf.trainer"):
        InstructionTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    assert "Batching: padding-free rows" in caplog.text and "WARNING: without a variable-length" in caplog.text
