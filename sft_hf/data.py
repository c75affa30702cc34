"""Load instruction data from local files or the Hub and split it, all through `datasets.load_dataset`.

Every record ends up in one of two shapes the templates understand:
`instruction` / `input` / `output` (Alpaca; `prompt`/`completion` are renamed onto it) or `messages` (chat).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN_PREFIX = "builtin:"


class DataError(ValueError):
    """Bad input data; the message names the file, the record and the field."""


def load_instruction_dataset(
    dataset_name: str,
    dataset_config: str | None = None,
    column_mapping: dict[str, str] | None = None,
    train_split_ratio: float = 0.85,
    test_split_ratio: float = 0.10,
    shuffle_seed: int | None = None,
) -> DatasetDict:
    """Returns a DatasetDict with `train`, `validation` and `test` (the latter two possibly empty).

    `dataset_name` is a local file (.json/.jsonl/.csv/.parquet), a local folder, a Hub dataset name, or
    `builtin:<name>` for a dataset this project generates. When the source has only a train split, it is split in
    file order as chapter 7 does: the first `train_split_ratio` for training, the next `test_split_ratio` for test,
    the rest for validation (1100 records → 935 / 110 / 55). `shuffle_seed` shuffles before splitting.
    """
    source = dataset_name
    if dataset_name.startswith(BUILTIN_PREFIX):
        from sft_hf import toy

        files = toy.write_builtin_dataset(dataset_name[len(BUILTIN_PREFIX) :])
        raw = datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})
    elif Path(dataset_name).is_file():
        builder = FILE_BUILDERS.get(Path(dataset_name).suffix.lower())
        if builder is None:
            raise DataError(f"{dataset_name}: unsupported file type; use one of {sorted(FILE_BUILDERS)}")
        raw = _load_file(builder, dataset_name)
    else:  # a local folder or a Hub dataset name: `load_dataset` resolves both
        raw = datasets.load_dataset(dataset_name, dataset_config)

    raw = DatasetDict({split: normalize_columns(ds, column_mapping, source) for split, ds in raw.items()})
    if "train" not in raw:
        raise DataError(f"{source}: no 'train' split (found {sorted(raw)})")
    if set(raw) == {"train"}:
        raw = split_dataset(raw["train"], train_split_ratio, test_split_ratio, shuffle_seed)
    for split in ("validation", "test"):
        if split not in raw:
            raw[split] = raw["train"].select([])
    return DatasetDict({k: raw[k] for k in ("train", "validation", "test")})


def _load_file(builder: str, path: str) -> DatasetDict:
    try:
        return datasets.load_dataset(builder, data_files={"train": path})
    except Exception as e:  # datasets wraps parser errors deep inside; say which file
        cause = e.__cause__ or e
        raise DataError(f"{path}: could not be read as {builder}: {type(cause).__name__}: {cause}") from e


def split_dataset(ds: Dataset, train_ratio: float, test_ratio: float, shuffle_seed: int | None = None) -> DatasetDict:
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    n = len(ds)
    n_train, n_test = int(n * train_ratio), int(n * test_ratio)
    return DatasetDict(
        train=ds.select(range(n_train)),
        test=ds.select(range(n_train, n_train + n_test)),
        validation=ds.select(range(n_train + n_test, n)),
    )


def normalize_columns(ds: Dataset, column_mapping: dict[str, str] | None, source: str) -> Dataset:
    """Rename columns onto instruction/input/output (or messages) and check every record has what it needs."""
    mapping = dict(column_mapping or {})
    if "prompt" in ds.column_names and "completion" in ds.column_names:
        mapping.setdefault("prompt", "instruction")
        mapping.setdefault("completion", "output")
    missing = [c for c in mapping if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: column_mapping names {missing}, which the data does not have ({ds.column_names})")
    ds = ds.rename_columns({k: v for k, v in mapping.items() if k != v})
    if "messages" in ds.column_names:
        required = ["messages"]
    else:
        required = ["instruction", "output"]
        if "input" not in ds.column_names:
            ds = ds.add_column("input", [""] * len(ds))
    for field in required:
        if field not in ds.column_names:
            raise DataError(
                f"{source}: records need field {field!r} (found {ds.column_names}); map yours with column_mapping"
            )
    check_records(ds, required + (["input"] if "input" in ds.column_names else []), source)
    return ds


def check_records(ds: Dataset, fields: list[str], source: str) -> None:
    """Fail early, naming file, record and field, instead of deep inside a map worker."""
    line_hint = " (line {})" if str(source).endswith(".jsonl") else ""
    for field in fields:
        for i, value in enumerate(ds[field]):
            where = f"{source}: record {i}" + line_hint.format(i + 1)
            if field == "messages":
                if not value or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
                    raise DataError(f"{where}, field 'messages': needs a list of {{role, content}} messages")
                continue
            if field == "input" and value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{where}, field {field!r}: expected text, got {type(value).__name__} {value!r}")
            if field == "output" and not value.strip():
                raise DataError(f"{where}, field 'output': empty response, nothing to train on")


def default_num_proc() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))
