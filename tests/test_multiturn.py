"""Multi-turn conversations: every assistant reply and its end-of-turn token trained, with real chat templates.

Oracle, independent of the implementation: the trained tokens of a conversation, decoded run by run, are each
assistant content followed by the template's end-of-turn token (the tokenizer's EOS after the last one when the
end-of-turn token is not EOS), and nothing else.
"""
import json

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from sft_hf.collator import IGNORE_INDEX, InstructionDataCollator
from sft_hf.data import DataError, load_instruction_dataset
from sft_hf.templates import TemplateError, get_template
from sft_hf.tokenization import encode_records, tokenize_dataset
from tiny_setup import write_jsonl

# Chat templates as their models ship them (Llama 3, Gemma and Mistral verbatim; Qwen 2.5's without the tool list).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\n<tool_call>\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Qwen3-like: the reasoning of the final reply only, so earlier turns render differently once a turn follows them.
REASONING_LAST = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}<think>\n"
    "{{ m['reasoning'] }}\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_TAGS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{% if loop.last %}<think>{{ m['reasoning'] }}</think>{% endif %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# name: (chat template, special tokens, bos, eos, end-of-turn)
STYLES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "llama3-base": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "mistral": (MISTRAL, ["<s>", "</s>"], "<s>", "</s>", "</s>"),
    "qwen": (QWEN, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", "<|im_end|>"),
}

CONVERSATION = [
    {"role": "user", "content": "Name a primary color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Translate 'good morning' to French."},
    {"role": "assistant", "content": "Bonjour."},
    {"role": "user", "content": "And 'thank you'?"},
    {"role": "assistant", "content": "Merci beaucoup."},
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, bpe_tokenizer):
    folder = tmp_path_factory.mktemp("bpe")
    bpe_tokenizer.save_pretrained(folder)
    return folder


def styled_tokenizer(base_dir, name):
    template, specials, bos, eos, _ = STYLES[name] if name in STYLES else (name, ["<|im_start|>", "<|im_end|>"],
                                                                           None, "<|im_end|>", "<|im_end|>")
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, eos
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def trained_runs(tokenizer, row) -> list[str]:
    """The trained tokens, decoded run by run (a run: consecutive trained positions)."""
    runs, previous = [], False
    for token, trained in zip(row["input_ids"], row["completion_mask"]):
        if trained:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = trained
    return [tokenizer.decode(run) for run in runs]


def expected_runs(tokenizer, messages, end_of_turn, last_only=False) -> list[str]:
    replies = [m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]
    if end_of_turn != tokenizer.eos_token:
        replies[-1] += tokenizer.eos_token  # generation stops at EOS: it follows the last reply
    return replies[-1:] if last_only else replies


@pytest.mark.parametrize("name", ["smollm2", *STYLES])
@pytest.mark.parametrize("trained_turns", ["all", "last"])
def test_every_reply_and_its_end_of_turn_token_are_trained(base_dir, smollm2_tokenizer, name, trained_turns):
    tok = smollm2_tokenizer if name == "smollm2" else styled_tokenizer(base_dir, name)
    end_of_turn = "<|im_end|>" if name == "smollm2" else STYLES[name][4]
    ds = Dataset.from_list([{"messages": CONVERSATION}])
    row = tokenize_dataset(ds, tok, "chat_template", max_length=None, verbose=False, trained_turns=trained_turns)[0]
    assert trained_runs(tok, row) == expected_runs(tok, CONVERSATION, end_of_turn, trained_turns == "last")
    # the ids are the template's own rendering, BOS once
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(row["input_ids"]) in (rendered.rstrip(), rendered.rstrip() + tok.eos_token)
    # the generation prompt of the last reply is exactly the row up to that reply
    prompt = get_template("chat_template").format_prompt({"messages": CONVERSATION}, tok)
    assert row["input_ids"][: len(tok(prompt, add_special_tokens=False)["input_ids"])] == \
        tok(prompt, add_special_tokens=False)["input_ids"]
    last_start = len(row["completion_mask"]) - row["completion_mask"][::-1].index(0)
    assert tok.decode(row["input_ids"][:last_start]) == prompt
    # the collator trains exactly the masked-in tokens, padded and padding-free
    for padding_free in (False, True):
        batch = InstructionDataCollator(pad_token_id=tok.pad_token_id, completion_only_loss=True,
                                        padding_free=padding_free)([row])
        assert batch["labels"][0].tolist()[1:] == [t if m else IGNORE_INDEX for t, m in
                                                   zip(row["input_ids"], row["completion_mask"])][1:]
    roles = [t["role"] for t in row["turns"]]
    assert roles == ["user", "assistant"] * 3


