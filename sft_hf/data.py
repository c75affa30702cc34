"""Load instruction data from local files or the Hub and split it, all through `datasets.load_dataset`.

Every record ends up in one of two shapes the templates understand:
`instruction` / `input` / `output` (Alpaca; `prompt`/`completion` are renamed onto it) or `messages` (chat: OpenAI
`role`/`content` messages, with `tool_calls` and `tool` turns; ShareGPT `conversations` of `from`/`value` are
converted onto it).
Every record is checked before anything is tokenized: bad ones raise one `DataError` that names, for each (up to 20),
the file, the record (and line, for JSON lines) and the field; with `skip_bad_records=True` they are dropped and
counted.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from sft_hf.errors import DataError
from sft_hf.templates import Template, TemplateError, get_template, messages_to_alpaca

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN_PREFIX = "builtin:"


def load_instruction_dataset(
    dataset_name: str,
    dataset_config: str | None = None,
    column_mapping: dict[str, str] | None = None,
    train_split_ratio: float = 0.85,
    test_split_ratio: float = 0.10,
    shuffle_seed: int | None = None,
    *,
    skip_bad_records: bool = False,
    template=None,
) -> DatasetDict:
    """Returns a DatasetDict with `train`, `validation` and `test` (the latter two possibly empty).

    `dataset_name` is a local file (.json/.jsonl/.csv/.parquet), a local folder, a Hub dataset name, or
    `builtin:<name>` for a dataset this project generates. When the source has only a train split, it is split in
    file order as chapter 7 does: the first `train_split_ratio` for training, the next `test_split_ratio` for test,
    the rest for validation (1100 records → 935 / 110 / 55). `shuffle_seed` shuffles before splitting.

    Bad records (malformed JSON, undecodable bytes, missing or wrongly typed fields, empty outputs, fields the
    `template` uses but the record lacks) raise `DataError`; with `skip_bad_records=True` they are dropped instead,
    logged, and listed in the result's `skipped_records` attribute.
    """
    source = dataset_name
    template = get_template(template) if template is not None else None
    skipped: list[str] = []
    record_lines: dict[str, list[int]] = {}  # split → the file line each record starts on, where known (CSV)
    if dataset_name.startswith(BUILTIN_PREFIX):
        from sft_hf.builtin import chapter7_chat, toy

        name = dataset_name[len(BUILTIN_PREFIX) :]
        files = chapter7_chat.write_chapter7_chat() if name == "chapter7-chat" else toy.write_builtin_dataset(name)
        raw = datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})
    elif Path(dataset_name).is_file():
        builder = FILE_BUILDERS.get(Path(dataset_name).suffix.lower())
        if builder is None:
            raise DataError(f"{dataset_name}: unsupported file type; use one of {sorted(FILE_BUILDERS)}")
        if builder == "json":  # parsed here first: errors can then name the line, and bad lines can be skipped
            raw = _load_json_file(dataset_name, column_mapping, template, skip_bad_records, skipped)
        elif builder == "csv":  # every cell as text: pandas would read the answer "3" as an int, "2.50" as 2.5
            reader = csv.reader(io.StringIO(_read_text(dataset_name)))  # bad bytes → the line number
            header = next(reader, [])
            record_lines["train"] = csv_record_lines(reader)
            features = datasets.Features({column: datasets.Value("string") for column in header})
            raw = _load_file(builder, dataset_name, features=features)
        else:
            raw = _load_file(builder, dataset_name)
    elif not Path(dataset_name).exists() and (
        Path(dataset_name).suffix.lower() in FILE_BUILDERS or dataset_name.startswith((".", "/", "~"))
    ):
        raise DataError(f"{dataset_name}: no such file or folder")
    else:  # a local folder or a Hub dataset name: `load_dataset` resolves both
        try:
            raw = datasets.load_dataset(dataset_name, dataset_config)
        except Exception as e:  # not found, offline, no data files, ...: one line that names the dataset
            raise DataError(f"{dataset_name}: could not be loaded: {type(e).__name__}: {e}") from e

    raw = DatasetDict(
        {
            split: normalize_columns(ds, column_mapping, source, skip_bad_records, template, skipped,
                                     record_lines.get(split))
            for split, ds in raw.items()
        }
    )
    if "train" not in raw:
        raise DataError(f"{source}: no 'train' split (found {sorted(raw)})")
    if skipped:
        kept = sum(len(ds) for ds in raw.values())
        logger.warning(f"{source}: skipped {len(skipped)} bad records, kept {kept}; the first: {skipped[0]}")
    if sum(len(ds) for ds in raw.values()) == 0:
        detail = f" ({len(skipped)} bad records skipped; the first: {skipped[0]})" if skipped else ""
        raise DataError(f"{source}: no usable record left{detail}")
    if set(raw) == {"train"}:
        raw = split_dataset(raw["train"], train_split_ratio, test_split_ratio, shuffle_seed)
    if len(raw["train"]) == 0 and train_split_ratio > 0:  # a ratio of 0: the caller only wants held-out splits
        raise DataError(
            f"{source}: the train split is empty (train_split_ratio={train_split_ratio} of "
            f"{sum(len(ds) for ds in raw.values())} records)"
        )
    for split in ("validation", "test"):
        if split not in raw:
            raw[split] = raw["train"].select([])
    result = DatasetDict({k: raw[k] for k in ("train", "validation", "test")})
    result.skipped_records = skipped  # the messages of the dropped records (empty unless skip_bad_records)
    return result


def load_recipe_splits(data_args, template=None) -> DatasetDict:
    """The splits a recipe's `DataArguments` ask for; recipes/train.py, `sft-hf inspect` and `sft-hf report` share it."""
    raw = load_instruction_dataset(
        data_args.dataset_name, data_args.dataset_config, data_args.column_mapping,
        data_args.train_split_ratio, data_args.test_split_ratio, data_args.shuffle_seed,
        skip_bad_records=data_args.skip_bad_records, template=template,
    )
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_eval_samples}
    for split, limit in limits.items():
        if limit:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw


