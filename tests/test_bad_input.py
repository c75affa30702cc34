"""Bad input gets a clear error naming file, record (line) and field, before any training; or is skipped and counted."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from sft_hf.run.config import RecipeError, parse_recipe
from sft_hf.data import DataError, load_instruction_dataset
from sft_hf.templates import TemplateError, get_template
from sft_hf.tokenization import tokenize_dataset
from sft_hf.builtin.toy import make_toy_records, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"instruction": "Add one.", "input": "2", "output": "3"}


@pytest.fixture(scope="module")
def tokenizer():
    alpaca = get_template("alpaca")
    return train_bpe_tokenizer([alpaca.format_prompt(r) + r["output"] for r in make_toy_records(200, 1)], 300)


def write_jsonl(path: Path, lines: list) -> str:
    """`lines` items are dicts (dumped as JSON) or raw str/bytes lines written as they are."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


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


def test_unknown_template_suggests_the_closest_name():
    with pytest.raises(TemplateError, match="unknown template 'chatlm': did you mean 'chatml'"):
        get_template("chatlm")
    with pytest.raises(TemplateError, match="template file missing.yaml not found"):
        get_template("missing.yaml")
    with pytest.raises(TemplateError, match=r"'prompt': \{0\} is not a record field name"):
        get_template({"prompt": "{0} says"})
    with pytest.raises(TemplateError, match=r"'prompt': Single '\}' encountered"):
        get_template({"prompt": "{instruction} }"})


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


def test_record_the_template_cannot_render_names_split_and_record(tokenizer):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
               {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                             {"role": "assistant", "content": "d"}]}]
    with pytest.raises(TemplateError, match=r"^\[data\] record 1: template 'alpaca' takes one user turn"):
        tokenize_dataset(Dataset.from_list(records), tokenizer, "alpaca", max_length=64, verbose=False)


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


def test_max_length_too_small_for_the_template_itself(tokenizer):
    alpaca = get_template("alpaca")
    empty = {"instruction": "", "input": "", "output": ""}
    overhead = len(tokenizer(alpaca.format_prompt(empty))["input_ids"]) + 1  # + EOS
    assert overhead > 20  # the Alpaca preamble alone is dozens of tokens
    records = Dataset.from_list([{"instruction": "Hi", "input": "", "output": "Yo"}])
    with pytest.raises(TemplateError, match=rf"max_length={overhead} is too small for template 'alpaca': its own "
                                            rf"text and EOS take {overhead} tokens"):
        tokenize_dataset(records, tokenizer, alpaca, max_length=overhead, verbose=False)
    row = tokenize_dataset(records, tokenizer, alpaca, max_length=overhead + 1, verbose=False)[0]
    assert row["length"] == overhead + 1 and row["truncated"]  # the instruction is cut, template and EOS kept


def test_tokenizer_with_neither_pad_nor_eos(tmp_path, tokenizer):
    from sft_hf.run.config import ModelArguments
    from sft_hf.modeling import load_tokenizer

    bare = train_bpe_tokenizer(["hello world"] * 10, 280)
    bare.eos_token = None
    bare.pad_token = None
    assert bare.eos_token_id is None and bare.pad_token_id is None
    with pytest.raises(TemplateError, match="the tokenizer has no eos_token \\(pad_token: None\\)"):
        tokenize_dataset(Dataset.from_list([GOOD]), bare, "alpaca", max_length=64, verbose=False)
    bare.save_pretrained(tmp_path)
    with pytest.raises(TemplateError, match=rf"{tmp_path}: the tokenizer has no eos_token"):
        load_tokenizer(ModelArguments(model_name_or_path=str(tmp_path)))


