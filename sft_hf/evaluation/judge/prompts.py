"""Chapter 7's judge prompt: the instruction as the model saw it, the reference answer and the response to score."""
from __future__ import annotations

import string

from sft_hf.errors import RecipeError, did_you_mean
from sft_hf.templates import get_template, reference_answer

# Chapter 7, character for character; {input} is `format_input(entry)`, the alpaca prompt without its response part.
JUDGE_PROMPT = (
    "Given the input `{input}` and correct output `{output}`, score the model response `{response}` on a scale "
    "from 0 to 100, where 100 is the best score. Respond with the integer number only."
)


def format_input(entry: dict, template="alpaca") -> str:
    """Chapter 7's `format_input`: the prompt up to, but not including, the response header. A conversation
    (`messages`) is shown as its turns before the final reply, one `role: content` line each."""
    if entry.get("messages"):
        return "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in entry["messages"][:-1])
    template = get_template(template)
    prompt = template.format_prompt(entry)
    return prompt[: len(prompt) - len(template.response)] if template.response else prompt


def make_judge_prompt(entry: dict, response_key: str = "model_response", prompt_template: str = JUDGE_PROMPT) -> str:
    if response_key not in entry:
        raise KeyError(f"record has no field {response_key!r} (fields: {sorted(entry)})")
    return prompt_template.format(input=format_input(entry), output=reference_answer(entry), response=entry[response_key])


JUDGE_PROMPT_FIELDS = ("input", "output", "response")


def check_prompt_fields(prompt_template: str, fields: tuple[str, ...], flag: str = "--judge_prompt") -> None:
    """A judge prompt names only the fields it is filled with ({input}, ...), and is a valid format string: checked
    before anything is generated or asked, so a typo is one line, not a KeyError after minutes of generation."""
    try:
        named = [name for _, name, _, _ in string.Formatter().parse(prompt_template) if name is not None]
    except ValueError as e:  # a lone "{" or "}": literal braces are written {{ and }}
        raise RecipeError(f"{flag}: not a valid template ({e}; write a literal brace as {{{{ or }}}})") from None
    for name in named:
        if name not in fields:
            hint = did_you_mean(name, fields)
            raise RecipeError(f"{flag}: unknown field {{{name}}}: the prompt can use "
                              + ", ".join(f"{{{f}}}" for f in fields) + (f" ({hint})" if hint else ""))