@functools.cache  # asked once per record by record_problem; templates are frozen (hashable)
def _template_fields(template: Template | None) -> frozenset[str]:
    """Record fields a template reads besides instruction/input/output (e.g. `{context}` in a YAML template)."""
    return frozenset(template.fields() - {"instruction", "input", "output"}) if template is not None else frozenset()


def _load_file(builder: str, path: str, **kwargs) -> DatasetDict:
    try:
        return datasets.load_dataset(builder, data_files={"train": path}, **kwargs)
    except Exception as e:  # datasets wraps parser errors deep inside; say which file
        cause = e.__cause__ or e
        raise DataError(f"{path}: could not be read as {builder}: {type(cause).__name__}: {cause}") from e


def _read_text(path: str, data: bytes | None = None) -> str:
    data = Path(path).read_bytes() if data is None else data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {_bad_bytes(data, e)}") from None


def _bad_bytes(data: bytes, e: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return f"line {line}, byte {column}: not valid UTF-8 ({data[e.start:e.start + 4]!r}...); re-save the file as UTF-8"


def parse_json_records(path: str, problems: list[str]) -> list[tuple[object, int | None]]:
    """(record, line) pairs from a JSON array or JSON lines; line is None for records of an array. Lines that do
    not parse are added to `problems`."""
    data = Path(path).read_bytes()
    if not path.endswith(".jsonl"):
        try:
            records = json.loads(_read_text(path, data))
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first value: JSON lines in a .json file
                raise DataError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON: {e.msg}") from None
        else:
            if not isinstance(records, list):
                raise DataError(f"{path}: expected a JSON array of records (or one record per line), "
                                f"got a {type(records).__name__}")
            return [(r, None) for r in records]
    parsed = []
    for line_number, line in enumerate(data.splitlines(), start=1):
        try:
            text = line.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problem = f"{path}: {_bad_bytes(line, e).replace('line 1, ', f'line {line_number}, ')}"
        else:
            if not text.strip():
                continue
            try:
                parsed.append((json.loads(text), line_number))
                continue
            except json.JSONDecodeError as e:
                problem = f"{path}: line {line_number}, column {e.colno}: malformed JSON: {e.msg}"
        problems.append(problem)
    return parsed


def _load_json_file(path, column_mapping, template, skip_bad_records, skipped) -> DatasetDict:
    problems: list[str] = []  # every bad line and record, so one run reports them all
    parsed = parse_json_records(path, problems)
    objects = [r for r, _ in parsed if isinstance(r, dict)]
    if not objects:
        if problems and not skip_bad_records:
            raise bad_records_error(path, problems)
        detail = f" ({len(problems)} bad records skipped; the first: {problems[0]})" if problems else ""
        raise DataError(f"{path}: no usable record left{detail}")
    columns = list(dict.fromkeys(k for r in objects for k in r))  # union of keys, in first-seen order
    mapping = _resolve_mapping(columns, column_mapping, path)
    renamed = [_rename(r, mapping) if isinstance(r, dict) else r for r, _ in parsed]
    schema = _check_schema([mapping.get(c, c) for c in columns], path, template)
    kept = []
    for i, ((record, line), mapped) in enumerate(zip(parsed, renamed)):
        problem = record_problem(mapped, schema, template)
        if problem is None:
            kept.append(record)
            continue
        problems.append(located_problem(path, i, line, problem, mapping))
    if problems and not skip_bad_records:
        raise bad_records_error(path, problems)
    skipped.extend(problems)
    if not problems:  # the common case: let `datasets` read (and cache) the file itself
        return _load_file("json", path)
    if not kept:
        return DatasetDict(train=Dataset.from_dict({c: [] for c in columns or ["instruction", "output"]}))
    return DatasetDict(train=Dataset.from_dict({c: [r.get(c) for r in kept] for c in columns}))


MAX_REPORTED_RECORDS = 20  # bad records listed in one error; the rest are counted


def bad_records_error(source: str, problems: list[str]) -> DataError:
    """One error for all of a file's bad records: each on its own line (up to MAX_REPORTED_RECORDS), so one run
    shows everything to fix."""
    if len(problems) == 1:
        return DataError(problems[0])
    shown = [p.removeprefix(f"{source}: ") for p in problems[:MAX_REPORTED_RECORDS]]
    more = len(problems) - len(shown)
    return DataError(f"{source}: {len(problems)} bad records (fix them, or pass --skip_bad_records true to drop them):"
                     + "".join(f"\n  {p}" for p in shown) + (f"\n  and {more} more" if more else ""))


def located_problem(source: str, index: int, line: int | None, problem: str, mapping: dict[str, str] | None) -> str:
    """"<file>: record 3 (line 5), field ...": a renamed field named as the file names it, e.g. "field 'answer'
    (column_mapping → 'output')"."""
    for original, renamed in (mapping or {}).items():
        if problem.startswith(prefix := f"field {renamed!r}"):
            problem = f"field {original!r} (column_mapping → {renamed!r})" + problem[len(prefix):]
            break
    return f"{source}: record {index}" + (f" (line {line})" if line else "") + f", {problem}"


def csv_record_lines(reader) -> list[int]:
    """The line each record of a csv.reader (past its header) starts on: a quoted cell may span several lines."""
    starts, end = [], reader.line_num
    for row in reader:
        if row:  # a blank line is no record (datasets skips it too)
            starts.append(end + 1)
        end = reader.line_num
    return starts


def _resolve_mapping(columns: list[str], column_mapping: dict[str, str] | None, source: str) -> dict[str, str]:
    mapping = dict(column_mapping or {})
    if "prompt" in columns and "completion" in columns:
        mapping.setdefault("prompt", "instruction")
        mapping.setdefault("completion", "output")
    missing = [c for c in mapping if c not in columns]
    if missing:
        raise DataError(f"{source}: column_mapping names {missing}, which the data does not have ({columns})")
    return {k: v for k, v in mapping.items() if k != v}


def _rename(record: dict, mapping: dict[str, str]) -> dict:
    return {mapping.get(k, k): v for k, v in record.items()}


def _check_schema(columns: list[str], source: str, template: Template | None) -> str:
    """'messages', 'conversations' (ShareGPT) or 'alpaca'; a field no record has at all is a mapping problem,
    reported once."""
    schema = next((c for c in ("messages", "conversations") if c in columns), "alpaca")
    required = [schema] if schema != "alpaca" else ["instruction", "output"]
    for field in required:
        if field not in columns:
            raise DataError(
                f"{source}: records need field {field!r} (found {columns}); map yours with column_mapping"
            )
    for field in sorted(_template_fields(template)):
        if schema != "alpaca":
            raise DataError(f"{source}: the template uses field {field!r}, which chat ({schema}) records cannot have")
        if field not in columns:
            raise DataError(f"{source}: the template uses field {{{field}}}, which the data does not have ({columns})")
    return schema


CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's `from` → OpenAI role; `function_call` turns hold a JSON call and become an assistant tool call.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "observation": "tool", "function_call": "assistant"}


def sharegpt_to_messages(conversations: list[dict]) -> list[dict]:
    """ShareGPT turns ({from, value}) as OpenAI messages ({role, content}); a checked record never raises here."""
    messages = []
    for turn in conversations:
        if turn["from"] == "function_call":
            call = json.loads(turn["value"])
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": [{"type": "function", "function": call}]})
        else:
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _conversation_problem(turns, field: str) -> str | None:
    """What is wrong with a `messages` or ShareGPT `conversations` list, as "field 'x', message j: ...", or None."""
    sharegpt = field == "conversations"
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = SHAREGPT_ROLES if sharegpt else CHAT_ROLES
    if not isinstance(turns, list) or not turns:
        return f"field {field!r}: expected a non-empty list of {{{role_key}, {content_key}}} messages, got {turns!r:.60}"
    for j, m in enumerate(turns):
        where = f"field {field!r}, message {j}"
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str):
            return f"{where}: expected {{{role_key!r}: text, {content_key!r}: text}}, got {m!r:.60}"
        role, content, calls = m[role_key], m.get(content_key), m.get("tool_calls")
        if role not in roles:
            return f"{where}, {role_key!r}: unknown role {role!r}; expected one of {', '.join(roles)}"
        if calls is not None and (role != "assistant" or not isinstance(calls, list)
                                  or not all(isinstance(c, dict) for c in calls)):
            return f"{where}, 'tool_calls': expected a list of calls on an assistant message, got {calls!r:.60}"
        if not isinstance(content, str) and not (content is None and calls):
            return f"{where}: expected {{{role_key!r}: text, {content_key!r}: text}}, got {m!r:.60}"
        if not (content or "").strip() and not calls:
            return f"{where}, {content_key!r}: empty {role} turn"
        if role == "function_call":
            try:
                call = json.loads(content)
            except json.JSONDecodeError as e:
                return f"{where}, {content_key!r}: a function_call must be JSON ({e.msg}), got {content!r:.60}"
            if not isinstance(call, dict) or "name" not in call:
                return f"{where}, {content_key!r}: a function_call must be a JSON object with a 'name'"
    last = turns[-1][role_key]
    if (SHAREGPT_ROLES.get(last) if sharegpt else last) != "assistant" or last == "function_call":
        return f"field {field!r}: the last message must be an assistant reply (the response to train on), " \
               f"not a {last!r} turn"
    return None


