"""Generation for evaluation (sft_hf/evaluation/generation.py): continuous batching gives exactly the greedy tokens of
plain `model.generate` (a tiny Llama, SmolLM2); prompts are the training prompts (special tokens by the template's
type, cropped to the model's context with the leading special tokens kept); batch sizes and sharded weights."""
import dataclasses
import logging

import pytest
import torch
from datasets import Dataset
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from sft_hf.builtin.toy import make_toy_records, train_bpe_tokenizer
from sft_hf.evaluation import generation
from sft_hf.evaluation.generation import encode_prompts, generate_responses
from sft_hf.speed import varlen_attention
from sft_hf.speed.varlen_attention import NAME as VARLEN
from sft_hf.speed.varlen_attention import paged_sdpa_attention
from sft_hf.templates import TEMPLATES, get_template
from sft_hf.tokenization import tokenize_dataset


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


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A BPE tokenizer that adds BOS to every text (like Llama's and Gemma's) and has a chat template."""
    alpaca = get_template("alpaca")
    tokenizer = train_bpe_tokenizer([alpaca.format_prompt(r) + r["output"] for r in make_toy_records(200, 1)], 300)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    backend = tokenizer.backend_tokenizer
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=tokenizer.eos_token,
                                        pad_token=tokenizer.pad_token)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    assert tokenizer("Sort")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


RECORD = {"instruction": "Sort the numbers.", "input": "3 1 2", "output": "1 2 3"}


@pytest.mark.parametrize("name", ["alpaca", "chat_template"])
def test_generation_prompt_ids_are_the_training_prompt_ids_for_any_template_name(bos_tokenizer, name):
    # A chat template saved under another name (sft_template.json of a run, a user's copy) is still a chat
    # template: its text already starts with BOS, so neither training nor generation adds another one.
    renamed = dataclasses.replace(TEMPLATES[name], name="my-template")
    for template in (TEMPLATES[name], renamed):
        row = tokenize_dataset(Dataset.from_list([RECORD]), bos_tokenizer, template, max_length=None,
                               verbose=False)[0]
        trained_prompt = row["input_ids"][: row["prompt_length"]]
        ids, cropped = encode_prompts(bos_tokenizer, [template.format_prompt(RECORD, bos_tokenizer)], template)
        assert ids == [trained_prompt] and cropped == 0, template.name
        assert trained_prompt.count(bos_tokenizer.bos_token_id) == 1 and trained_prompt[0] == bos_tokenizer.bos_token_id


def test_prompts_cropped_after_their_leading_special_tokens(bos_tokenizer):
    template = TEMPLATES["alpaca"]
    prompts = [template.format_prompt(RECORD), template.format_prompt({**RECORD, "input": "9 " * 40})]
    full, _ = encode_prompts(bos_tokenizer, prompts, template)
    short, long = full
    assert len(long) > len(short) + 30
    ids, cropped = encode_prompts(bos_tokenizer, prompts, template, max_prompt_tokens=len(short))
    assert cropped == 1
    assert ids[0] == short  # fits: untouched
    assert ids[1] == [bos_tokenizer.bos_token_id] + long[len(long) - len(short) + 1:]  # BOS, then the prompt's end
    assert len(ids[1]) == len(short)


def test_generation_fits_prompts_into_the_model_context(bos_tokenizer, caplog):
    """GPT-2 has learned positions: a prompt + max_new_tokens beyond n_positions used to fail with an index error."""
    torch.manual_seed(0)
    tok = bos_tokenizer
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    records = [RECORD, {**RECORD, "input": "9 " * 40}, {**RECORD, "input": "8 " * 50}]
    with caplog.at_level(logging.WARNING, logger="sft_hf.evaluation.generation"):
        responses = generate_responses(model, tok, records, "alpaca", max_new_tokens=8, batch_size=3,
                                       show_progress=False)
    assert len(responses) == 3
    warnings = [r.getMessage() for r in caplog.records if "context" in r.getMessage()]
    assert warnings == ["2 of 3 prompts are longer than the model's context (128 tokens) minus max_new_tokens (8): "
                        "their start was cut, leading special tokens kept"]
    with pytest.raises(ValueError, match="max_new_tokens=128 leaves no room for the prompt"):
        generate_responses(model, tok, records, "alpaca", max_new_tokens=128, show_progress=False)


def test_held_out_answers_of_alpaca_records_and_conversations():
    """Exact match during and after training reads the expected answer of either record shape."""
    from sft_hf.evaluation.generation import request_text
    from sft_hf.templates import reference_answer

    alpaca = {"instruction": "Add.", "input": "2 3", "output": "5"}
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+3?"},
                         {"role": "assistant", "content": "5"}]}
    assert (reference_answer(alpaca), request_text(alpaca)) == ("5", "Add. '2 3'")
    assert (reference_answer(chat), request_text(chat)) == ("5", "'2+3?'")
