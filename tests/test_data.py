"""Loading at scale (sft_hf/data.py): files read by Arrow with no Python pass over their records, checks in Arrow that
flag exactly what `record_problem` flags, the line-numbered scan only when something is wrong, contiguous splits,
and the map steps on every usable core. And the single-source errors: each bad record named by file, record (line) and field, before any training; or skipped
and counted."""
import json
import logging
import os

import datasets
import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from sft_hf import data as data_module
from sft_hf.data import (
    DataError,
    check_records,
    default_num_proc,
    load_instruction_dataset,
    map_num_proc,
    record_problem,
    split_dataset,
)
from sft_hf.templates import TemplateError
from sft_hf.tokenization import tokenize_dataset

from tiny_setup import GOOD, ROOT, write_jsonl


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


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"instruction": "a", "output": }', r"line 3, column 32: malformed JSON: Expecting value"),
        ({"instruction": "a"}, r"record 2 \(line 3\), field 'output': missing"),
        ({"instruction": "a", "output": None}, r"record 2 \(line 3\), field 'output': missing"),
        ({"instruction": "a", "output": 42}, r"record 2 \(line 3\), field 'output': expected text, got int 42"),
        ({"instruction": ["a"], "output": "b"}, r"record 2 \(line 3\), field 'instruction': expected text, got list"),
        ({"instruction": "a", "input": 7, "output": "b"},
         r"record 2 \(line 3\), field 'input': expected text, got int"),
        ({"instruction": "a", "output": "  \n"}, r"record 2 \(line 3\), field 'output': empty response"),
        ('["not", "an", "object"]', r"record 2 \(line 3\), expected an object with fields, got list"),
        (b'{"instruction": "caf\xe9", "output": "b"}', r"line 3, byte 21: not valid UTF-8"),
    ],
)
def test_bad_jsonl_record_names_file_line_and_field(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(DataError, match=rf"^{path}: {message}"):
        load_instruction_dataset(path)


def test_every_bad_record_of_a_file_in_one_error(tmp_path):
    """One run lists every bad line and record (parse errors first), so a file is fixed in one go."""
    lines = [GOOD, '{"broken": ', {"instruction": "a", "output": 3}, GOOD, {"instruction": "a"}, b"\xff"]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError) as error:
        load_instruction_dataset(path)
    assert str(error.value).splitlines() == [
        f"{path}: 4 bad records (fix them, or pass --skip_bad_records true to drop them):",
        "  line 2, column 12: malformed JSON: Expecting value",
        "  line 6, byte 1: not valid UTF-8 (b'\\xff'...); re-save the file as UTF-8",
        "  record 1 (line 3), field 'output': expected text, got int 3",
        "  record 3 (line 5), field 'output': missing",
    ]
    # past 20, the rest are counted; a CSV (read by `datasets`) is checked the same way
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("instruction,input,output\n" + "".join(f"Say {i},,\n" for i in range(25)) + "Add one.,2,3\n")
    with pytest.raises(DataError) as error:
        load_instruction_dataset(str(csv_path))
    reported = str(error.value).splitlines()
    assert reported[0] == f"{csv_path}: 25 bad records (fix them, or pass --skip_bad_records true to drop them):"
    assert reported[1:21] == [f"  record {i} (line {i + 2}), field 'output': missing" for i in range(20)]
    assert reported[21:] == ["  and 5 more"]


def test_blank_lines_count_in_line_numbers_not_in_record_numbers(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", "   ", {"instruction": "a", "output": ""}])
    with pytest.raises(DataError, match=r"record 1 \(line 4\), field 'output': empty response"):
        load_instruction_dataset(path)


def test_malformed_json_array_names_line_and_column(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}: line 3, column 23: malformed JSON: Expecting ',' delimiter"):
        load_instruction_dataset(str(path))


def test_json_array_record_errors_name_the_record(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD, GOOD, {"instruction": "x", "output": 1.5}]))
    with pytest.raises(DataError, match=rf"^{path}: record 3, field 'output': expected text, got float 1.5"):
        load_instruction_dataset(str(path))


