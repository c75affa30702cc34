"""Load instruction data from local files or the Hub and split it, all through `datasets.load_dataset`.

Every record ends up in one of two shapes the templates understand:
`instruction` / `input` / `output` (Alpaca; `prompt`/`completion` are renamed onto it) or `messages` (chat: OpenAI
`role`/`content` messages, with `tool_calls` and `tool` turns; ShareGPT `conversations` of `from`/`value` are
converted onto it).

Local files are read by `datasets`' own builders (Arrow, in chunks, memory-mapped from its cache): no Python object
per record, so memory stays flat at any size, and a second run reads the cache. Every record is checked before anything
is tokenized, in Arrow for Alpaca records and in a batched map for conversations; only when Arrow cannot read a file,
or a check finds a bad value, is the file scanned line by line to name what is wrong. Bad records raise one
`DataError` that names, for each (up to 20), the file, the record (and line, for JSON lines and CSV) and the field;
with `skip_bad_records=True` they are dropped and counted.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import gc
import hashlib
import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm

from sft_hf.errors import DataError
from sft_hf.speed.allocator import release_free_memory
from sft_hf.templates import Template, TemplateError, get_template, messages_to_alpaca

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN_PREFIX = "builtin:"
CHECK_BATCH = 1 << 16  # records per Arrow batch in the checks: bounded memory at any file size
SCAN_PROGRESS_BYTES = 64 << 20  # a line-by-line scan of a larger file shows a progress bar


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_proc() -> int:
    """Processes for the map steps (checks of conversations, ShareGPT conversion, templating + tokenizing) when
    `dataset_num_proc` is not set: every usable core."""
    return usable_cores()


def map_num_proc(num_proc: int | None, n_records: int) -> int | None:
    """`num_proc` for a `Dataset.map` over `n_records`: worker processes only when each gets at least 1,000 records
    (starting one costs more than it saves below that)."""
    num_proc = default_num_proc() if num_proc is None else num_proc
    return num_proc if num_proc > 1 and n_records >= 1000 * num_proc else None


@contextlib.contextmanager
def fork_friendly(num_proc: int | None):
    """Around a `Dataset.map` with worker processes: the memory malloc keeps for reuse goes back to the system, and
    Python's garbage collector is kept off the objects that exist now, so forked workers do not copy the parent's
    pages by walking them (docs/data.md#large-files)."""
    if not num_proc or num_proc <= 1:
        yield
        return
    release_free_memory()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
    num_proc: int | None = None,
) -> DatasetDict:
    """Returns a DatasetDict with `train`, `validation` and `test` (the latter two possibly empty).

    `dataset_name` is a local file (.json/.jsonl/.csv/.parquet), a local folder, a Hub dataset name, or
    `builtin:<name>` for a dataset this project generates. When the source has only a train split, it is split in
    file order as chapter 7 does: the first `train_split_ratio` for training, the next `test_split_ratio` for test,
    the rest for validation (1100 records → 935 / 110 / 55). `shuffle_seed` shuffles before splitting.

    Bad records (malformed JSON, undecodable bytes, missing or wrongly typed fields, empty outputs, fields the
    `template` uses but the record lacks) raise `DataError`; with `skip_bad_records=True` they are dropped instead,
    logged, and listed in the result's `skipped_records` attribute. `num_proc`: processes for the map steps
    (default: every usable core, for data of at least 1,000 records per process).
    """
    template = get_template(template) if template is not None else None
    skipped: list[str] = []
    raw = read_source(dataset_name, dataset_config, column_mapping, template, skip_bad_records, skipped, num_proc)
    result = split_source(raw, dataset_name, train_split_ratio, test_split_ratio, shuffle_seed)
    result.skipped_records = skipped  # the messages of the dropped records (empty unless skip_bad_records)
    return result