def test_system_prompt_and_the_smollm2_default_system_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    rows = tokenize_dataset(Dataset.from_list([{"messages": with_system}, {"messages": CONVERSATION}]), tok,
                            "chat_template", max_length=None, verbose=False)
    assert [t["role"] for t in rows[0]["turns"]] == ["system"] + ["user", "assistant"] * 3
    assert tok.decode(rows[0]["input_ids"][: rows[0]["turns"][0]["length"]]) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n"
    # SmolLM2's template writes its default system prompt when there is none: masked, part of the first message
    first = tok.decode(rows[1]["input_ids"][: rows[1]["turns"][0]["length"]])
    assert first.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert first.endswith("<|im_start|>user\nName a primary color.<|im_end|>\n")
    for row in rows:
        assert trained_runs(tok, row) == ["Red.<|im_end|>", "Bonjour.<|im_end|>", "Merci beaucoup.<|im_end|>"]


def test_qwen_tool_calls_are_trained_tool_results_are_not(base_dir):
    tok = styled_tokenizer(base_dir, "qwen")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "Sunny, 21 degrees."},
    ]
    row = tokenize_dataset(Dataset.from_list([{"messages": messages}]), tok, "chat_template", None, verbose=False)[0]
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert trained_runs(tok, row) == [call, "Sunny, 21 degrees.<|im_end|>"]
    assert [t["role"] for t in row["turns"]] == ["user", "assistant", "tool", "assistant"]


def test_a_template_that_drops_tool_calls_is_an_error_not_an_empty_trained_reply(smollm2_tokenizer):
    # SmolLM2's template renders only `content`: the call would vanish and the model learn to answer it with <|im_end|>
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    for content in ("", None):  # OpenAI's tool-call turns have content null: the same clear error, not jinja's
        messages[1]["content"] = content
        with pytest.raises(TemplateError, match=r"^\[data\] record 0: message 1 \(assistant\): the chat template does "
                                                r"not render its tool_calls, so the reply would be trained as "
                                                r"'<\|im_end\|>'"):
            tokenize_dataset(Dataset.from_list([{"messages": messages}]), smollm2_tokenizer, "chat_template", None,
                             verbose=False)
    row = tokenize_dataset(Dataset.from_list([{"messages": messages}]), smollm2_tokenizer, "chatml", None,
                           verbose=False)[0]
    assert '"name": "weather"' in trained_runs(smollm2_tokenizer, row)[0]


def test_chatml_writes_the_tool_definitions_into_the_system_turn_untrained(smollm2_tokenizer):
    tok = smollm2_tokenizer
    weather = {"type": "function", "function": {"name": "weather", "description": "Weather now",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    quote = {"type": "function", "function": {"name": "quote", "parameters": {
        "type": "object", "properties": {"ticker": {"type": "string", "enum": ["ACME"]}}}}}
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    records = [  # as datasets stores them: each record's tools get the keys of the other's, filled with None
        {"messages": [{"role": "user", "content": "Weather in Paris?"},
                      {"role": "assistant", "content": None, "tool_calls": [call]}], "tools": [weather]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ACME?"},
                      {"role": "assistant", "content": "Let me look."}], "tools": [quote]},
    ]
    rows = tokenize_dataset(Dataset.from_list(records), tok, "chatml", None, verbose=False)
    tools_block = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                   "with function signatures within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\nFor each "
                   "function call, return a json object with function name and arguments within <tool_call></tool_call> "
                   'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')
    assert tok.decode(rows[0]["input_ids"]) == (
        f"<|im_start|>system\n{tools_block.format(json.dumps(weather))}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
    assert tok.decode(rows[1]["input_ids"]).startswith(
        f"<|im_start|>system\nBe brief.\n\n{tools_block.format(json.dumps(quote))}<|im_end|>\n<|im_start|>user\nACME?")
    assert trained_runs(tok, rows[0]) == ['<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
                                          '</tool_call><|im_end|>']
    assert trained_runs(tok, rows[1]) == ["Let me look.<|im_end|>"]
    as_json = tokenize_dataset(Dataset.from_list([{**records[1], "tools": json.dumps([quote])}]), tok, "chatml", None,
                               verbose=False)  # tools stored as a JSON string, as some datasets do
    assert as_json[0]["input_ids"] == rows[1]["input_ids"]
    with pytest.raises(TemplateError, match=r"record 0: field 'tools' is not valid JSON"):
        tokenize_dataset(Dataset.from_list([{**records[1], "tools": "[{"}]), tok, "chatml", None, verbose=False)


def test_every_conversation_too_long_for_max_length_is_one_clear_error(smollm2_tokenizer):
    from sft_hf.tokenization import template_overhead

    long_reply = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(["one"] * 40)}]
    max_length = template_overhead(get_template("chatml"), smollm2_tokenizer) + 3
    with pytest.raises(TemplateError, match=rf"^\[data\] no example is left after truncation to max_length="
                                            rf"{max_length}: every response \+ EOS is longer \(the shortest has 4"):
        tokenize_dataset(Dataset.from_list([{"messages": long_reply}] * 2), smollm2_tokenizer, "chatml", max_length,
                         verbose=False)


