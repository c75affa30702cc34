"""Prompt templates: turn one record into (prompt text, response text).

A record is normalised to `instruction` / `input` / `output` (Alpaca) or `messages` (chat) before it gets here.
The prompt is everything the model is conditioned on; the response is what it learns to write. The EOS token is
appended later, as a token id, by `tokenize_dataset`.
"""
from __future__ import annotations

import difflib
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml


class TemplateError(ValueError):
    """A template is unknown, malformed, or asks for a field the record does not have."""


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str  # format string over the record's fields, e.g. "...### Instruction:\n{instruction}"
    input: str = ""  # appended only when the record's `input` is non-empty
    response: str = ""  # separator between prompt and output, e.g. "\n\n### Response:\n"; ends the prompt

    def fields(self) -> set[str]:
        parts = (self.prompt, self.input)
        return {f for part in parts for _, f, _, _ in string.Formatter().parse(part) if f}

    def format_prompt(self, record: dict, tokenizer=None) -> str:
        """The prompt up to and including the response header: what generation starts from."""
        if record.get("messages") is not None:
            record = messages_to_alpaca(record["messages"], self.name)
        try:
            text = self.prompt.format(**record)
            if record.get("input"):
                text += self.input.format(**record)
        except KeyError as e:
            raise TemplateError(
                f"template {self.name!r} needs field {e.args[0]!r}, which the record lacks (it has {sorted(record)})"
            ) from None
        return text + self.response

    def render(self, record: dict, tokenizer=None) -> tuple[str, str]:
        if record.get("messages") is not None:
            record = messages_to_alpaca(record["messages"], self.name)
        return self.format_prompt(record), record["output"]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ChatTemplate(Template):
    """The tokenizer's own chat template (`tokenizer.apply_chat_template`)."""

    def render(self, record: dict, tokenizer=None) -> tuple[str, str]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'chat_template' needs a tokenizer that has a chat template")
        messages = record.get("messages") or alpaca_to_messages(record)
        if messages[-1]["role"] != "assistant":
            raise TemplateError("the last message must come from the assistant: it is the response to train on")
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise TemplateError("the chat template does not render the conversation as prompt + response")
        response = full[len(prompt) :].rstrip()
        # The EOS token is appended as an id later; don't train it twice when the chat template already wrote it.
        if tokenizer.eos_token and response.endswith(tokenizer.eos_token):
            response = response[: -len(tokenizer.eos_token)]
        return prompt, response

    def format_prompt(self, record: dict, tokenizer=None) -> str:
        messages = record.get("messages") or alpaca_to_messages({**record, "output": ""})
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class ChatMLTemplate(Template):
    """ChatML, rendered here so it works with any tokenizer; multi-turn `messages` are kept as turns."""

    def render(self, record: dict, tokenizer=None) -> tuple[str, str]:
        messages = record.get("messages") or alpaca_to_messages(record)
        if messages[-1]["role"] != "assistant":
            raise TemplateError("the last message must come from the assistant: it is the response to train on")
        return self._prompt(messages[:-1]), messages[-1]["content"]

    def format_prompt(self, record: dict, tokenizer=None) -> str:
        messages = record.get("messages") or alpaca_to_messages({**record, "output": ""})
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self._prompt(messages)

    @staticmethod
    def _prompt(messages: list[dict]) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"


ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

TEMPLATES: dict[str, Template] = {
    # Chapter 7, `format_input` + "\n\n### Response:\n" + output, character for character.
    "alpaca": Template(
        name="alpaca",
        prompt=ALPACA_PREAMBLE + "\n\n### Instruction:\n{instruction}",
        input="\n\n### Input:\n{input}",
        response="\n\n### Response:\n",
    ),
    # Chapter 7, exercise 7.1.
    "phi3": Template(name="phi3", prompt="<|user|>\n{instruction}", input="\n{input}", response="\n<|assistant|>:\n"),
    "chatml": ChatMLTemplate(name="chatml", prompt="{instruction}", input="\n\n{input}"),
    "chat_template": ChatTemplate(name="chat_template", prompt="{instruction}", input="\n\n{input}"),
    # For data whose prompt is already formatted (`prompt`/`completion` records meant to be used verbatim).
    "raw": Template(name="raw", prompt="{instruction}", input="{input}"),
}


def get_template(name_or_path: str | dict | Template) -> Template:
    """A built-in template by name, or a user template from a YAML file / dict with keys prompt, input, response."""
    if isinstance(name_or_path, Template):
        return name_or_path
    if isinstance(name_or_path, dict):
        spec = dict(name_or_path)
    elif name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    elif str(name_or_path).endswith((".yaml", ".yml")) and Path(name_or_path).is_file():
        spec = yaml.safe_load(Path(name_or_path).read_text()) or {}
        spec.setdefault("name", Path(name_or_path).stem)
    elif str(name_or_path).endswith((".yaml", ".yml")):
        raise TemplateError(f"template file {name_or_path} not found")
    else:
        close = difflib.get_close_matches(str(name_or_path), TEMPLATES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TemplateError(
            f"unknown template {name_or_path!r}: {hint}use one of {sorted(TEMPLATES)} or a YAML file with keys "
            "prompt, input, response"
        )
    if not isinstance(spec, dict):
        raise TemplateError(f"template {name_or_path}: expected a mapping with keys prompt, input, response")
    unknown = set(spec) - {"name", "prompt", "input", "response"}
    if unknown or "prompt" not in spec:
        raise TemplateError(f"template {spec.get('name')!r}: needs 'prompt' (optional 'input', 'response'); got {sorted(spec)}")
    spec.setdefault("name", "custom")
    for key in ("prompt", "input"):  # `response` is literal text: it is not formatted
        check_format_string(spec["name"], key, spec.get(key, ""))
    if not isinstance(spec.get("response", ""), str):
        raise TemplateError(f"template {spec['name']!r}, 'response': expected text")
    return Template(**spec)


def check_format_string(name: str, key: str, text) -> None:
    """Template text may only use named record fields, e.g. {instruction}; literal braces are written {{ }}."""
    if not isinstance(text, str):
        raise TemplateError(f"template {name!r}, {key!r}: expected text, got {type(text).__name__}")
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise TemplateError(f"template {name!r}, {key!r}: {e} (write literal braces as {{{{ and }}}})") from None
    for _, field, spec, conversion in parsed:
        if field is not None and (not field.isidentifier() or spec or conversion):
            raise TemplateError(
                f"template {name!r}, {key!r}: {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not a record field name like {{instruction}}"
            )


def alpaca_to_messages(record: dict) -> list[dict]:
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def messages_to_alpaca(messages: list[dict], template_name: str) -> dict:
    """Single-turn chat records for non-chat templates: user → instruction, assistant → output."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1 and turns[0]["role"] == "user":  # a prompt to generate from
        turns = turns + [{"role": "assistant", "content": ""}]
    if len(turns) != 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
        raise TemplateError(
            f"template {template_name!r} takes one user turn and one assistant turn; use 'chatml' or "
            "'chat_template' for multi-turn conversations"
        )
    return {"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]}