def read_source(dataset_name: str, dataset_config: str | None, column_mapping: dict[str, str] | None,
                template: Template | None, skip_bad_records: bool, skipped: list[str],
                num_proc: int | None = None) -> DatasetDict:
    """Every split of one source, its columns renamed onto Alpaca's or `messages`, every record checked (bad ones
    raise, or are dropped and their messages added to `skipped`)."""
    source = dataset_name
    record_lines: dict[str, RecordLines] = {}  # split → where its records start in the file, found on demand
    if dataset_name.startswith(BUILTIN_PREFIX):
        from sft_hf.builtin import chapter7_chat, toy

        name = dataset_name[len(BUILTIN_PREFIX) :]
        files = chapter7_chat.write_chapter7_chat() if name == "chapter7-chat" else toy.write_builtin_dataset(name)
        raw = datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})
    elif Path(dataset_name).is_file():
        builder = FILE_BUILDERS.get(Path(dataset_name).suffix.lower())
        if builder is None:
            raise DataError(f"{dataset_name}: unsupported file type; use one of {sorted(FILE_BUILDERS)}")
        if builder == "json":
            raw = _load_json_file(dataset_name, column_mapping, template, skip_bad_records, skipped)
        elif builder == "csv":
            raw = _load_csv_file(dataset_name)
        else:
            raw = _load_file(builder, dataset_name)
        if builder != "parquet":
            record_lines["train"] = RecordLines(dataset_name, builder)
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
                                     record_lines.get(split), num_proc)
            for split, ds in raw.items()
        }
    )
    if skipped:
        kept = sum(len(ds) for ds in raw.values())
        logger.warning(f"{source}: skipped {len(skipped)} bad records, kept {kept}; the first: {skipped[0]}")
    if sum(len(ds) for ds in raw.values()) == 0:
        detail = f" ({len(skipped)} bad records skipped; the first: {skipped[0]})" if skipped else ""
        raise DataError(f"{source}: no usable record left{detail}")
    return raw


def split_source(raw: DatasetDict, source: str, train_split_ratio: float, test_split_ratio: float,
                 shuffle_seed: int | None = None) -> DatasetDict:
    """`train`, `validation` and `test`: the source's own, or chapter 7's split of a source with only a train split."""
    if "train" not in raw:
        raise DataError(f"{source}: no 'train' split (found {sorted(raw)})")
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
    return DatasetDict({k: raw[k] for k in ("train", "validation", "test")})


def load_recipe_splits(data_args, template=None) -> DatasetDict:
    """The splits a recipe's `DataArguments` ask for; recipes/train.py, `sft-hf inspect` and `sft-hf report` share
    it. A `dataset_mixture` is loaded by sft_hf/mixture.py (each source split on its own, then mixed)."""
    if getattr(data_args, "dataset_mixture", None):  # samples are capped per source (held-out) or mixed (train)
        from sft_hf.mixture import load_mixture

        return load_mixture(data_args, template)
    raw = load_instruction_dataset(
        data_args.dataset_name, data_args.dataset_config, data_args.column_mapping,
        data_args.train_split_ratio, data_args.test_split_ratio, data_args.shuffle_seed,
        skip_bad_records=data_args.skip_bad_records, template=template,
        num_proc=getattr(data_args, "dataset_num_proc", None),
    )
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_eval_samples}
    for split, limit in limits.items():
        if limit:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw


@functools.cache  # asked once per record by record_problem; templates are frozen (hashable)
def template_fields(template: Template | None) -> frozenset[str]:
    """Record fields a template reads besides instruction/input/output (e.g. `{context}` in a YAML template)."""
    return frozenset(template.fields() - {"instruction", "input", "output"}) if template is not None else frozenset()


def _load_file(builder: str, path: str, **kwargs) -> DatasetDict:
    """`datasets.load_dataset(builder)` on one file: Arrow, read in chunks and cached."""
    try:
        return datasets.load_dataset(builder, data_files={"train": path}, **kwargs)
    except Exception as e:  # datasets wraps parser errors deep inside; say which file
        cause = e.__cause__ or e
        raise DataError(f"{path}: could not be read as {builder}: {type(cause).__name__}: {cause}") from e


def _quietly(path: str, function, *args, **kwargs):
    """Runs `function` with datasets' error log off (a file Arrow cannot read is scanned and named by us), and its
    progress bar too for a small file (read in a moment; an error then ends the output alone)."""
    level, bars = datasets.logging.get_verbosity(), datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if Path(path).stat().st_size < SCAN_PROGRESS_BYTES:
        datasets.disable_progress_bars()
    try:
        return function(*args, **kwargs)
    finally:
        datasets.logging.set_verbosity(level)
        if not bars:
            datasets.enable_progress_bars()