def record_problem(record, schema: str, template: Template | None = None) -> str | None:
    """What is wrong with one (renamed) record, as "field 'x': ...", or None when `template` can train on it."""
    if not isinstance(record, dict):
        return f"expected an object with fields, got {type(record).__name__} {str(record)[:60]!r}"
    if schema in ("messages", "conversations"):
        problem = _conversation_problem(record.get(schema), schema)
        if problem is None and template is not None and not template.multi_turn:  # Alpaca-like: one exchange
            turns = record[schema] if schema == "messages" else sharegpt_to_messages(record[schema])
            try:
                messages_to_alpaca(turns, template.name)
            except TemplateError as e:
                problem = f"field {schema!r}: {e}"
        return problem
    for field in ["instruction", "input", "output", *sorted(_template_fields(template))]:
        value = record.get(field)
        if value is None:
            if field != "input":  # an absent or null input just means "no input"
                return f"field {field!r}: missing"
            continue
        if not isinstance(value, str):
            return f"field {field!r}: expected text, got {type(value).__name__} {value!r:.60}"
        if field == "output" and not value.strip():
            return "field 'output': empty response, nothing to train on"
    return None


def split_dataset(ds: Dataset, train_ratio: float, test_ratio: float, shuffle_seed: int | None = None) -> DatasetDict:
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    n = len(ds)
    n_train, n_test = int(n * train_ratio), int(n * test_ratio)
    return DatasetDict(
        # list(range(...)): datasets rejects an empty contiguous range that starts at len(ds)
        train=ds.select(list(range(n_train))),
        test=ds.select(list(range(n_train, n_train + n_test))),
        validation=ds.select(list(range(n_train + n_test, n))),
    )


