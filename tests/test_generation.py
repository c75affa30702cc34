"""Continuous batching (transformers' `generate_batch`, used by `generate_responses`) gives exactly the greedy tokens
of plain `model.generate`, one prompt at a time, on a tiny Llama and on SmolLM2."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_hf.evaluation import generation
from sft_hf.templates import get_template
from sft_hf.speed import varlen_attention
from sft_hf.speed.varlen_attention import NAME as VARLEN, paged_sdpa_attention


def _plain_greedy(model, tokenizer, prompts, max_new_tokens):
    """The reference: `model.generate` on each prompt alone (no padding), cut at EOS."""
    out = []
    for ids in prompts:
        row = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
        out.append(row.tolist())
    return out


def _cut(row, eos):
    return row[: row.index(eos) + 1] if eos in row else row


def _check_same_tokens(model, tokenizer, records, max_new_tokens, batch_size):
    alpaca = get_template("alpaca")
    prompts = [tokenizer(alpaca.format_prompt(r))["input_ids"] for r in records]
    assert generation.continuous_batching_supported(model)
    expected = [_cut(r, tokenizer.eos_token_id) for r in _plain_greedy(model, tokenizer, prompts, max_new_tokens)]
    attn = model.config._attn_implementation
    got = generation._generate_continuous(model, tokenizer, prompts, max_new_tokens, batch_size, False)
    assert got is not None, "continuous batching failed"
    assert model.config._attn_implementation == attn  # restored
    assert [_cut(r, tokenizer.eos_token_id) for r in got] == expected
    # the public function decodes the same tokens
    texts = [generation.extract_response(tokenizer.decode(_cut(r, tokenizer.eos_token_id)[:max_new_tokens],
                                                          skip_special_tokens=True)) for r in expected]
    assert generation.generate_responses(model, tokenizer, records, "alpaca", max_new_tokens, batch_size=batch_size,
                                         show_progress=False) == texts
    return expected


def test_tiny_llama_continuous_batching_is_plain_greedy(tiny_model_dir, instruction_records, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    model.set_attn_implementation(VARLEN)  # what load_model gives: generation must switch to SDPA and back
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("cu_seq_lens_q") is not None)
        return paged_sdpa_attention(*args, **kwargs)

    monkeypatch.setattr(varlen_attention, "paged_sdpa_attention", counted)
    # 10 prompts of different lengths through 3 slots: slots are refilled while others still generate
    _check_same_tokens(model, tokenizer, instruction_records[:10], 12, 3)
    assert calls and all(calls)  # each request attended alone (sft_hf.speed.varlen_attention), not through the block mask


def test_smollm2_continuous_batching_is_plain_greedy(smollm2_dir, instruction_records):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    records = instruction_records[935:941]
    expected = _check_same_tokens(model, tokenizer, records, 16, 4)
    # some answers end before 16 tokens (their slot is refilled), some run to the limit
    assert any(r[-1] == tokenizer.eos_token_id for r in expected) and any(len(r) == 16 for r in expected)


def test_models_without_the_attention_interface_use_padded_batches(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert generation.continuous_batching_supported(model)
    model.config._attn_implementation = "flex_attention"
    assert not generation.continuous_batching_supported(model)


def test_default_batch_size_fits_the_kv_cache_in_a_quarter_of_free_memory(monkeypatch):
    import psutil
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    row = 2 * 3 * 2 * 8 * 4 * 100  # keys and values × layers × KV heads × head dim × fp32 bytes × 100 tokens
    free = [4 * row * 10 + 5]
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": free[0]})())
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert generation.default_batch_size(model, 100) == 10
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine: half each
    assert generation.default_batch_size(model, 100) == 5
    free[0] = row  # not even one row's quarter: still one row
    assert generation.default_batch_size(model, 100) == 1
    free[0] = 10**15
    assert generation.default_batch_size(model, 100) == 64


def test_default_batch_size_on_a_gpu_takes_that_gpus_free_memory_whole(monkeypatch):
    """Each process has a GPU of its own: its free memory is not shared with the node's other processes."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    weight = SimpleNamespace(device=torch.device("cuda", 3), element_size=lambda: 2)  # a bf16 weight on GPU 3
    model = SimpleNamespace(config=config, parameters=lambda: iter([weight]))
    row = 2 * 3 * 2 * 8 * 2 * 100  # keys and values × layers × KV heads × head dim × bf16 bytes × 100 tokens
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (asked.append(device) or (4 * row * 20, 0)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert generation.default_batch_size(model, 100) == 20  # not 20 / 8
    assert asked == [torch.device("cuda", 3)]


def test_sharded_weights_are_recognised(tiny_model_dir):
    """FSDP2 and ZeRO-3 as generation sees them: a module `fully_shard` made an FSDPModule, a parameter ZeRO-3
    partitioned (it carries a `ds_id`); a plain model is not sharded. (Real FSDP2 with DTensor parameters on 2
    processes: tests/test_distributed.py.)"""
    from torch.distributed.fsdp import FSDPModule

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not generation.weights_sharded(model)
    assert not generation.in_lock_step(model)
    layer = model.model.layers[1]
    layer.__class__ = type("FSDPLlamaDecoderLayer", (FSDPModule, type(layer)), {})
    assert generation.weights_sharded(model)
    assert not generation.in_lock_step(model)  # one process: nothing to keep in step with
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.model.norm.weight.ds_id = 7
    assert generation.weights_sharded(model)
    assert not generation.continuous_batching_supported(model)
