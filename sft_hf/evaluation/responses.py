"""Response files: what recipes/evaluate.py writes (test_responses.json: each record plus `model_response`) and what
recipes/evaluate.py, the pairwise judge and the arena read back.

    read_records    a JSON array or JSON lines of objects, each with where it is ("r.jsonl: record 3 (line 4)")
    read_responses  the same, checked: a prompt, the response fields as text (and a reference, when asked)
    default_name    a side's name from its file (a test_responses.json is named after its run folder)
    prompt_key      what two files are joined by: instruction + input, or a conversation's turns before its reply
    join_by_prompt  the records of two or more files matched by prompt_key, the k-th repeat with the k-th

Bad records are a DataError naming the file, the record (and line, for JSON lines) and the field.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

from sft_hf.errors import DataError, RecipeError

RESPONSES_FILE = "test_responses.json"  # what recipes/evaluate.py writes into its output folder
SHOWN_UNMATCHED = 3  # records named in a join error; the rest are counted


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_records(path: str | Path, flag: str | None = None) -> list[tuple[dict, str]]:
    """(record, where) pairs, where naming it for messages: a JSON array of objects, or one object per line
    (.jsonl, or JSON lines in a .json file). A missing file is a RecipeError naming `flag`, the option that gave it;
    malformed JSON (line and column) and a record that is not an object are DataErrors."""
    from sft_hf.data import parse_json_records  # imports `datasets`: only once a file is read

    path = str(path)
    if not Path(path).is_file():
        raise RecipeError(f"{flag + ' ' if flag else ''}{path}: no such file")
    bad_lines: list[str] = []
    parsed = parse_json_records(path, bad_lines)
    if bad_lines:
        more = len(bad_lines) - 1
        raise DataError(bad_lines[0] + (f" (and {more} more bad line{'s' * (more > 1)})" if more else ""))
    located = []
    for index, (record, line) in enumerate(parsed):
        where = f"{path}: record {index}" + (f" (line {line})" if line else "")
        if not isinstance(record, dict):
            raise DataError(f"{where}, expected an object with fields, got {type(record).__name__}")
        located.append((record, where))
    return located


def require_text(record: dict, where: str, fields) -> None:
    """Each of `fields` is text in the record; else a DataError naming the file, the record and the field."""
    for field in fields:
        if not isinstance(record.get(field), str):
            raise DataError(f"{where}, field {field!r}: missing or not text (fields: {sorted(record)})")


def is_conversation(record: dict) -> bool:
    return isinstance(record.get("messages"), list) and bool(record["messages"])


def check_prompt(record: dict, where: str) -> None:
    """The record has a prompt: a conversation (`messages`, role/content objects, the last one the reply) or an
    `instruction` with an optional `input`, as text."""
    if is_conversation(record):
        if not all(isinstance(turn, dict) for turn in record["messages"]):
            raise DataError(f"{where}, field 'messages': expected a list of {{role, content}} objects")
        return
    require_text(record, where, ["instruction"])
    if not isinstance(record.get("input") or "", str):
        raise DataError(f"{where}, field 'input': not text")


def read_responses(path: str | Path, response_keys, flag: str | None = None, reference: bool = False) -> list[dict]:
    """The records of a responses file, each with a prompt and every one of `response_keys` as text; with
    `reference`, also the answer to score against (`output`; a conversation's is its last reply)."""
    located = read_records(path, flag)
    check_responses(located, response_keys, reference)
    return [record for record, _ in located]


def check_responses(located: list[tuple[dict, str]], response_keys, reference: bool = False) -> None:
    for record, where in located:
        check_prompt(record, where)
        needs_output = reference and not is_conversation(record)
        require_text(record, where, [*(["output"] if needs_output else []), *response_keys])


def default_name(path: str | Path) -> str:
    """A side's name from its file: the file's stem, but recipes/evaluate.py's test_responses.json is named after
    its run folder (outputs/base/test_responses.json → base)."""
    path = Path(path)
    return path.resolve().parent.name if path.stem == Path(RESPONSES_FILE).stem else path.stem


# ---------------------------------------------------------------------------------------------------------------
# Joining


def prompt_turns(record: dict) -> list[dict]:
    """A conversation's turns before its reply (the last message)."""
    return record["messages"][:-1]


def prompt_key(record: dict) -> tuple:
    """What two response files are joined by: instruction + input, or a conversation's turns before its reply
    (content as JSON: it may be a list of parts). The same last question after different turns is another prompt."""
    if is_conversation(record):
        return tuple((turn.get("role"), json.dumps(turn.get("content") or "")) for turn in prompt_turns(record))
    return record.get("instruction"), record.get("input") or ""


def _shorten(text, width: int = 40) -> str:
    text = " ".join(str(text or "").split())
    return text[:width] + "…" if len(text) > width else text


def describe(record: dict, index: int) -> str:
    """"record 3 ('Name three animals…', input 'farm')" for messages: the instruction and its input, or a
    conversation's last question."""
    if is_conversation(record):
        turns = prompt_turns(record)
        return f"record {index} ({_shorten(turns[-1].get('content') if turns else '')!r})"
    input_ = record.get("input") or ""
    shown_input = f", input {_shorten(input_)!r}" if input_ else ""
    return f"record {index} ({_shorten(record.get('instruction'))!r}{shown_input})"


def match_by_prompt(left: list[dict], right: list[dict]) -> tuple[list[int | None], list[int]]:
    """For each left record, the index of its right counterpart (None: there is none), and the right records left
    over. The k-th repeat of a prompt on the left is matched with its k-th repeat on the right."""
    waiting = collections.defaultdict(collections.deque)
    for j, record in enumerate(right):
        waiting[prompt_key(record)].append(j)
    matches = []
    for record in left:
        queue = waiting.get(prompt_key(record))
        matches.append(queue.popleft() if queue else None)
    return matches, sorted(j for queue in waiting.values() for j in queue)


def _unmatched(indices: list[int], records: list[dict], here: str, there: str) -> str:
    shown = ", ".join(describe(records[k], k) for k in indices[:SHOWN_UNMATCHED])
    more = ", …" if len(indices) > SHOWN_UNMATCHED else ""
    return f"{len(indices)} record(s) of {here} not in {there}: {shown}{more}"


def join_by_prompt(sides: list[tuple[str, list[dict]]]) -> list[tuple[int, ...]]:
    """One row per record of the first side, in its order: the index of the record with the same prompt in each
    side. `sides` are (name for messages, records). Every record must have its counterpart in every other side: a
    DataError names the sides and the records that do not (up to three each)."""
    (first_name, first), *others = sides
    columns, problems = [list(range(len(first)))], []
    for name, records in others:
        matches, leftover = match_by_prompt(first, records)
        missing = [i for i, j in enumerate(matches) if j is None]
        if missing:
            problems.append(_unmatched(missing, first, first_name, name))
        if leftover:
            problems.append(_unmatched(leftover, records, name, first_name))
        columns.append(matches)
    if problems:
        names = [name for name, _ in sides]
        listed = " and ".join([", ".join(names[:-1]), names[-1]])
        raise DataError(f"{listed} do not hold the same instructions (joined by instruction + input, or a "
                        f"conversation's turns): " + "; ".join(problems) + f" (generate "
                        f"{'both' if len(sides) == 2 else 'all'} from the same --dataset_name, --split and "
                        "--shuffle_seed)")
    return list(zip(*columns))
