"""Prompt templates: turn one record into the text the model reads, cut into segments that say which part is a reply.

A record is normalised to `instruction` / `input` / `output` (Alpaca) or `messages` (chat) before it gets here.
`Template.segments` returns the rendered text as consecutive `Segment`s, each tagged with the role of the message it
belongs to and whether it is a reply: what the model writes after an assistant header (the reply's content and the
template's end-of-turn token). Alpaca-style templates give two segments, prompt and response; chat templates one or
more per message. `Template.render` is the single-turn view (prompt text, response text). EOS is appended later, as a
token id, by `tokenize_dataset` (not twice when the reply already ends with it).
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from sft_hf.errors import UserError, did_you_mean


class TemplateError(UserError):
    """A template is unknown, malformed, or asks for a field the record does not have."""


TRAINED_TURNS = ("all", "last")  # which assistant replies of a conversation are trained


@dataclass(frozen=True)
class Segment:
    """A consecutive piece of the rendered text. `role`: the role of the message it belongs to (a template's own text,
    e.g. BOS or a default system prompt, belongs to the first message; "system+user" when a template renders several
    messages as one piece); `turn`: that message's index; `reply`: text the model writes after an assistant header."""

    text: str
    role: str
    turn: int
    reply: bool = False


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str  # format string over the record's fields, e.g. "...### Instruction:\n{instruction}"
    input: str = ""  # appended only when the record's `input` is non-empty
    response: str = ""  # separator between prompt and output, e.g. "\n\n### Response:\n"; ends the prompt
    multi_turn = False  # (a class attribute, not a field) these take one user turn and one assistant turn

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
                if not self.input and "input" not in self.fields():  # the record's input would vanish silently
                    raise TemplateError(
                        f"template {self.name!r} has no 'input' part, so the record's input {record['input']!r} would "
                        "be dropped: add one to the template (e.g. input: \"\\n\\n{input}\") or use {input} in its prompt")
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

    def segments(self, record: dict, tokenizer=None, trained_turns: str = "all") -> list[Segment]:
        """One prompt (user) and one response (assistant reply): these templates take single-turn records."""
        prompt, response = self.render(record, tokenizer)
        return [Segment(prompt, "user", 0), Segment(response, "assistant", 1, reply=True)]

    def to_dict(self) -> dict:
        return asdict(self)


def _render_from_segments(template: Template, record: dict, tokenizer) -> tuple[str, str]:
    """(everything before the last reply, the last reply without the tokenizer's EOS text): the single-turn view."""
    segments = template.segments(record, tokenizer, trained_turns="last")
    last = max(i for i, s in enumerate(segments) if s.reply)
    response = segments[last].text
    eos = getattr(tokenizer, "eos_token", None) or "<|im_end|>"
    if response.endswith(eos):  # EOS is appended as an id later (and not twice)
        response = response[: -len(eos)]
    return "".join(s.text for s in segments[:last]), response


@dataclass(frozen=True)
class ChatTemplate(Template):
    """The tokenizer's own chat template (`tokenizer.apply_chat_template`), any number of turns."""

    multi_turn = True

    def render(self, record: dict, tokenizer=None) -> tuple[str, str]:
        return _render_from_segments(self, record, tokenizer)

    def segments(self, record: dict, tokenizer=None, trained_turns: str = "all") -> list[Segment]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'chat_template' needs a tokenizer that has a chat template")
        return chat_template_segments(tokenizer, record_messages(record), record_tools(record), trained_turns)

    def format_prompt(self, record: dict, tokenizer=None) -> str:
        messages = record_messages(record, generation=True)
        return tokenizer.apply_chat_template(messages, tools=record_tools(record), tokenize=False,
                                             add_generation_prompt=True)