def test_json_that_is_not_a_list_of_records(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('"just a string"')
    with pytest.raises(DataError, match="expected a JSON array of records"):
        load_instruction_dataset(str(path))


def test_undecodable_csv_names_the_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"instruction,input,output\nAdd one.,2,3\nSay hi,,h\xffi\n")
    with pytest.raises(DataError, match=rf"^{path}: line 3, byte 10: not valid UTF-8"):
        load_instruction_dataset(str(path))


def test_csv_empty_output_cell_names_record_and_field(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,input,output\nAdd one.,2,3\nSay hi,,\n")
    with pytest.raises(DataError, match=rf"^{path}: record 1 \(line 3\), field 'output': missing"):
        load_instruction_dataset(str(path))
    # a quoted cell over several lines and a blank line: the record still named by the line it starts on
    path.write_text('instruction,input,output\n"Write\ntwo lines.",,"a\nb"\n\nSay hi,,\n')
    with pytest.raises(DataError, match=rf"^{path}: record 1 \(line 6\), field 'output': missing"):
        load_instruction_dataset(str(path))


def test_bad_records_name_the_field_as_the_file_does_before_column_mapping(tmp_path):
    csv_path = tmp_path / "qa.csv"
    csv_path.write_text("question,answer\nAdd one.,3\nSay hi,\n")
    with pytest.raises(DataError, match=rf"^{csv_path}: record 1 \(line 3\), field 'answer' \(column_mapping → "
                                        r"'output'\): missing"):
        load_instruction_dataset(str(csv_path), column_mapping={"question": "instruction", "answer": "output"})
    jsonl = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "q", "answer": 4}])
    with pytest.raises(DataError, match=r"record 1 \(line 2\), field 'answer' \(column_mapping → 'output'\): "
                                        r"expected text, got int 4"):
        load_instruction_dataset(jsonl, column_mapping={"question": "instruction", "answer": "output"})


def test_field_no_record_has_suggests_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match=r"records need field 'instruction' .*map yours with column_mapping"):
        load_instruction_dataset(path)
    mapped = load_instruction_dataset(path, column_mapping={"question": "instruction", "answer": "output"},
                                      train_split_ratio=1.0, test_split_ratio=0.0)
    assert mapped["train"].to_list() == [{"instruction": "q", "output": "a", "input": ""}] * 3


def test_bad_chat_messages(tmp_path):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    no_reply = {"messages": [{"role": "user", "content": "hi"}]}
    bad_message = {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [ok, no_reply])
    with pytest.raises(DataError, match=r"record 1 \(line 2\), field 'messages': the last message must be"):
        load_instruction_dataset(path)
    path = write_jsonl(tmp_path / "chat2.jsonl", [ok, ok, bad_message])
    with pytest.raises(DataError, match=r"record 2 \(line 3\), field 'messages', message 0: expected"):
        load_instruction_dataset(path)


def test_skip_bad_records_counts_and_keeps_the_good_ones(tmp_path, caplog):
    good = [{"instruction": f"Echo {i}.", "input": "", "output": str(i)} for i in range(8)]
    lines = good[:3] + ['{"broken": ', {"instruction": "a", "output": ""}] + good[3:6] + [
        {"instruction": "a", "output": 5}, b"\xff\xfe", {"instruction": "a"}] + good[6:]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="sft_hf.data"):
        ds = load_instruction_dataset(path, skip_bad_records=True, train_split_ratio=1.0, test_split_ratio=0.0)
    assert ds["train"].to_list() == good  # all 8 good records, in file order, nothing else
    assert len(ds.skipped_records) == 5
    assert [m.split(": ", 1)[1].split(",")[0] for m in ds.skipped_records] == [
        "line 4", "line 10", "record 3 (line 5)", "record 7 (line 9)", "record 8 (line 11)"]  # parse errors first
    assert "skipped 5 bad records, kept 8" in caplog.text


