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
