"""The map step (sft_hf/tokenization.py): EOS appended, response start recorded, truncation that keeps the response,
datasets cache reuse; a record the template cannot render, a max_length too small for the template and a tokenizer
without EOS are one line each."""
import json

import pytest
from datasets import Dataset

from sft_hf import load_instruction_dataset, tokenize_dataset
from sft_hf.builtin.toy import train_bpe_tokenizer
from sft_hf.templates import TemplateError, get_template

from tiny_setup import GOOD


def test_eos_appended_and_prompt_length_recorded(bpe_tokenizer):
    tok = bpe_tokenizer
    record = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    row = tokenize_dataset(Dataset.from_list([record]), tok, "alpaca", max_length=None, verbose=False)[0]
    prompt_ids = tok(get_template("alpaca").format_prompt(record))["input_ids"]
    assert row["input_ids"] == prompt_ids + tok("Blue.")["input_ids"] + [tok.eos_token_id]
    assert row["prompt_length"] == len(prompt_ids)
    assert row["length"] == len(row["input_ids"])
    assert row["truncated"] is False


def test_truncation_cuts_the_prompt_and_keeps_response_and_eos(bpe_tokenizer, capsys):
    tok = bpe_tokenizer
    long_input = " ".join(["word"] * 200)
    records = [
        {"instruction": "Summarize.", "input": long_input, "output": "Words."},  # truncated
        {"instruction": "Say hi.", "input": "", "output": "Hi."},  # fits
        {"instruction": "Echo.", "input": "", "output": " ".join(["echo"] * 100)},  # response alone too long: dropped
    ]
    out = tokenize_dataset(Dataset.from_list(records), tok, "alpaca", max_length=64, verbose=True)
    assert len(out) == 2
    first = out[0]
    response = tok("Words.")["input_ids"] + [tok.eos_token_id]
    assert len(first["input_ids"]) == 64 and first["truncated"] is True
    assert first["input_ids"][-len(response) :] == response
    assert first["prompt_length"] == 64 - len(response)
    # the prompt lost tokens from its start: its end (input tail + response header) is intact
    full_prompt = tok(get_template("alpaca").format_prompt(records[0]))["input_ids"]
    assert first["input_ids"][: first["prompt_length"]] == full_prompt[-first["prompt_length"] :]
    assert out[1]["truncated"] is False
    printed = capsys.readouterr().out
    assert "3 examples → kept 2, truncated 1, dropped 1" in printed


def test_alpaca_file_split_like_chapter_7_and_cache_reused(tmp_path, bpe_tokenizer, instruction_records):
    path = tmp_path / "instruction-data.json"
    path.write_text(json.dumps(instruction_records))
    splits = load_instruction_dataset(str(path))
    assert {k: len(v) for k, v in splits.items()} == {"train": 935, "validation": 55, "test": 110}
    assert splits["test"][0] == instruction_records[935]  # file order: train, then test, then validation
    assert splits["validation"][0] == instruction_records[1045]

    first = tokenize_dataset(splits["train"], bpe_tokenizer, "alpaca", max_length=1024, verbose=False)
    second = tokenize_dataset(splits["train"], bpe_tokenizer, "alpaca", max_length=1024, verbose=False)
    assert first._fingerprint == second._fingerprint  # same fingerprint → map loads the cached Arrow file
    assert first.cache_files and first.cache_files == second.cache_files


def test_prompt_completion_and_messages_records(tmp_path, bpe_tokenizer):
    pc = tmp_path / "pc.jsonl"
    pc.write_text('{"prompt": "2+2=", "completion": "4"}\n{"prompt": "3+3=", "completion": "6"}\n')
    ds = load_instruction_dataset(str(pc), train_split_ratio=1.0, test_split_ratio=0.0)["train"]
    row = tokenize_dataset(ds, bpe_tokenizer, "raw", max_length=None, verbose=False)[0]
    assert row["input_ids"] == bpe_tokenizer("2+2=")["input_ids"] + bpe_tokenizer("4")["input_ids"] + [bpe_tokenizer.eos_token_id]

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}) + "\n")
    ds = load_instruction_dataset(str(chat), train_split_ratio=1.0, test_split_ratio=0.0)["train"]
    row = tokenize_dataset(ds, bpe_tokenizer, "chatml", max_length=None, verbose=False)[0]
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert row["prompt_length"] == len(bpe_tokenizer(prompt)["input_ids"])


