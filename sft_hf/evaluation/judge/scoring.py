"""What a 0-100 judge answered, read: a bare or embedded integer (chapter 7's text prompt) or a reply validated
against SCORE_SCHEMA (structured output). Every reply that is not a score says why."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass
class ParsedScore:
    score: int | None
    problem: str | None = None  # why `score` is None: "no number", "out of range", "not an integer", "ambiguous"


# "0 to 100", "0-100", "out of 100", "/100": the scale, not the score.
_SCALE = re.compile(r"\b0\s*(?:to|-|–)\s*100\b|(?:out of|/)\s*100\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w])")


def parse_score(reply: str, low: int = 0, high: int = 100) -> ParsedScore:
    """A bare integer, or the single integer inside prose ("Score: 85."); anything else is unparsed, with why."""
    text = _SCALE.sub(" ", reply or "")
    numbers = {m.group().lstrip("+").rstrip(".") for m in _NUMBER.finditer(text)}
    if not numbers:
        return ParsedScore(None, "no number")
    if len(numbers) > 1:
        return ParsedScore(None, "ambiguous")
    number = numbers.pop()
    value = float(number)
    if value != int(value):
        return ParsedScore(None, "not an integer")
    if not low <= value <= high:
        return ParsedScore(None, "out of range")
    return ParsedScore(int(value))


# What a structured judge must answer: exactly {"score": <integer 0-100>}. The enum says the range again because
# llama.cpp's grammar (llama-cpp-python 0.3) ignores minimum/maximum: a 135 M judge then wrote {"score": 200}.
SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100, "enum": list(range(101))}},
    "required": ["score"],
    "additionalProperties": False,
}


def parse_structured_score(reply: str) -> ParsedScore:
    """Validate a structured reply against SCORE_SCHEMA (a JSON object with one key, an integer 0-100)."""
    try:
        value = json.loads(reply)
    except (json.JSONDecodeError, TypeError):
        return ParsedScore(None, "invalid JSON")
    if not isinstance(value, dict) or set(value) != {"score"}:
        return ParsedScore(None, 'not {"score": <integer>}')
    score = value["score"]
    if isinstance(score, bool) or not isinstance(score, int):
        return ParsedScore(None, "not an integer")
    if not 0 <= score <= 100:
        return ParsedScore(None, "out of range")
    return ParsedScore(score)


def parse_reply(reply: str, asked: str) -> tuple[ParsedScore, str]:
    """The score and the path it came by. A reply asked as "json" is validated against the schema, unless it is
    prose (a server that ignored the format answered chapter 7's prompt as text): that is parsed as "text"."""
    if asked == "json" and (reply or "").lstrip()[:1] in ("{", "["):
        return parse_structured_score(reply), "json"
    return parse_score(reply), "text"

