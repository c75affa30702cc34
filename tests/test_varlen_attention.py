"""sdpa_varlen: a padding-free row through it is the padded batch, value for value, forward and backward."""
import json

import pytest
import torch
import transformers

from sft_hf.collator import InstructionDataCollator, recipe_collator
from sft_hf.run.config import ModelArguments, SFTArguments
from sft_hf.modeling import load_model, load_tokenizer
from sft_hf.trainer import describe_batching, resolve_sampling_strategy
from sft_hf.speed.varlen_attention import NAME, supports_varlen

LENGTHS = (5, 17, 9, 1, 12)


def tiny(config_class=transformers.LlamaConfig):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if config_class is transformers.GPT2Config:
        common = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config_class(**common)).eval()  # no dropout


def rows(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 64, (n,), generator=g).tolist(),
             "completion_mask": [0] * (n // 2) + [1] * (n - n // 2)} for n in LENGTHS]


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("config_class", [transformers.LlamaConfig, transformers.GPT2Config])
@pytest.mark.parametrize("multiple", [None, 8])
def test_padding_free_row_equals_padded_batch_forward_and_backward(config_class, multiple):
    model = tiny(config_class)
    padded = InstructionDataCollator(pad_token_id=0, completion_only_loss=True)(rows())
    flat = InstructionDataCollator(pad_token_id=0, completion_only_loss=True, padding_free=True,
                                   pad_to_multiple_of=multiple)(rows())
    assert flat["input_ids"].shape[1] == (sum(LENGTHS) if multiple is None else 48)  # 44 real + a filler of 4
    model.set_attn_implementation("sdpa")
    loss_padded, grads_padded = loss_and_grads(model, padded)
    logits_padded = model(**padded).logits[padded["attention_mask"].bool()]
    model.set_attn_implementation(NAME)
    loss_flat, grads_flat = loss_and_grads(model, flat)
    torch.testing.assert_close(loss_flat, loss_padded, rtol=1e-6, atol=1e-6)
    for name in grads_padded:
        torch.testing.assert_close(grads_flat[name], grads_padded[name], rtol=1e-5, atol=1e-6, msg=name)
    # with a KV cache too (transformers' own sdpa lets the examples see each other then)
    logits_flat = model(**flat).logits[0, : sum(LENGTHS)]
    torch.testing.assert_close(logits_flat, logits_padded, rtol=1e-5, atol=1e-5)


def test_examples_do_not_see_each_other():
    """The test above could pass if every example attended alone for another reason; this one fails if the
    examples were attended as one causal sequence: changing the first example changes nothing after it."""
    model = tiny()
    model.set_attn_implementation(NAME)
    a, b = rows(1), rows(2)
    b[1:] = a[1:]  # only the first example differs
    flat_a, flat_b = (InstructionDataCollator(pad_token_id=0, padding_free=True)(r) for r in (a, b))
    with torch.no_grad():
        out_a, out_b = (model(**f, use_cache=False).logits[0] for f in (flat_a, flat_b))
    assert not torch.allclose(out_a[: LENGTHS[0]], out_b[: LENGTHS[0]])
    torch.testing.assert_close(out_a[LENGTHS[0]:], out_b[LENGTHS[0]:], rtol=0, atol=0)


def test_generation_is_unchanged():
    model = tiny()
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (prompts != 0).long()
    out = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["sdpa"], out[NAME])


def test_load_model_chooses_it_only_for_full_attention_and_never_saves_it(tiny_model_dir, tmp_path):
    model_args = ModelArguments(model_name_or_path=tiny_model_dir)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer)
    assert model.config._attn_implementation == NAME
    args = SFTArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, precision="fp32")
    collator = recipe_collator(tokenizer, args, model)
    assert collator.padding_free and collator.pad_to_multiple_of == 8  # 32 with bf16 weights (tests/test_speed.py)
    assert resolve_sampling_strategy(args, collator) == "random"
    assert "attention per example (sdpa_varlen)" in describe_batching(args, collator, model)
    model.save_pretrained(tmp_path / "saved")
    assert NAME not in (tmp_path / "saved" / "config.json").read_text()  # loads anywhere, without sft-hf
    # an explicit choice is kept, and padded batches are then length-grouped
    explicit = load_model(ModelArguments(model_name_or_path=tiny_model_dir, attn_implementation="sdpa"), tokenizer)
    assert explicit.config._attn_implementation == "sdpa"
    padded = recipe_collator(tokenizer, args, explicit)
    assert not padded.padding_free and resolve_sampling_strategy(args, padded) == "group_by_length"


def test_sliding_window_models_keep_masked_sdpa():
    assert supports_varlen(transformers.LlamaConfig())
    assert not supports_varlen(transformers.MistralConfig(sliding_window=16))
    assert supports_varlen(transformers.MistralConfig(sliding_window=None))
    assert not supports_varlen(transformers.Gemma2Config())  # sliding layers and soft-capping
    assert supports_varlen(transformers.Qwen2Config())  # use_sliding_window is off by default
    config = json.loads(transformers.Qwen2Config(use_sliding_window=True, sliding_window=16).to_json_string())
    assert not supports_varlen(transformers.Qwen2Config(**config))


def test_continuous_batching_attention_is_the_block_masked_product():
    """One generation step of transformers' continuous batching: two requests decoding, one prompt read whole, one
    prompt's second chunk. Each request alone equals transformers' block-diagonal masked SDPA, token for token."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sft_hf.speed.varlen_attention import paged_sdpa_attention

    q_lens, k_lens = [1, 5, 1, 4], [7, 5, 3, 9]  # a chunk of 4 queries whose request has 5 keys already
    cu_q = torch.tensor([0, 1, 6, 7, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 12, 15, 24], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 6, sum(q_lens), 8, generator=g)
    key, value = torch.randn(2, 1, 2, sum(k_lens), 8, generator=g)  # grouped queries: 3 query heads per key head
    mask = torch.zeros(sum(q_lens), sum(k_lens), dtype=torch.bool)
    for i, (n_q, n_k) in enumerate(zip(q_lens, k_lens)):
        for j in range(n_q):  # query j of a request sees its keys up to its own position, counted from the end
            mask[cu_q[i] + j, cu_k[i] : cu_k[i] + n_k - n_q + j + 1] = True
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    expected, _ = sdpa_attention_forward(module, query, key, value, mask[None, None], scaling=0.35)
    got, _ = paged_sdpa_attention(module, query, key, value, mask[None, None], scaling=0.35, cu_seq_lens_q=cu_q,
                                  cu_seq_lens_k={"full_attention": cu_k})
    assert got.shape == expected.shape == (1, 11, 6, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