def _load_json_file(path, column_mapping, template, skip_bad_records, skipped) -> DatasetDict:
    """Arrow reads the file (a field of mixed types is an error, not a silent JSON column); when it cannot, the file
    is scanned line by line for every bad line and record. With `skip_bad_records`, the good records of such a file
    are written to a cleaned copy in the datasets cache as they are scanned, and Arrow reads that."""
    try:
        raw = _quietly(path, datasets.load_dataset, "json", data_files={"train": path}, on_mixed_types=None)
        if all(_valid_utf8(ds) for ds in raw.values()):  # Arrow's JSON reader keeps bytes that are not UTF-8
            return raw
    except Exception:  # noqa: BLE001 - malformed JSON, bad bytes, mixed types: the scan names them
        pass
    if not skip_bad_records:
        problems, _ = scan_json_file(path, column_mapping, template)
        if problems:
            raise bad_records_error(path, problems)
        return _load_file("json", path)  # Arrow's trouble was a field no check reads: kept as JSON, like datasets
    problems, columns, cleaned = _cleaned_copy(path, column_mapping, template)
    if not problems:
        return _load_file("json", path)
    skipped.extend(problems)
    if not cleaned.stat().st_size:
        return DatasetDict(train=Dataset.from_dict({c: [] for c in columns or ["instruction", "output"]}))
    return _load_file("json", str(cleaned))


def _valid_utf8(ds: Dataset) -> bool:
    try:
        for batch in ds.data.table.to_batches(max_chunksize=CHECK_BATCH):
            batch.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _iter_json_values(path: str, problems: list[str]):
    """(value, line) for each record of a JSON array (line None) or JSON lines file, streamed line by line for JSON
    lines; lines that do not parse are added to `problems`."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not path.endswith(".jsonl") and head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"[", b"{", b'"'):
        data = Path(path).read_bytes()  # a JSON document (a whole array) is parsed whole
        try:
            records = json.loads(_read_text(path, data))
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first value: JSON lines in a .json file
                raise DataError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON: {e.msg}") from None
        else:
            if not isinstance(records, list):
                raise DataError(f"{path}: expected a JSON array of records (or one record per line), "
                                f"got a {type(records).__name__}")
            yield from ((r, None) for r in records)
            return
    size = Path(path).stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"Scanning {Path(path).name}",
                                     disable=size < SCAN_PROGRESS_BYTES) as progress:
        for line_number, line in enumerate(f, start=1):
            progress.update(len(line))
            line = line.rstrip(b"\r\n")
            try:
                text = line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{path}: {_bad_bytes(line, e).replace('line 1, ', f'line {line_number}, ')}")
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(f"{path}: line {line_number}, column {e.colno}: malformed JSON: {e.msg}")
                continue
            yield value, line_number


def parse_json_records(path: str, problems: list[str]) -> list[tuple[object, int | None]]:
    """(record, line) pairs from a JSON array or JSON lines; line is None for records of an array. Lines that do
    not parse are added to `problems`. (For small files: response files, task files; training data is read by Arrow.)"""
    return list(_iter_json_values(path, problems))


def scan_json_file(path: str, column_mapping, template, clean_copy=None) -> tuple[list[str], list[str]]:
    """Every bad line and record of a JSON file as messages (parse errors first, then records in file order), and
    its columns. Two streamed passes: the columns (the union of the records' keys, which the mapping is resolved
    against), then each record's check; `clean_copy`, a binary file, receives the good records as JSON lines."""
    problems: list[str] = []
    columns = list(dict.fromkeys(k for r, _ in _iter_json_values(path, problems) if isinstance(r, dict) for k in r))
    if not columns:
        if problems:
            raise bad_records_error(path, problems)
        raise DataError(f"{path}: no usable record left")
    mapping = _resolve_mapping(columns, column_mapping, path)
    schema = _check_schema([mapping.get(c, c) for c in columns], path, template)
    for i, (record, line) in enumerate(_iter_json_values(path, [])):
        mapped = _rename(record, mapping) if isinstance(record, dict) else record
        problem = record_problem(mapped, schema, template)
        if problem is not None:
            problems.append(located_problem(path, i, line, problem, mapping))
        elif clean_copy is not None:
            clean_copy.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
    return problems, columns