@dataclass(frozen=True)
class ChatMLTemplate(Template):
    """ChatML, rendered here so it works with any tokenizer; multi-turn `messages` are kept as turns.

    An assistant turn ends with the tokenizer's EOS token (`<|im_end|>` for ChatML tokenizers such as SmolLM2's and
    Qwen's), so the model learns to stop where generation stops; other turns end with `<|im_end|>`.
    """

    multi_turn = True

    def render(self, record: dict, tokenizer=None) -> tuple[str, str]:
        return _render_from_segments(self, record, tokenizer)

    def segments(self, record: dict, tokenizer=None, trained_turns: str = "all") -> list[Segment]:
        messages = record_messages(record)
        if not messages or messages[-1]["role"] != "assistant":
            raise TemplateError("the last message must come from the assistant: it is the response to train on")
        end = getattr(tokenizer, "eos_token", None) or "<|im_end|>"
        return self._segments(messages, end, record_tools(record))[:-1]  # no final "\n"

    def format_prompt(self, record: dict, tokenizer=None) -> str:
        end = getattr(tokenizer, "eos_token", None) or "<|im_end|>"
        segments = self._segments(record_messages(record, generation=True), end, record_tools(record))
        return "".join(s.text for s in segments) + "<|im_start|>assistant\n"

    @staticmethod
    def _segments(messages: list[dict], assistant_end: str, tools: list[dict] | None = None) -> list[Segment]:
        out = []
        if tools:  # the definitions go into the system turn, as Qwen 2.5's ChatML template writes them (Hermes)
            block = CHATML_TOOLS.format(tools="".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools))
            if messages and messages[0]["role"] == "system":
                messages = [{**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{block}"}, *messages[1:]]
            else:  # the template's own text: part of the first message, never trained
                out.append(Segment(f"<|im_start|>system\n{block}<|im_end|>\n", messages[0]["role"], 0))
        for i, m in enumerate(messages):
            role, content = m["role"], m.get("content") or ""
            calls = [call.get("function", call) for call in m.get("tool_calls") or []]
            # Hermes-style tool calls, as Qwen's ChatML templates write them
            calls = "\n".join(f"<tool_call>\n{json.dumps({'name': f.get('name'), 'arguments': f.get('arguments')})}"
                              "\n</tool_call>" for f in calls)
            content = "\n".join(filter(None, [content, calls])) if calls else content
            if role == "assistant":
                out += [Segment(f"<|im_start|>{role}\n", role, i), Segment(content + assistant_end, role, i, True),
                        Segment("\n", role, i)]
            else:
                out.append(Segment(f"<|im_start|>{role}\n{content}<|im_end|>\n", role, i))
        return out


CHATML_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)

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
        hint = did_you_mean(str(name_or_path), TEMPLATES)
        raise TemplateError(
            f"unknown template {name_or_path!r}: {hint + ' ' if hint else ''}use one of {sorted(TEMPLATES)} or a YAML file with keys "
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


def record_messages(record: dict, generation: bool = False) -> list[dict]:
    """The record as chat messages (Alpaca records become one user and one assistant turn). Keys holding None are
    dropped, as `apply_chat_template` does: datasets fills the keys other messages have (`tool_calls`, ...) with None;
    a missing or null `content` (an OpenAI tool-call turn) becomes "".
    `generation=True`: without the final assistant reply, the conversation a model answers."""
    if record.get("messages") is not None:
        messages = [_without_none(m) for m in record["messages"]]
        for m in messages:  # OpenAI's tool-call turns have content null; chat templates read it as text
            m.setdefault("content", "")
    else:
        messages = alpaca_to_messages({**record, "output": record.get("output") or ""})
    if generation and messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages


def record_tools(record: dict) -> list[dict] | None:
    """The record's tool definitions (OpenAI `tools`: a list, or that list as a JSON string, as some datasets store
    it), without the keys datasets filled with None where other records' tools have them."""
    tools = record.get("tools")
    if tools is None or len(tools) == 0:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise TemplateError(f"field 'tools' is not valid JSON ({e}): {record['tools']!r:.60}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise TemplateError(f"field 'tools': expected a list of tool definitions, got {tools!r:.60}")
    return [_without_none(t) for t in tools]


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def chat_template_segments(tokenizer, messages: list[dict], tools=None, trained_turns: str = "all") -> list[Segment]:
    """Cut the tokenizer's rendering of a conversation into segments per message, with each assistant reply marked.

    A reply is what the template writes after the assistant header (`add_generation_prompt=True`) up to the next
    message, trailing whitespace excluded: the content and the end-of-turn token(s), e.g. `<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`, `</s>`. It is found by rendering the conversation turn by turn, which is only right when each
    rendering is the start of the next one (the prefix property); a template that re-renders earlier turns (e.g. drops
    their reasoning) fails it and gets a TemplateError for every reply that must be trained. Templates with
    `{% generation %}` tags mark the replies themselves.
    """
    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages)
    n = len(messages)
    prefix = [None] * (n + 1)  # prefix[i]: length of messages[:i] rendered, when that is the start of `full`
    prefix[0], prefix[n] = 0, len(full)
    for i in range(1, n):
        try:
            text = render(messages[:i])
        except Exception:  # noqa: BLE001 - e.g. a template that refuses a conversation ending with a system turn
            continue
        if full.startswith(text):
            prefix[i] = len(text)

    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    required = set(assistant) if trained_turns == "all" else set(assistant[-1:])
    replies = {}  # message index -> (start, end) in `full`
    tagged = _generation_spans(tokenizer, messages, tools)
    if tagged is not None:
        for start, end in tagged:
            turn = max(i for i, p in enumerate(prefix[:n]) if p is not None and p <= start)
            a, b = replies.get(turn, (start, end))
            replies[turn] = (min(a, start), max(b, end))
        missing = required - set(replies)
        if missing:
            raise TemplateError(f"the chat template's {{% generation %}} tags mark no reply in message {min(missing)}")
    else:
        for i in assistant:
            try:
                header = render(messages[:i], generation_prompt=True) if i else None
            except Exception:  # noqa: BLE001
                header = None
            end = prefix[i + 1]
            if header is not None and end is not None and full.startswith(header) and len(header) <= end:
                replies[i] = (len(header), len(header) + len(full[len(header) : end].rstrip()))
                continue
            if i in required and all(m["role"] == "system" for m in messages[:i]):  # e.g. a greeting
                raise TemplateError(
                    f"message {i} (assistant): the conversation opens with an assistant turn, which the chat template "
                    "renders as no reply to anything (there is no generation prompt to answer); start it with a user "
                    "turn, set trained_turns: last to train only the final reply, or use template chatml, which "
                    "trains every assistant turn"
                )
            if i in required:
                raise TemplateError(
                    f"message {i} (assistant): the chat template is not prefix-stable, so its reply cannot be located: "
                    "rendering the conversation up to this reply (with the generation prompt) is not the start of the "
                    "whole rendering (templates that re-render earlier turns, e.g. drop their reasoning, do this); "
                    "set trained_turns: last to train only the final reply, or use a template with {% generation %} tags"
                )

    if not replies:
        raise TemplateError("the conversation has no assistant reply to train on")
    for i, (a, b) in replies.items():  # a template without tool support drops the calls: an empty reply, trained
        names = [(c.get("function") or c).get("name") for c in messages[i].get("tool_calls") or []]
        if any(name and name not in full[a:b] for name in names):
            raise TemplateError(f"message {i} (assistant): the chat template does not render its tool_calls, so the "
                                f"reply would be trained as {full[a:b]!r}; use template chatml, which renders them")
    # Segment boundaries: where each message starts (when known) and where each reply starts and ends.
    starts = [(p, i) for i, p in enumerate(prefix[:n]) if p is not None]
    bounds = sorted({p for p, _ in starts} | {x for span in replies.values() for x in span} | {len(full)})
    segments = []
    for a, b in zip(bounds, bounds[1:]):
        turn = max(i for p, i in starts if p <= a)
        following = min([i for p, i in starts if p > a] + [n])
        role = "+".join(dict.fromkeys(m["role"] for m in messages[turn:following]))
        segments.append(Segment(full[a:b], role, turn, any(x <= a < y for x, y in replies.values())))
    for turn, (a, b) in replies.items():  # an empty reply (nothing after the header) still marks where EOS goes
        if a == b:
            position = next(k for k in range(len(segments) + 1) if sum(len(s.text) for s in segments[:k]) >= a)
            segments.insert(position, Segment("", "assistant", turn, True))
    last_reply = max(i for i, s in enumerate(segments) if s.reply)
    return _merge(segments[: last_reply + 1])  # what follows the last reply (a newline) is never read nor trained


def _merge(segments: list[Segment]) -> list[Segment]:
    out = []
    for s in segments:
        if not s.text and not s.reply:
            continue
        if out and (out[-1].turn, out[-1].reply, out[-1].role) == (s.turn, s.reply, s.role) and not s.reply:
            out[-1] = Segment(out[-1].text + s.text, s.role, s.turn)
        else:
            out.append(s)
    return out


def _generation_spans(tokenizer, messages, tools) -> list[tuple[int, int]] | None:
    """Character spans of the template's {% generation %} blocks, or None when it has none."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = tokenizer.get_chat_template(None, tools)
    if not re.search(r"\{%-?\s*generation\s*-?%\}", template):
        return None
    rendered, spans = render_jinja_template([messages], tools=tools, chat_template=template,
                                            return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    text = rendered[0]
    return [(a, a + len(text[a:b].rstrip())) for a, b in spans[0] if text[a:b].strip()]


def reference_answer(record: dict) -> str:
    """The answer a held-out record expects: Alpaca's `output`, or a conversation's final assistant reply."""
    if record.get("messages"):
        return record["messages"][-1].get("content") or ""
    return record["output"]
