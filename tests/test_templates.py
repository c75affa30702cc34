"""Template strings, character for character (chapter 7 and its exercise 7.1)."""
import pytest

from sft_hf.templates import TemplateError, get_template

PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def test_alpaca_matches_chapter_7_with_and_without_input(instruction_records):
    alpaca = get_template("alpaca")
    with_input = instruction_records[0]  # chapter 7's first record has an input
    prompt, response = alpaca.render(with_input)
    assert prompt == (
        PREAMBLE
        + "\n\n### Instruction:\nEvaluate the following phrase by transforming it into the spelling given."
        + "\n\n### Input:\nfreind --> friend"
        + "\n\n### Response:\n"
    )
    assert response == with_input["output"]
    no_input = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert alpaca.format_prompt(no_input) == PREAMBLE + "\n\n### Instruction:\nName a color.\n\n### Response:\n"


def test_phi3_matches_exercise_7_1():
    phi3 = get_template("phi3")
    record = {"instruction": "Identify the correct spelling.", "input": "Ocassion", "output": "Occasion."}
    assert phi3.render(record) == ("<|user|>\nIdentify the correct spelling.\nOcassion\n<|assistant|>:\n", "Occasion.")
    assert phi3.format_prompt({**record, "input": ""}) == "<|user|>\nIdentify the correct spelling.\n<|assistant|>:\n"


def test_chatml_single_and_multi_turn():
    chatml = get_template("chatml")
    prompt, response = chatml.render({"instruction": "Hi", "input": "there", "output": "Hello!"})
    assert prompt == "<|im_start|>user\nHi\n\nthere<|im_end|>\n<|im_start|>assistant\n"
    assert response == "Hello!"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    prompt, response = chatml.render({"messages": messages})
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert response == "6"


def test_chat_template_uses_the_tokenizers_own(bpe_tokenizer):
    tok = bpe_tokenizer.__class__(tokenizer_object=bpe_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    record = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}
    prompt, response = get_template("chat_template").render(record, tok)
    assert prompt == "[user] Say hi\n[assistant] "
    assert response == "hi"  # the template's own EOS is stripped: tokenize_dataset appends it as an id


def test_user_template_from_yaml(tmp_path):
    path = tmp_path / "qa.yaml"
    path.write_text('prompt: "Q: {instruction}"\ninput: " ({input})"\nresponse: "\\nA: "\n')
    qa = get_template(str(path))
    assert qa.name == "qa"
    assert qa.render({"instruction": "Why?", "input": "briefly", "output": "Because."}) == ("Q: Why? (briefly)\nA: ", "Because.")


def test_unknown_template_and_missing_field_are_clear_errors():
    with pytest.raises(TemplateError, match="unknown template 'alpacca'"):
        get_template("alpacca")
    custom = get_template({"name": "q", "prompt": "{question}", "response": "\n"})
    with pytest.raises(TemplateError, match="needs field 'question'"):
        custom.render({"instruction": "x", "input": "", "output": "y"})


def test_unknown_template_suggests_the_closest_name():
    with pytest.raises(TemplateError, match="unknown template 'chatlm': did you mean 'chatml'"):
        get_template("chatlm")
    with pytest.raises(TemplateError, match="template file missing.yaml not found"):
        get_template("missing.yaml")
    with pytest.raises(TemplateError, match=r"'prompt': \{0\} is not a record field name"):
        get_template({"prompt": "{0} says"})
    with pytest.raises(TemplateError, match=r"'prompt': Single '\}' encountered"):
        get_template({"prompt": "{instruction} }"})
