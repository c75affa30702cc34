"""`precision: auto` picks bf16 only where the hardware multiplies it natively, `--precision bf16` works on a CPU
without other flags, and bf16 autocast training tracks fp32 training (the guard that lets `auto` switch to it)."""
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_hf import InstructionTrainer, parse_recipe, tokenize_dataset
from sft_hf.run import config as config_module
from sft_hf.collator import InstructionDataCollator


def _args(*flags, output_dir="/tmp/sft_hf_precision_test"):
    return parse_recipe(["--output_dir", output_dir, *flags], default_recipe=None)[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only decisions")
def test_auto_follows_the_cpus_bf16_units(monkeypatch):
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: True)
    args = _args()  # bf16 weights with fp32 masters in the optimizer: no autocast
    assert (args.master_weights, args.bf16, args.fp16, args.device.type) == (True, False, False, "cpu")
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: False)
    args = _args()
    assert (args.master_weights, args.bf16, args.fp16, args.use_cpu) == (False, False, False, False)
    assert not _args("--precision", "fp32").bf16
    assert _args("--precision", "bf16").master_weights
    # bf16 autocast asked for on a CPU: no "Your setup doesn't support bf16/gpu", no --use_cpu needed
    for flags in (["--precision", "bf16-autocast"], ["--bf16", "true"]):
        args = _args(*flags)
        assert (args.master_weights, args.bf16, args.use_cpu, args.device.type) == (False, True, True, "cpu")


def test_a_onednn_isa_cap_below_bf16_is_not_native(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # how the benchmark emulates a CPU without AVX-512
    assert config_module.cpu_has_native_bf16() is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # AVX-512 without BF16: oneDNN emulates bf16
    assert config_module.cpu_has_native_bf16() is False


def test_native_bf16_agrees_with_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    flags = open("/proc/cpuinfo").read().split()
    assert config_module.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def _train(model_dir, records, precision, output_dir, steps=20):
    """`steps` steps of batch 8 on chapter 7's records; returns the per-step losses and the trained model."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = tokenize_dataset(Dataset.from_list(records), tokenizer, "alpaca", 256, verbose=False)
    args = _args("--precision", precision, "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
                 "--max_steps", str(steps), "--logging_steps", "1", "--lr_scheduler_type", "constant",
                 "--warmup_steps", "0", "--seed", "0", "--save_strategy", "no", "--report_to", "none",
                 "--train_sampling_strategy", "sequential", "--disable_tqdm", "true", output_dir=str(output_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    collator = InstructionDataCollator(pad_token_id=tokenizer.pad_token_id)
    trainer = InstructionTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, trainer


def test_bf16_training_tracks_fp32(tiny_model_dir, instruction_records, tmp_path):
    records = instruction_records[:160]
    fp32, _ = _train(tiny_model_dir, records, "fp32", tmp_path / "fp32")
    bf16, trainer = _train(tiny_model_dir, records, "bf16-autocast", tmp_path / "bf16")
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    # master weights and optimizer state stay fp32: only the matmuls ran in bf16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    state = trainer.optimizer.state[next(trainer.model.parameters())]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    # the first step: same weights, same batch; bf16 matmuls (8-bit mantissa) move the loss by well under 1%,
    # but they do move it (bit-equal losses would mean autocast never ran)
    assert fp32[0] != bf16[0]
    assert abs(bf16[0] - fp32[0]) / fp32[0] < 0.005
    # 20 steps at lr 3e-3: the loss falls from 6.93 to ~5.3; the last 5 steps' bf16 losses are within 1% of fp32's
    # (measured: 0.01%), so bf16 learns what fp32 learns
    assert sum(fp32[-5:]) < 0.8 * 5 * fp32[0]
    assert abs(sum(bf16[-5:]) - sum(fp32[-5:])) / sum(fp32[-5:]) < 0.01