def test_a_conversation_opening_with_an_assistant_greeting(smollm2_tokenizer):
    tok = smollm2_tokenizer
    greeting = [{"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Red."}]
    data = Dataset.from_list([{"messages": greeting}])
    with pytest.raises(TemplateError, match=r"^\[data\] record 0: message 0 \(assistant\): the conversation opens "
                                            r"with an assistant turn, .* set trained_turns: last"):
        tokenize_dataset(data, tok, "chat_template", None, verbose=False)
    last = tokenize_dataset(data, tok, "chat_template", None, verbose=False, trained_turns="last")[0]
    assert trained_runs(tok, last) == ["Red.<|im_end|>"]
    chatml = tokenize_dataset(data, tok, "chatml", None, verbose=False)[0]
    assert trained_runs(tok, chatml) == ["Hi! How can I help?<|im_end|>", "Red.<|im_end|>"]


def test_chatml_builtin_multi_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer  # EOS is <|im_end|>: the built-in chatml is then SmolLM2's format without a system prompt
    row = tokenize_dataset(Dataset.from_list([{"messages": CONVERSATION}]), tok, "chatml", None, verbose=False)[0]
    assert trained_runs(tok, row) == ["Red.<|im_end|>", "Bonjour.<|im_end|>", "Merci beaucoup.<|im_end|>"]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION).rstrip("\n")
    assert tok.decode(row["input_ids"]) == text


def test_not_prefix_stable_template_is_an_error_naming_the_record(base_dir):
    tok = styled_tokenizer(base_dir, REASONING_LAST)
    messages = [{**m, "reasoning": "think"} if m["role"] == "assistant" else m for m in CONVERSATION]
    ds = Dataset.from_list([{"messages": CONVERSATION[:2]}, {"messages": messages}])
    with pytest.raises(TemplateError, match=r"\[data\] record 1: message 1 \(assistant\).*not prefix-stable"):
        tokenize_dataset(ds, tok, "chat_template", None, verbose=False)
    # only the final reply needs locating with trained_turns: last, and it is the template's whole final turn
    rows = tokenize_dataset(ds, tok, "chat_template", None, verbose=False, trained_turns="last")
    assert trained_runs(tok, rows[1]) == ["<think>\nthink\n</think>\n\nMerci beaucoup.<|im_end|>"]


def test_generation_tags_mark_the_replies(base_dir):
    tok = styled_tokenizer(base_dir, CHATML_TAGS)  # not prefix-stable either, but its tags say what is trained
    messages = [{**m, "reasoning": "hm"} if m["role"] == "assistant" else m for m in CONVERSATION]
    row = tokenize_dataset(Dataset.from_list([{"messages": messages}]), tok, "chat_template", None, verbose=False)[0]
    assert trained_runs(tok, row) == ["Red.<|im_end|>", "Bonjour.<|im_end|>", "<think>hm</think>Merci beaucoup.<|im_end|>"]
    # the same tokens transformers' own assistant mask marks
    theirs = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert tok.decode([t for t, m in zip(theirs["input_ids"], theirs["assistant_masks"]) if m]) == \
        "".join(trained_runs(tok, row))


def test_gemma_refuses_a_system_turn_with_the_record_named(base_dir):
    tok = styled_tokenizer(base_dir, "gemma")
    ds = Dataset.from_list([{"messages": [{"role": "system", "content": "Be brief."}, *CONVERSATION]}])
    with pytest.raises(TemplateError, match=r"record 0: the chat template refuses it: System role not supported"):
        tokenize_dataset(ds, tok, "chat_template", None, verbose=False)