def normalize_columns(
    ds: Dataset,
    column_mapping: dict[str, str] | None,
    source: str,
    skip_bad_records: bool = False,
    template: Template | None = None,
    skipped: list[str] | None = None,
    lines: list[int] | None = None,
) -> Dataset:
    """Rename columns onto instruction/input/output (or messages) and check every record has what it needs."""
    mapping = _resolve_mapping(ds.column_names, column_mapping, source)
    ds = ds.rename_columns(mapping)
    schema = _check_schema(ds.column_names, source, template)
    if schema == "alpaca" and "input" not in ds.column_names:
        ds = ds.add_column("input", [""] * len(ds))
    ds = check_records(ds, source, schema, skip_bad_records, template, skipped, mapping, lines)
    if schema == "conversations":  # ShareGPT → OpenAI messages: one shape for the templates
        ds = ds.map(lambda r: {"messages": sharegpt_to_messages(r["conversations"])},
                    remove_columns=["conversations"], desc="ShareGPT conversations → messages")
    return ds


def check_records(ds, source, schema="alpaca", skip_bad_records=False, template=None, skipped=None, mapping=None,
                  lines=None):
    """Fail early, naming file, record (and its line, when `lines` knows it) and field as the file names it (before
    `mapping`), instead of deep inside a map worker; or drop bad records."""
    bad, problems = set(), []
    for start, batch in zip(range(0, len(ds), 1000), ds.iter(batch_size=1000)):
        for i, values in enumerate(zip(*batch.values()), start=start):
            problem = record_problem(dict(zip(batch, values)), schema, template)
            if problem is not None:
                bad.add(i)
                line = lines[i] if lines and i < len(lines) else None
                problems.append(located_problem(source, i, line, problem, mapping))
    if problems and not skip_bad_records:
        raise bad_records_error(source, problems)
    if skipped is not None:
        skipped.extend(problems)
    return ds.select([i for i in range(len(ds)) if i not in bad]) if bad else ds


def default_num_proc() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))