def test_csv_and_parquet_and_column_mapping(tmp_path, bpe_tokenizer):
    import pandas as pd

    frame = pd.DataFrame({"question": ["What is 1+1?", "Capital of France?"], "answer": ["2", "Paris"]})
    frame.to_csv(tmp_path / "qa.csv", index=False)
    frame.to_parquet(tmp_path / "qa.parquet")
    mapping = {"question": "instruction", "answer": "output"}
    for name in ("qa.csv", "qa.parquet"):
        ds = load_instruction_dataset(str(tmp_path / name), column_mapping=mapping, train_split_ratio=1.0, test_split_ratio=0)
        assert ds["train"].to_list() == [
            {"instruction": "What is 1+1?", "output": "2", "input": ""},
            {"instruction": "Capital of France?", "output": "Paris", "input": ""},
        ]


def test_record_the_template_cannot_render_names_split_and_record(tokenizer):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
               {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                             {"role": "assistant", "content": "d"}]}]
    with pytest.raises(TemplateError, match=r"^\[data\] record 1: template 'alpaca' takes one user turn"):
        tokenize_dataset(Dataset.from_list(records), tokenizer, "alpaca", max_length=64, verbose=False)


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
    from sft_hf.modeling import load_tokenizer
    from sft_hf.run.config import ModelArguments

    bare = train_bpe_tokenizer(["hello world"] * 10, 280)
    bare.eos_token = None
    bare.pad_token = None
    assert bare.eos_token_id is None and bare.pad_token_id is None
    with pytest.raises(TemplateError, match="the tokenizer has no eos_token \\(pad_token: None\\)"):
        tokenize_dataset(Dataset.from_list([GOOD]), bare, "alpaca", max_length=64, verbose=False)
    bare.save_pretrained(tmp_path)
    with pytest.raises(TemplateError, match=rf"{tmp_path}: the tokenizer has no eos_token"):
        load_tokenizer(ModelArguments(model_name_or_path=str(tmp_path)))


def test_split_statistics_are_numpys_over_the_rows_without_holding_them(bpe_tokenizer):
    """compute_stats reads the lengths chunk by chunk into a histogram; its figures must be numpy's over the rows
    (mean, max, 95th percentile with numpy's linear interpolation), also with several chunks."""
    import numpy as np

    from sft_hf.tokenization import compute_stats, percentile_of_counts

    records = [{"instruction": "word " * (i % 13), "input": "", "output": "x " * (i % 7 + 1)} for i in range(2500)]
    tokenized = tokenize_dataset(Dataset.from_list(records), bpe_tokenizer, get_template("alpaca"), max_length=None,
                                 verbose=False)
    assert tokenized.data.column("length").num_chunks > 1  # the map wrote several record batches
    lengths = np.array(tokenized["length"])
    stats = compute_stats(tokenized, "train", len(records))
    assert (stats.tokens, stats.max_length) == (lengths.sum(), lengths.max())
    assert stats.mean_length == pytest.approx(lengths.mean(), rel=1e-12)
    assert stats.p95_length == pytest.approx(np.percentile(lengths, 95), abs=1e-9)
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = rng.integers(0, rng.integers(1, 40), rng.integers(1, 50))
        for q in (0, 5, 50, 95, 100):
            assert percentile_of_counts(np.bincount(values), q) == pytest.approx(np.percentile(values, q), abs=1e-9)
