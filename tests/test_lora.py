"""LoRA via peft: target modules per architecture, a real adapter run through recipes/train.py, loading it with
AutoPeftModelForCausalLM, merging it into a full model with the same logits, and QLoRA's clear error on CPU."""
from types import SimpleNamespace

import pytest
import torch
import transformers

from sft_hf.lora import LORA_TARGET_MODULES, QLoRAUnavailable, apply_lora, lora_target_modules, quantization_config
from sft_hf.lora import main as merge_lora_main

from tiny_setup import run_train, tiny_recipe_args, write_tiny_dataset, write_tiny_model


def lora_args(**overrides):
    values = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None,
                  load_in_4bit=False)
    values.update(overrides)
    return SimpleNamespace(**values)


def lora_wrapped(model) -> list[str]:
    return sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A"))


def test_target_modules_table_and_override():
    assert lora_target_modules("qwen2") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_target_modules("gpt2") == ["c_attn", "c_proj", "c_fc"]
    assert lora_target_modules("phi3") == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert lora_target_modules("falcon") == "all-linear"
    assert lora_target_modules("llama", ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("model_type, config", [
    ("llama", transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)),
    ("gpt2", transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)),
    ("phi3", transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)),
])
def test_lora_wraps_every_projection_of_every_layer(model_type, config):
    model = apply_lora(transformers.AutoModelForCausalLM.from_config(config), lora_args())
    wrapped = lora_wrapped(model)
    names_per_layer = {n.split(".")[-1] for n in wrapped}
    assert names_per_layer == set(LORA_TARGET_MODULES[model_type])
    per_layer = {"llama": 7, "gpt2": 4, "phi3": 4}[model_type]  # gpt2: attn.c_proj and mlp.c_proj both
    assert len(wrapped) == 2 * per_layer
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_unknown_architecture_gets_all_linear_but_not_the_head():
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32)
    model = apply_lora(transformers.AutoModelForCausalLM.from_config(config), lora_args())
    linear = [n for n, m in model.base_model.model.named_modules()
              if isinstance(m, torch.nn.Linear) and "lora_" not in n and not n.endswith("base_layer")]
    assert len(lora_wrapped(model)) == 2 * 6  # q, k, v, out_proj, fc1, fc2 per layer
    assert all(not n.endswith("lm_head") for n in lora_wrapped(model)) and any(n.endswith("lm_head") for n in linear)