def test_unknown_recipe_key_suggests_the_closest(tmp_path):
    with pytest.raises(RecipeError, match="command line: unknown option --learning_rte; did you mean --learning_rate"):
        parse_recipe(["--learning_rte", "1e-4"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_lenght: 64\n")
    with pytest.raises(RecipeError, match=rf"{recipe}: unknown key 'max_lenght'; did you mean 'max_length'"):
        parse_recipe(["--config", str(recipe)])
    recipe.write_text("max_length: [1\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        parse_recipe(["--config", str(recipe)])
    with pytest.raises(RecipeError, match="column_mapping is not valid JSON"):
        parse_recipe(["--column_mapping", "{question: instruction}"])
    _, data_args, _ = parse_recipe(["--column_mapping", '{"question": "instruction"}', "--skip_bad_records", "true"])
    assert data_args.column_mapping == {"question": "instruction"} and data_args.skip_bad_records is True


def run_train(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_bad_data_is_one_line_and_nonzero_exit_before_training(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD] * 5 + [{"instruction": "a", "output": 3}] + [GOOD] * 5)
    out = tmp_path / "out"
    result = run_train("--model_name_or_path", "builtin:tiny-llama", "--dataset_name", path, "--output_dir", str(out),
                       "--max_steps", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {path}: record 5 (line 6), field 'output': expected text, got int 3")
    assert not out.exists()  # nothing trained, nothing written

    result = run_train("--model_name_or_path", "builtin:tiny-llama", "--dataset_name", path, "--output_dir", str(out),
                       "--lerning_rate", "1", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown option --lerning_rate; did you mean --learning_rate?" in result.stderr


def test_launched_bad_data_ends_with_the_error_and_its_exit_code(tmp_path):
    """`sft-hf launch` on 2 processes: the error once (each process meets it; the first one prints it), every bad
    record in it, then nothing from the launcher (`accelerate launch` adds torchrun's ChildFailedError report)."""
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD] * 5 + [{"instruction": "a", "output": 3}, GOOD, {"output": "x"}])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(
        [sys.executable, "-m", "sft_hf", "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
         str(ROOT / "recipes" / "train.py"), "--model_name_or_path", "builtin:tiny-llama", "--dataset_name", path,
         "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert all(" INFO sft_hf" in line for line in lines[:-3])  # before it only the start-up log (threads)
    assert lines[-3:] == [
        f"error: {path}: 2 bad records (fix them, or pass --skip_bad_records true to drop them):",
        "  record 5 (line 6), field 'output': expected text, got int 3",
        "  record 7 (line 8), field 'instruction': missing",
    ]
    assert not (tmp_path / "out").exists()


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


def test_dataset_without_a_model_is_an_error_not_the_toy_model():
    with pytest.raises(RecipeError, match="--dataset_name without --model_name_or_path"):
        parse_recipe(["--dataset_name", "data.json"])
    model_args, data_args, _ = parse_recipe(["--dataset_name", "data.json", "--model_name_or_path", "builtin:tiny-llama"])
    assert (model_args.model_name_or_path, data_args.dataset_name) == ("builtin:tiny-llama", "data.json")


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model"])
def test_a_missing_model_folder_is_named_in_one_line(path):
    from sft_hf.modeling import resolve_model_path

    with pytest.raises(RecipeError, match=rf"^model {path}: no such folder"):
        resolve_model_path(path)


def test_merge_lora_refuses_a_non_empty_out_dir_and_names_a_non_adapter(tmp_path, capsys):
    from sft_hf.cli import main as cli_main

    adapter, out = tmp_path / "adapter", tmp_path / "run"
    adapter.mkdir(), out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights of another run")
    assert cli_main(["merge-lora", str(adapter), str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {adapter}: no adapter_config.json; is this a LoRA output_dir?"
    (adapter / "adapter_config.json").write_text("{}")
    assert cli_main(["merge-lora", str(adapter), str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {out} exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]  # untouched
    assert cli_main(["merge-lora", str(adapter), str(out / "model.safetensors"), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {out / 'model.safetensors'} is a file: name a folder for the " \
                                              "merged model"


def run_evaluate(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "evaluate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_evaluate_bad_arguments_are_one_line_before_any_generation(tmp_path):
    result = run_evaluate("--responses", str(tmp_path / "missing.json"), cwd=tmp_path)
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        2, f"error: --responses {tmp_path / 'missing.json'}: no such file")
    # the judge backend is checked before the model is loaded or anything generated
    result = run_evaluate("--model", "builtin:tiny-llama", "--dataset_name", "builtin:toy-tasks", "--judge_backend",
                          "olama", "--output_dir", str(tmp_path / "ev"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown --judge_backend 'olama': use ollama, openai, hf (did you mean 'ollama'?)")
    assert not (tmp_path / "ev").exists()
    result = run_evaluate("--responses", "r.json", "--judge_backnd", "hf", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: command line: unknown option --judge_backnd; did you mean --judge_backend?")


def test_recipe_values_of_the_wrong_type_name_their_source_in_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: builtin:tiny-llama\nlearning_rate: abc\n")
    with pytest.raises(RecipeError, match=rf"^{recipe}: argument --learning_rate: invalid float value"):
        parse_recipe(["--config", str(recipe)])
    with pytest.raises(RecipeError, match=r"^command line: argument --learning_rate: invalid float"):
        parse_recipe(["--config", str(recipe), "--learning_rate", "x"])
    # the command line's value wins without the file's being parsed; --config=path works like --config path
    assert parse_recipe([f"--config={recipe}", "--learning_rate", "0.001"])[2].learning_rate == 0.001
    with pytest.raises(RecipeError, match="^command line: per_device_train_batch_size must be at least 1, got 0"):
        parse_recipe(["--config", str(recipe), "--learning_rate", "1", "--per_device_train_batch_size", "0"])
    with pytest.raises(RecipeError, match="^command line: max_train_samples must be at least 1, got -5"):
        parse_recipe(["--config", str(recipe), "--learning_rate", "1", "--max_train_samples", "-5"])
    with pytest.raises(RecipeError, match="^command line: shuffle_seed must be at least 0, got -3"):
        parse_recipe(["--config", str(recipe), "--learning_rate", "1", "--shuffle_seed", "-3"])


def test_a_recipe_given_first_without_config_and_a_stray_value(tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("model_name_or_path: builtin:tiny-llama\nlearning_rate: 0.002\nmax_length: 48\n")
    _, _, args = parse_recipe([str(recipe), "--learning_rate", "0.003"])  # alignment-handbook's form
    assert (args.learning_rate, args.max_length) == (0.003, 48)
    with pytest.raises(RecipeError, match=r"^command line: unexpected 'oops': values follow their --flag"):
        parse_recipe(["--config", str(recipe), "oops"])
    with pytest.raises(RecipeError, match=r"^command line: unexpected '0.2'"):
        parse_recipe(["--config", str(recipe), "--learning_rate", "0.1", "0.2"])


def test_a_template_without_an_input_part_refuses_records_with_input():
    from sft_hf.templates import Template

    template = Template(name="qa", prompt="Q: {instruction}", response="\nA: ")
    assert template.format_prompt({"instruction": "Fix it.", "input": "", "output": "x"}) == "Q: Fix it.\nA: "
    with pytest.raises(TemplateError, match=r"template 'qa' has no 'input' part, so the record's input 'freind'"):
        template.format_prompt({"instruction": "Fix it.", "input": "freind", "output": "friend"})


def test_inspect_outputs_do_not_make_the_output_dir_a_run(tmp_path):
    from types import SimpleNamespace

    from sft_hf.run.safety import check_output_dir

    out = tmp_path / "run"
    (out / "data_report").mkdir(parents=True)
    (out / "inspect.html").write_text("<html></html>")
    args = SimpleNamespace(output_dir=str(out), resume_from_checkpoint=None, overwrite_output_dir=False)
    check_output_dir(args)  # no error: looking at the data first is not a run
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(RecipeError, match=r"is not empty \(model.safetensors\)"):
        check_output_dir(args)
