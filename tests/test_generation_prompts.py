"""Generation prompts are the training prompts: special tokens decided by the template's type, cropped to the model's
context minus max_new_tokens with the leading special tokens kept; the oneDNN linear takes zero-row inputs."""
import dataclasses
import logging

import pytest
import torch
from datasets import Dataset
from tokenizers.processors import TemplateProcessing
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from sft_hf.evaluation.generation import encode_prompts, generate_responses
from sft_hf.templates import TEMPLATES, get_template
from sft_hf.tokenization import tokenize_dataset
from sft_hf.builtin.toy import make_toy_records, train_bpe_tokenizer


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


def test_onednn_linear_takes_zero_rows_like_nn_linear(tiny_model_dir):
    """An MoE expert that routed no tokens calls its linears on an empty [0, hidden] input: forward and backward must
    give empty / zero results as nn.Linear does (oneDNN cannot build the weight-gradient product for them)."""
    from sft_hf.speed import onednn_linear

    if onednn_linear._linear is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN linear op")
    torch.manual_seed(0)
    stock = torch.nn.Linear(7, 3)
    fast = torch.nn.Linear(7, 3)
    fast.load_state_dict(stock.state_dict())
    assert onednn_linear.use_onednn_linear(fast) == 1
    for shape in ((0, 7), (2, 0, 7)):
        for layer in (stock, fast):
            layer.zero_grad()
            x = torch.empty(*shape, requires_grad=True)
            y = layer(x)
            assert y.shape == (*shape[:-1], 3)
            (y.sum() + 0.0).backward()
            assert x.grad.shape == x.shape
            assert torch.equal(layer.weight.grad, torch.zeros(3, 7)) and torch.equal(layer.bias.grad, torch.zeros(3))


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