def test_chapter7_lora_is_peft_with_alpha_times_rank():
    """Chapter 7 ex. 7.4's LoRALayer adds alpha * (x @ A @ B) to the frozen layer's output, with no division by the
    rank; peft adds (lora_alpha / r) * lora_B(lora_A(x)). Its r=16, alpha=16 is therefore peft's r=16,
    lora_alpha=256: the same function, computed here by chapter 7's formula from the adapter's own matrices."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    model = apply_lora(transformers.AutoModelForCausalLM.from_config(config), lora_args(lora_r=16, lora_alpha=256))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(q_proj.lora_B["default"].weight)  # peft starts B at zero: make the update visible
    A, B = q_proj.lora_A["default"].weight.T, q_proj.lora_B["default"].weight.T  # [32, 16], [16, 32]
    x = torch.randn(5, 32)
    chapter7 = x @ q_proj.base_layer.weight.T + 16 * (x @ A @ B)
    with torch.no_grad():
        torch.testing.assert_close(q_proj.eval()(x), chapter7, rtol=1e-4, atol=1e-4)


def test_qlora_needs_cuda_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CPU error path cannot be exercised")
    with pytest.raises(QLoRAUnavailable, match="needs a CUDA GPU"):
        quantization_config(lora_args(load_in_4bit=True))
    with pytest.raises(QLoRAUnavailable, match="use_peft"):
        quantization_config(lora_args(load_in_4bit=True, use_peft=False))
    assert quantization_config(lora_args()) is None


def test_lora_run_saves_adapter_that_loads_and_merges(tmp_path):
    from peft import AutoPeftModelForCausalLM

    model_dir = write_tiny_model(tmp_path / "base")
    data = write_tiny_dataset(tmp_path / "data.jsonl")
    out = tmp_path / "lora"
    run_train(tiny_recipe_args(model_dir, data, out, use_peft="true", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                               learning_rate=2e-2))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # only the adapter, not a copy of the base weights

    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    assert peft_model.peft_config["default"].target_modules == set(LORA_TARGET_MODULES["llama"])
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 7 and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained

    merged_dir = tmp_path / "merged"
    assert merge_lora_main([str(out), str(merged_dir)]) == 0
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "sft_template.json").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(merged_dir))
    ids = tokenizer(["Reverse the sequence. 1 2 3", "What is the largest number? 4 9 2"], padding=True,
                    return_tensors="pt")
    with torch.no_grad():
        adapter_logits = peft_model(**ids).logits
        merged_logits = merged(**ids).logits
        base_logits = base(**ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the merge really carries the trained update


# --- QLoRA on GPUs, with the GPU mocked: which BitsAndBytesConfig and from_pretrained arguments a run would pass ----

GPUS = {"T4": (7, 5), "V100": (7, 0), "A100": (8, 0)}


@pytest.fixture
def gpu(monkeypatch):
    """`gpu("T4")`: CUDA reports that GPU from here on. torch.cuda.is_bf16_supported() allows emulation by default
    (True on a T4, as on the real one); only Ampere+ multiplies bf16 natively. quantization_config finds a
    stand-in bitsandbytes module while it runs (peft, which would use the real one, must not see it); the quantized
    load itself is mocked in the tests."""
    import sys
    import types

    import sft_hf.lora

    def with_stub(*args, **kwargs):
        sys.modules["bitsandbytes"] = types.ModuleType("bitsandbytes")
        try:
            return quantization_config(*args, **kwargs)
        finally:
            del sys.modules["bitsandbytes"]

    def use(name):
        major, minor = GPUS[name]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or major >= 8)
        monkeypatch.setattr(sft_hf.lora, "quantization_config", with_stub)

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                 "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    return use


def run_args(precision="auto", **values):
    """The training arguments' fields QLoRA reads, with precision resolved as parsing resolves it
    (sft_hf/precision.py's plan; SFTArguments itself would set up the mocked CUDA device)."""
    from sft_hf.precision import apply_precision, plan_precision

    fields = dict(precision=precision, bf16=False, fp16=False, use_cpu=False, local_process_index=0, fsdp=None,
                  deepspeed=None, activation_checkpointing=False, activation_checkpointing_kwargs=None,
                  ddp_find_unused_parameters=None, optim="adamw_torch", gradient_accumulation_steps=1)
    args = SimpleNamespace(**{**fields, **values})
    apply_precision(args, plan_precision(args))
    return args


def load_mocked_4bit(monkeypatch, model_dir, args):
    """load_model with `from_pretrained` recorded: it returns the tiny model in the requested dtype, flagged
    4-bit as a bitsandbytes load would be, so the LoRA preparation after it runs for real."""
    import sft_hf.modeling as modeling
    from sft_hf.run.config import ModelArguments

    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, **kwargs):
        calls.append(kwargs)
        dtype = kwargs["dtype"] if isinstance(kwargs["dtype"], torch.dtype) else torch.bfloat16  # "auto": as saved
        model = real(path, dtype=dtype)
        model.is_loaded_in_4bit = True
        return model

    monkeypatch.setattr(modeling.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    model_args = ModelArguments(model_name_or_path=model_dir, use_peft=True, load_in_4bit=True, lora_r=4,
                                lora_alpha=8, lora_dropout=0.0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = modeling.load_model(model_args, tokenizer, args)
    [kwargs] = calls
    return model, kwargs


@pytest.mark.parametrize("name, precision, dtype", [
    ("T4", "fp16", torch.float16), ("V100", "fp16", torch.float16), ("A100", "bf16", torch.bfloat16)])
def test_qlora_computes_in_the_precision_the_run_resolved(gpu, name, precision, dtype):
    gpu(name)
    args = run_args()
    assert (args.bf16, args.fp16) == (precision == "bf16", precision == "fp16")  # precision: auto on that GPU
    import sft_hf.lora

    make = sft_hf.lora.quantization_config  # with the stand-in bitsandbytes
    config = make(lora_args(load_in_4bit=True, bnb_4bit_quant_type="nf4"), args)
    assert config.load_in_4bit and config.bnb_4bit_compute_dtype == dtype
    assert config.bnb_4bit_quant_storage == dtype
    # an explicit precision wins; fp32 computes in fp32
    assert make(lora_args(load_in_4bit=True), run_args("fp32")).bnb_4bit_compute_dtype == torch.float32
    if name == "A100":
        assert make(lora_args(load_in_4bit=True), run_args("fp16")).bnb_4bit_compute_dtype == torch.float16


def test_qlora_on_one_gpu_or_ddp_loads_on_its_own_gpu_and_prepares_for_kbit_training(gpu, monkeypatch,
                                                                                      tiny_model_dir):
    gpu("T4")
    model, kwargs = load_mocked_4bit(monkeypatch, tiny_model_dir, run_args(local_process_index=3))
    assert kwargs["device_map"] == {"": 3}  # this process's GPU (TRL's get_kbit_device_map)
    assert kwargs["dtype"] == "auto"
    assert kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.float16
    # peft's k-bit preparation ran: the frozen non-4-bit weights were upcast to fp32 (norms, embeddings)
    norm = model.base_model.model.model.norm.weight
    assert norm.dtype == torch.float32 and not norm.requires_grad


@pytest.mark.parametrize("sharding", ["fsdp", "zero3-env", "zero3-config"])
@pytest.mark.parametrize("name", ["T4", "A100"])
def test_sharded_qlora_loads_without_device_map_and_keeps_frozen_weights_in_the_storage_dtype(
        gpu, monkeypatch, tiny_model_dir, tmp_path, sharding, name):
    import json

    gpu(name)
    values = {}
    if sharding == "fsdp":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch exports for fsdp.yaml
    elif sharding == "zero3-env":
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # and for deepspeed_zero3.yaml
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    else:
        config = tmp_path / "ds.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))
        values["deepspeed"] = str(config)
    args = run_args(**values)
    model, kwargs = load_mocked_4bit(monkeypatch, tiny_model_dir, args)
    compute = torch.bfloat16 if name == "A100" else torch.float16
    # fp16 under FSDP: the trained weights stay fp32 for the gradient scaler, so the storage is fp32 (peft's guide)
    storage = torch.float32 if (sharding == "fsdp" and compute == torch.float16) else compute
    assert kwargs["device_map"] is None  # ZeRO-3 refuses one; FSDP / ZeRO-3 place and shard the weights
    assert kwargs["dtype"] == storage
    config = kwargs["quantization_config"]
    assert (config.bnb_4bit_compute_dtype, config.bnb_4bit_quant_storage) == (compute, storage)
    # no k-bit preparation: the frozen weights were not upcast to fp32
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {storage}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    # ZeRO-3 gathers parameters into buffers of one dtype: the adapters take the base's; FSDP2 shards each alone
    assert trained == ({storage} if sharding.startswith("zero3") else {torch.float32})


def test_lora_training_arguments(monkeypatch):
    from sft_hf.lora import prepare_training_args, weight_sharding

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    args = SimpleNamespace(ddp_find_unused_parameters=None, activation_checkpointing=True,
                           activation_checkpointing_kwargs=None, fsdp=None, deepspeed=None)
    prepare_training_args(lora_args(use_peft=False), args)
    assert args.ddp_find_unused_parameters is None  # full fine-tuning: Trainer decides
    prepare_training_args(lora_args(), args)
    assert args.ddp_find_unused_parameters is False and args.activation_checkpointing_kwargs is None
    args.ddp_find_unused_parameters = True  # the recipe's choice wins
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert weight_sharding(args) is None  # ZeRO-2 keeps whole weights on each process
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert weight_sharding(args) == "zero3"
    prepare_training_args(lora_args(), args)
    assert args.ddp_find_unused_parameters is True
    assert args.activation_checkpointing_kwargs == {"use_reentrant": True}  # peft's and TRL's sharded PEFT
    args.activation_checkpointing_kwargs = {"use_reentrant": False}
    prepare_training_args(lora_args(), args)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_merge_lora_refuses_a_non_empty_out_dir_and_names_a_non_adapter(tmp_path, capsys):
    from sft_hf.cli import main as cli_main

    adapter, out = tmp_path / "adapter", tmp_path / "run"
    adapter.mkdir(), out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights of another run")
    assert cli_main(["merge-lora", str(adapter), str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {adapter}: no adapter_config.json; is this a LoRA output_dir?"
    (adapter / "adapter_config.json").write_text("{}")
    assert cli_main(["merge-lora", str(adapter), str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {out} exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]  # untouched
    assert cli_main(["merge-lora", str(adapter), str(out / "model.safetensors"), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {out / 'model.safetensors'} is a file: name a folder for the " \
                                              "merged model"
