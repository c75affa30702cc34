"""The precision plan (sft_hf/precision.py): `precision: auto` picks bf16 only where the run's device multiplies it
natively, what rules out fp32 master weights (arguments, a LoRA model) turns bf16 into autocast, `--precision bf16`
works on a CPU without other flags, and bf16 autocast training tracks fp32 training."""
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_hf import InstructionTrainer, parse_recipe, tokenize_dataset
from sft_hf import precision as precision_module
from sft_hf.collator import InstructionDataCollator


def _args(*flags, output_dir="outputs/precision_test"):  # nothing is written: only the arguments are parsed
    return parse_recipe(["--output_dir", output_dir, *flags], default_recipe=None)[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only decisions")
def test_auto_follows_the_cpus_bf16_units(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    args = _args()  # bf16 weights with fp32 masters in the optimizer: no autocast
    assert (args.precision_plan.master_weights, args.bf16, args.fp16, args.device.type) == (True, False, False, "cpu")
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    args = _args()
    assert (args.precision_plan.master_weights, args.bf16, args.fp16, args.use_cpu) == (False, False, False, False)
    assert not _args("--precision", "fp32").bf16
    assert _args("--precision", "bf16").precision_plan.master_weights
    # bf16 autocast asked for on a CPU: no "Your setup doesn't support bf16/gpu", no --use_cpu needed
    for flags in (["--precision", "bf16-autocast"], ["--bf16", "true"]):
        args = _args(*flags)
        assert (args.precision_plan.master_weights, args.bf16, args.use_cpu, args.device.type) == (False, True, True, "cpu")


def test_a_onednn_isa_cap_below_bf16_is_not_native(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # how the benchmark emulates a CPU without AVX-512
    assert precision_module.cpu_has_native_bf16() is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # AVX-512 without BF16: oneDNN emulates bf16
    assert precision_module.cpu_has_native_bf16() is False


def test_the_runs_device_decides_not_only_use_cpu(monkeypatch):
    """A CPU run on a GPU host (accelerate_configs/cpu.yaml sets ACCELERATE_USE_CPU) gets the CPU's choice; the same
    arguments on the GPU get the GPU's: bf16 autocast on Ampere, fp16 on a T4."""
    args = _args()  # parsed here, on the CPU; then asked as if on a GPU host
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision_module, "gpu_has_native_bf16", lambda: True)
    plan = precision_module.plan_precision(args)
    assert (plan.device, plan.precision, plan.autocast) == ("cuda", "bf16-autocast", "bf16")
    monkeypatch.setattr(precision_module, "gpu_has_native_bf16", lambda: False)
    assert precision_module.plan_precision(args).precision == "fp16"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    plan = precision_module.plan_precision(args)
    assert (plan.device, plan.precision, plan.autocast) == ("cpu", "fp32", None)
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    plan = precision_module.plan_precision(args)
    assert (plan.device, plan.precision, plan.master_weights, plan.row_multiple) == ("cpu", "bf16", True, 32)


def test_the_plan_once_the_model_is_known(tiny_model_dir, monkeypatch):
    """A LoRA model cannot keep fp32 masters (its frozen base would stay rounded): bf16 autocast, rows of 8; plain
    TrainingArguments (a library user's) keep exactly what their flags say."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    args = _args()
    assert args.precision_plan.master_weights
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    plan = precision_module.settle_precision(args, lora)
    assert (plan.precision, plan.master_weights, plan.row_multiple) == ("bf16-autocast", False, 8)
    assert (args.bf16, args.mixed_precision, args.precision_plan) == (True, "bf16", plan)
    assert "LoRA" in plan.why
    plain = TrainingArguments("unused", use_cpu=True, report_to="none")
    assert precision_module.plan_precision(plain).precision == "fp32"  # no flag: no reduced precision chosen for them


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


@pytest.mark.parametrize("flags, why", [
    (["--gradient_accumulation_steps", "2"], "gradient accumulation"),
    (["--optim", "sgd"], "not AdamW"),
    (["--load_best_model_at_end", "true", "--eval_strategy", "steps", "--save_strategy", "steps"], "load_best"),
])
def test_runs_bf16_weights_cannot_train_take_bf16_autocast(tmp_path, flags, why):
    """Decided before TrainingArguments sets up mixed precision: the Accelerator autocasts (not fp32 by mistake)."""
    args = parse_recipe(["--output_dir", str(tmp_path), "--precision", "bf16", *flags], default_recipe=None)[2]
    assert (args.precision_plan.master_weights, args.bf16, args.mixed_precision) == (False, True, "bf16")
    assert why in args.precision_plan.why


def test_a_lora_model_takes_bf16_autocast_and_its_rows_stay_at_8(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from sft_hf.collator import recipe_collator

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = parse_recipe(["--output_dir", str(tmp_path), "--precision", "bf16", "--padding_free", "true"],
                        default_recipe=None)[2]
    assert args.precision_plan.master_weights
    assert recipe_collator(AutoTokenizer.from_pretrained(tiny_model_dir), args, model).pad_to_multiple_of == 8
    trainer = InstructionTrainer(model=model, args=args, train_dataset=None,
                                 data_collator=InstructionDataCollator(pad_token_id=0))
    assert not trainer.args.precision_plan.master_weights and trainer.accelerator.mixed_precision == "bf16"