def test_truncation_drops_whole_exchanges_and_keeps_the_system_prompt(smollm2_tokenizer, capsys):
    tok = smollm2_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    full = encode_records([{"messages": messages}], tok, "chat_template")[0]
    without_first = encode_records([{"messages": [messages[0], *messages[3:]]}], tok, "chat_template")[0]
    out = tokenize_dataset(Dataset.from_list([{"messages": messages}]), tok, "chat_template",
                           max_length=len(without_first.input_ids), verbose=True)[0]
    assert len(full.input_ids) > len(without_first.input_ids)
    assert out["input_ids"] == without_first.input_ids and out["truncated"] and out["dropped_turns"] == 2
    assert trained_runs(tok, out) == ["Bonjour.<|im_end|>", "Merci beaucoup.<|im_end|>"]
    assert "truncated 1 (2 leading turns dropped)" in capsys.readouterr().out
    # one exchange left and still too long: today's rule, cut after the leading special token, reply kept
    last = encode_records([{"messages": [messages[0], *messages[5:]]}], tok, "chat_template")[0]
    row = encode_records([{"messages": messages}], tok, "chat_template", max_length=len(last.input_ids) - 3)[0].row()
    assert row["dropped_turns"] == 4 and len(row["input_ids"]) == len(last.input_ids) - 3
    assert row["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert row["input_ids"][1:] == last.input_ids[4:]
    assert trained_runs(tok, row) == ["Merci beaucoup.<|im_end|>"]


@pytest.mark.parametrize("name", ["llama3", "alpaca-bos"])
def test_left_truncation_keeps_the_leading_special_tokens(base_dir, name):
    """Issue 12: a cut prompt keeps BOS (added by the tokenizer, or written by the chat template)."""
    from tokenizers import processors

    record = {"instruction": "Summarize. " + "word " * 60, "input": "", "output": "Words."}
    if name == "llama3":
        tok, template = styled_tokenizer(base_dir, "llama3"), "chat_template"
        leading = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>"])
    else:
        tok, template = AutoTokenizer.from_pretrained(base_dir), "alpaca"
        tok.add_special_tokens({"bos_token": "<s>"})
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
        leading = [tok.bos_token_id]
    full = encode_records([record], tok, template)[0]
    assert full.input_ids[: len(leading)] == leading
    row = encode_records([record], tok, template, max_length=30)[0].row()
    n_reply = sum(row["completion_mask"])
    assert len(row["input_ids"]) == 30 and row["input_ids"][: len(leading)] == leading
    assert row["input_ids"][len(leading):] == full.input_ids[len(full.input_ids) - 30 + len(leading):]
    assert tok.decode(row["input_ids"][-n_reply:]) in ("Words." + tok.eos_token, "Words.<|eot_id|>")



def test_sharegpt_records_become_messages(tmp_path, smollm2_tokenizer):
    sharegpt = [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}]
    ds = load_instruction_dataset(write_jsonl(tmp_path / "sg.jsonl", sharegpt), train_split_ratio=1.0,
                                  test_split_ratio=0.0)["train"]
    assert [(m["role"], m["content"]) for m in ds[0]["messages"]] == [
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Weather?"), ("assistant", ""),
        ("tool", "sunny"), ("assistant", "Sunny.")]
    assert ds[0]["messages"][4]["tool_calls"][0]["function"]["name"] == "weather"
    row = tokenize_dataset(ds, smollm2_tokenizer, "chatml", None, verbose=False)[0]
    assert "Sunny.<|im_end|>" in trained_runs(smollm2_tokenizer, row)
    # --column_mapping still applies
    renamed = [{"dialog": r["conversations"]} for r in sharegpt]
    ds = load_instruction_dataset(write_jsonl(tmp_path / "renamed.jsonl", renamed),
                                  column_mapping={"dialog": "conversations"}, train_split_ratio=1.0,
                                  test_split_ratio=0.0)["train"]
    assert (ds[0]["messages"][1]["role"], ds[0]["messages"][1]["content"]) == ("user", "Hi")


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
     "record 0 (line 1), field 'conversations', message 1, 'from': unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Yo"}]},
     "record 0 (line 1), field 'messages', message 1, 'role': unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "Yo"}]},
     "record 0 (line 1), field 'messages', message 0, 'content': empty user turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                   {"role": "user", "content": "More?"}]},
     "record 0 (line 1), field 'messages': the last message must be an assistant reply"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "not json"}]},
     "record 0 (line 1), field 'conversations', message 1, 'value': a function_call must be JSON"),
])
def test_bad_conversations_name_file_record_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError) as error:
        load_instruction_dataset(path)
    assert str(error.value).startswith(f"{path}: {message}")


def test_report_counts_turns_and_trained_tokens_per_role(smollm2_tokenizer):
    from sft_hf.inspection.report import tokens_by_role

    tok = smollm2_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    rows = tokenize_dataset(Dataset.from_list([{"messages": messages}]), tok, "chat_template", None, verbose=False)
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assistant = sum(n(f"<|im_start|>assistant\n{c}<|im_end|>\n") for c in replies) - n("\n")  # the last: no "\n"
    expected = {
        "system": {"tokens": n("<|im_start|>system\nBe brief.<|im_end|>\n"), "trained": 0},
        "user": {"tokens": sum(n(f"<|im_start|>user\n{m['content']}<|im_end|>\n") for m in CONVERSATION
                               if m["role"] == "user"), "trained": 0},
        "assistant": {"tokens": assistant, "trained": sum(n(c) + 1 for c in replies)},
    }
    assert tokens_by_role(rows, completion_only_loss=True) == expected
    everything = tokens_by_role(rows, completion_only_loss=False)  # all but the row's first token
    assert {r: c["trained"] for r, c in everything.items()} == {
        r: c["tokens"] - (r == "system") for r, c in expected.items()}