def _cleaned_copy(path: str, column_mapping, template) -> tuple[list[str], list[str], Path]:
    """`scan_json_file`, writing the good records as JSON lines into the datasets cache under a name keyed by the
    file's path, size and modification time, the mapping and the template: a re-run's copy has the same name, so
    `datasets` reuses its Arrow cache."""
    stat = Path(path).stat()
    key = json.dumps([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, column_mapping,
                      template.to_dict() if template is not None else None], sort_keys=True, default=str)
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "sft_hf_cleaned"
    folder.mkdir(parents=True, exist_ok=True)
    cleaned = folder / f"{Path(path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
    partial = cleaned.with_suffix(f".{os.getpid()}.tmp")
    with open(partial, "wb") as f:
        problems, columns = scan_json_file(path, column_mapping, template, clean_copy=f)
    os.replace(partial, cleaned)  # never a half-written copy under the final name
    return problems, columns, cleaned


def _load_csv_file(path: str) -> DatasetDict:
    """Every cell as text (pandas would read the answer "3" as an int, "2.50" as 2.5); undecodable bytes are named
    by line and byte."""
    error = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError:
        header = None
    if header is not None:
        features = datasets.Features({column: datasets.Value("string") for column in header})
        try:
            return _quietly(path, datasets.load_dataset, "csv", data_files={"train": path}, features=features)
        except Exception as e:  # noqa: BLE001 - bad bytes are named below; any other error as it is
            error = e
    bad = first_undecodable_line(path)
    if bad is not None or error is None:
        raise DataError(f"{path}: {bad}")
    cause = error.__cause__ or error
    raise DataError(f"{path}: could not be read as csv: {type(cause).__name__}: {cause}") from error


def first_undecodable_line(path: str) -> str | None:
    """"line 3, byte 10: not valid UTF-8 ...", for the first line of `path` that is not UTF-8; streamed."""
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                return _bad_bytes(line.rstrip(b"\r\n"), e).replace("line 1, ", f"line {line_number}, ")
    return None


class RecordLines:
    """Where the records of a JSON lines or CSV file start: found by one streamed scan of the file, only for the
    records an error names (a JSON array's records have no line of their own)."""

    def __init__(self, path: str, builder: str):
        self.path, self.builder = path, builder

    def of(self, indices) -> dict[int, int]:
        wanted = sorted(set(indices))
        if not wanted:
            return {}
        if self.builder == "csv":
            with open(self.path, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f)
                next(reader, None)  # the header
                starts = csv_record_starts(reader)
                return _pick(starts, wanted)
        with open(self.path, "rb") as f:
            if f.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
                return {}
            f.seek(0)
            starts = (n for n, line in enumerate(f, start=1) if line.strip())  # blank lines are no record
            return _pick(starts, wanted)


def _pick(starts, wanted: list[int]) -> dict[int, int]:
    found, targets = {}, iter(wanted)
    target = next(targets)
    for index, line in enumerate(starts):
        if index == target:
            found[index] = line
            target = next(targets, None)
            if target is None:
                break
    return found


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


def csv_record_starts(reader):
    """The line each record of a csv.reader (past its header) starts on: a quoted cell may span several lines."""
    end = reader.line_num
    for row in reader:
        if row:  # a blank line is no record (datasets skips it too)
            yield end + 1
        end = reader.line_num


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
    for field in sorted(template_fields(template)):
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
    for field in ["instruction", "input", "output", *sorted(template_fields(template))]:
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
        train=_rows(ds, 0, n_train),
        test=_rows(ds, n_train, n_train + n_test),
        validation=_rows(ds, n_train + n_test, n),
    )


def _rows(ds: Dataset, start: int, stop: int) -> Dataset:
    """Records start..stop as a contiguous slice (no index list: a range of millions would be hashed element by
    element for the fingerprint); datasets rejects an empty range that starts at len(ds), hence select([])."""
    return ds.select(range(start, stop)) if stop > start else ds.select([])