def test_skip_bad_records_on_a_non_json_source(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,input,output\nAdd one.,2,3\nSay hi,,\nAdd two.,2,4\n")
    ds = load_instruction_dataset(str(path), skip_bad_records=True, train_split_ratio=1.0, test_split_ratio=0.0)
    assert ds["train"]["output"] == ["3", "4"]
    assert ds.skipped_records == [f"{path}: record 1 (line 3), field 'output': missing"]


def test_dataset_empty_after_filtering(tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"instruction": "a", "output": ""}, {"instruction": "b"}])
    with pytest.raises(DataError, match=r"no usable record left \(2 bad records skipped; the first: .*line 1"):
        load_instruction_dataset(path, skip_bad_records=True)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="no usable record left"):
        load_instruction_dataset(empty)


def test_train_split_left_empty_by_the_ratios(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [GOOD])
    with pytest.raises(DataError, match=r"the train split is empty \(train_split_ratio=0.85 of 1 records\)"):
        load_instruction_dataset(path)


def test_template_field_the_data_lacks_names_file_record_and_field(tmp_path, tokenizer):
    template = {"name": "ctx", "prompt": "{context}\n{instruction}", "response": "\n"}
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD] * 3)
    with pytest.raises(DataError, match=rf"^{path}: the template uses field {{context}}, which the data does not"):
        load_instruction_dataset(path, template=template)
    path = write_jsonl(tmp_path / "some.jsonl", [{**GOOD, "context": "c"}, GOOD, {**GOOD, "context": "c"}])
    with pytest.raises(DataError, match=rf"^{path}: record 1 \(line 2\), field 'context': missing"):
        load_instruction_dataset(path, template=template)
    # tokenize_dataset checks too, for data that did not come through load_instruction_dataset
    with pytest.raises(TemplateError, match=r"template 'ctx' uses field\(s\) \['context'\], which the data lacks"):
        tokenize_dataset(Dataset.from_list([GOOD]), tokenizer, template, max_length=64, verbose=False)


def test_multi_turn_records_under_a_single_turn_template_name_file_record_and_line(tmp_path):
    one = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    two = {"messages": [*one["messages"], {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [one, one, two, one])
    with pytest.raises(DataError, match=rf"^{path}: record 2 \(line 3\), field 'messages': template 'alpaca' takes "
                                        r"one user turn and one assistant turn; use 'chatml' or 'chat_template'"):
        load_instruction_dataset(path, template="alpaca")
    sharegpt = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}] * 2}
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt])
    with pytest.raises(DataError, match=r"record 0 \(line 1\), field 'conversations': template 'phi3' takes one"):
        load_instruction_dataset(path, template="phi3")
    assert len(load_instruction_dataset(path, template="chatml", train_split_ratio=1.0)["train"]) == 1


def test_real_generated_data_with_a_null_record():
    """Chapter 7's Llama-3-generated file has one record with instruction null and an empty output."""
    path = str(ROOT.parent / "shared" / "data" / "instruction-data-llama3-7b.json")
    with pytest.raises(DataError, match=rf"^{path}: record 2, field 'instruction': missing$"):
        load_instruction_dataset(path)
    ds = load_instruction_dataset(path, skip_bad_records=True, train_split_ratio=1.0, test_split_ratio=0.0)
    assert len(ds["train"]) == 4 and ds.skipped_records == [f"{path}: record 2, field 'instruction': missing"]
    assert ds["train"]["input"] == [""] * 4  # no `input` key in the file: added empty


def test_missing_file_or_unreachable_dataset(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path}/typo.jsonl: no such file or folder$"):
        load_instruction_dataset(str(tmp_path / "typo.jsonl"))
    with pytest.raises(DataError, match=r"^nobody/no-such-dataset: could not be loaded: "):
        load_instruction_dataset("nobody/no-such-dataset")  # offline in tests; not found online


def test_a_template_without_an_input_part_refuses_records_with_input():
    from sft_hf.templates import Template

    template = Template(name="qa", prompt="Q: {instruction}", response="\nA: ")
    assert template.format_prompt({"instruction": "Fix it.", "input": "", "output": "x"}) == "Q: Fix it.\nA: "
    with pytest.raises(TemplateError, match=r"template 'qa' has no 'input' part, so the record's input 'freind'"):
        template.format_prompt({"instruction": "Fix it.", "input": "freind", "output": "friend"})
