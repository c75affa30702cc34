"""Loading at scale (sft_hf/data.py): files read by Arrow with no Python pass over their records, checks in Arrow that
flag exactly what `record_problem` flags, the line-numbered scan only when something is wrong, contiguous splits,
and the map steps on every usable core. (The single-source errors are in tests/test_bad_input.py.)"""
import json
import os

import datasets
import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from sft_hf import data as data_module
from sft_hf.data import (DataError, check_records, default_num_proc, load_instruction_dataset, map_num_proc,
                         record_problem, split_dataset)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def records(n):
    return [{"instruction": f"Task {i}", "input": "" if i % 2 else f"x{i}", "output": f"Answer {i}"} for i in range(n)]


def test_good_files_are_read_by_arrow_without_a_python_pass_over_their_records(tmp_path, monkeypatch):
    good = records(3000)
    paths = {"jsonl": write_jsonl(tmp_path / "good.jsonl", good), "json": str(tmp_path / "good.json"),
             "csv": str(tmp_path / "good.csv"), "parquet": str(tmp_path / "good.parquet")}
    (tmp_path / "good.json").write_text(json.dumps(good))
    pd.DataFrame(good).to_csv(paths["csv"], index=False)
    pd.DataFrame(good).to_parquet(paths["parquet"])

    def no_scan(*args, **kwargs):
        raise AssertionError("a good file was scanned in Python")

    monkeypatch.setattr(data_module, "_iter_json_values", no_scan)
    monkeypatch.setattr(data_module.RecordLines, "of", no_scan)
    monkeypatch.setattr(data_module, "record_problem", no_scan)  # no record reaches the Python check
    for kind, path in paths.items():
        splits = load_instruction_dataset(path, num_proc=1)
        assert {k: len(v) for k, v in splits.items()} == {"train": 2550, "test": 300, "validation": 150}, kind
        empty = None if kind == "csv" else ""  # an empty CSV cell is a missing value, as before
        assert splits["train"][1] == {"instruction": "Task 1", "input": empty, "output": "Answer 1"}, kind
    monkeypatch.undo()
    bad = good[:5] + [{"instruction": "x", "output": "  "}] + good[5:]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError, match=rf"^{path}: record 5 \(line 6\), field 'output': empty response"):
        load_instruction_dataset(path)


CASES = {
    "instruction": ["Do it.", None, "Do it.", "Do it.", "Do it.", "Do it.", "Do it.", "", "Do it."],
    "input": ["", "x", None, "y", "", "", "", "", "z"],
    "output": ["Done.", "Done.", "Done.", None, "", " \n\t", "\u00a0\u2003", "ok", "\u200bzero-width"],
}


def test_arrow_checks_flag_exactly_what_record_problem_flags():
    typed = Dataset.from_dict(CASES)
    expected = [i for i, r in enumerate(typed) if record_problem(r, "alpaca") is not None]
    assert expected == [1, 3, 4, 5, 6]
    skipped = []
    kept = check_records(typed, "cases", skip_bad_records=True, skipped=skipped)
    assert [int(m.split("record ")[1].split(",")[0]) for m in skipped] == expected
    assert len(kept) == len(typed) - len(expected)
    # a column that is not text at all: every record named by record_problem's own message
    numbers = Dataset.from_dict({"instruction": ["a", "b"], "input": ["", ""], "output": [1, 2]})
    with pytest.raises(DataError, match=r"2 bad records.*\n  record 0, field 'output': expected text, got int 1"):
        check_records(numbers, "numbers")
    nested = Dataset.from_dict({"instruction": ["a"], "input": [["not", "text"]], "output": ["b"]})
    with pytest.raises(DataError, match=r"record 0, field 'input': expected text, got list"):
        check_records(nested, "nested")


def test_conversations_are_checked_in_a_batched_map_on_several_processes(tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(2400)]
    chats[2222]["messages"][1]["role"] = "robot"
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    with pytest.raises(DataError, match=r"record 2222 \(line 2223\), field 'messages', message 1, 'role': unknown"):
        load_instruction_dataset(path, num_proc=2)


def test_skip_bad_records_reads_a_cleaned_copy_written_once(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    lines = [json.dumps(r) for r in records(10)]
    lines[4] = '{"instruction": "broken'
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    first = load_instruction_dataset(str(tmp_path / "data.jsonl"), skip_bad_records=True, train_split_ratio=1.0,
                                     test_split_ratio=0.0)
    copies = list((tmp_path / "cache" / "sft_hf_cleaned").glob("data-*.jsonl"))
    assert len(copies) == 1 and len(copies[0].read_text().splitlines()) == 9
    assert first.skipped_records == [f"{tmp_path / 'data.jsonl'}: line 5, column 17: malformed JSON: "
                                     "Unterminated string starting at"]
    second = load_instruction_dataset(str(tmp_path / "data.jsonl"), skip_bad_records=True, train_split_ratio=1.0,
                                      test_split_ratio=0.0)
    assert second["train"].to_list() == first["train"].to_list() == [r for i, r in enumerate(records(10)) if i != 4]
    assert list((tmp_path / "cache" / "sft_hf_cleaned").glob("data-*")) == copies  # the same name: the same cache


def test_a_split_is_a_contiguous_slice_not_a_list_of_indices():
    ds = Dataset.from_dict({"instruction": ["i"] * 1_000_000, "output": ["o"] * 1_000_000})
    splits = split_dataset(ds, 0.85, 0.10)
    assert {k: len(v) for k, v in splits.items()} == {"train": 850_000, "test": 100_000, "validation": 50_000}
    assert all(v._indices is None for v in splits.values())  # no index mapping to hash or to read through
    shuffled = split_dataset(ds.add_column("n", np.arange(1_000_000)), 0.5, 0.25, shuffle_seed=1)
    assert sorted(shuffled["train"]["n"][:5]) != [0, 1, 2, 3, 4]


def test_the_map_steps_use_every_usable_core_by_default():
    cores = len(os.sched_getaffinity(0))
    assert default_num_proc() == cores
    assert map_num_proc(None, 1000 * cores) == (cores if cores > 1 else None)
    assert map_num_proc(None, 1000 * cores - 1) is None  # a process per 1,000 records at least
    assert map_num_proc(1, 10**7) is None and map_num_proc(4, 4000) == 4
    from sft_hf.run.config import DataArguments

    assert DataArguments().dataset_num_proc is None  # None: every usable core