def normalize_columns(
    ds: Dataset,
    column_mapping: dict[str, str] | None,
    source: str,
    skip_bad_records: bool = False,
    template: Template | None = None,
    skipped: list[str] | None = None,
    lines: RecordLines | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Rename columns onto instruction/input/output (or messages) and check every record has what it needs."""
    mapping = _resolve_mapping(ds.column_names, column_mapping, source)
    ds = ds.rename_columns(mapping)
    schema = _check_schema(ds.column_names, source, template)
    if schema == "alpaca" and "input" not in ds.column_names:
        ds = ds.add_column("input", pa.array([""] * len(ds), pa.string()) if len(ds) else [])
    ds = check_records(ds, source, schema, skip_bad_records, template, skipped, mapping, lines, num_proc)
    if schema == "conversations":  # ShareGPT → OpenAI messages: one shape for the templates
        processes = map_num_proc(num_proc, len(ds))
        with fork_friendly(processes):
            ds = ds.map(_sharegpt_batch, batched=True, remove_columns=["conversations"], num_proc=processes,
                        desc="ShareGPT conversations → messages")
    return ds


def _sharegpt_batch(batch: dict) -> dict:
    return {"messages": [sharegpt_to_messages(c) for c in batch["conversations"]]}


def check_records(ds, source, schema="alpaca", skip_bad_records=False, template=None, skipped=None, mapping=None,
                  lines: RecordLines | None = None, num_proc: int | None = None):
    """Fail early, naming file, record (and its line, when `lines` can find it) and field as the file names it
    (before `mapping`), instead of deep inside a map worker; or drop bad records.

    Alpaca records are checked in Arrow, batch by batch; conversations by `record_problem` in a batched map (their
    checks walk every message). Only the records found bad are read into Python, for their messages."""
    if schema == "alpaca":
        suspects = _alpaca_suspects(ds, template)
    else:
        processes = map_num_proc(num_proc, len(ds))
        with fork_friendly(processes):
            found = ds.map(_bad_conversations, batched=True, with_indices=True, remove_columns=ds.column_names,
                           fn_kwargs=dict(schema=schema, template=template), num_proc=processes,
                           desc=f"Checking {schema}")
        suspects = found["index"] if "index" in found.column_names else []  # (a map that keeps no row)
    bad, problems = [], []
    if suspects:
        found_lines = lines.of(suspects[:MAX_REPORTED_RECORDS] if not skip_bad_records else suspects) if lines else {}
        for start in range(0, len(suspects), 1000):
            chunk = suspects[start : start + 1000]
            for i, record in zip(chunk, ds.select(chunk)):
                problem = record_problem(record, schema, template)
                if problem is not None:
                    bad.append(i)
                    problems.append(located_problem(source, i, found_lines.get(i), problem, mapping))
    if problems and not skip_bad_records:
        raise bad_records_error(source, problems)
    if skipped is not None:
        skipped.extend(problems)
    return ds.select(np.setdiff1d(np.arange(len(ds)), bad)) if bad else ds


def _alpaca_suspects(ds: Dataset, template: Template | None) -> list[int]:
    """Indices of the Alpaca records whose fields are missing, null, not text, or (output) blank: vectorised in
    Arrow, over batches of CHECK_BATCH records. `record_problem` then has the last word on each."""
    required = ["instruction", "output", *sorted(template_fields(template))]
    columns = [c for c in [*required, "input"] if c in ds.column_names]
    suspects = []
    table = ds.with_format("arrow", columns=columns)
    for start in range(0, len(ds), CHECK_BATCH):
        batch = table[start : start + CHECK_BATCH]
        bad = pa.array(np.zeros(batch.num_rows, dtype=bool))
        for name in columns:
            column = batch.column(name)
            is_text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            if name == "input":  # null or absent means "no input"; anything else must be text
                if not is_text and not pa.types.is_null(column.type):
                    bad = pc.or_(bad, pc.is_valid(column))
                continue
            if not is_text:
                bad = pa.array(np.ones(batch.num_rows, dtype=bool))
                break
            bad = pc.or_(bad, pc.is_null(column))
            if name == "output":
                bad = pc.or_kleene(bad, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0))
        bad = pc.fill_null(bad, True)
        suspects.extend((np.flatnonzero(bad.to_numpy(zero_copy_only=False)) + start).tolist())
    return suspects


def _bad_conversations(batch: dict, indices: list[int], schema: str, template: Template | None) -> dict:
    records = (dict(zip(batch, values)) for values in zip(*batch.values()))
    return {"index": [i for i, r in zip(indices, records) if record_problem(r, schema, template) is not None]}
