"""`sft-hf report`: counts checked against planted fixtures, hand-computed batches and chapter 7's dataset.

Every expected number is derived here independently: from the fixture's construction, by hand, or straight from the
tokenizer and the raw JSON (not through tokenize_dataset / the collator).
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from sft_hf.cli import main as cli_main
from sft_hf.collator import InstructionDataCollator
from sft_hf.inspection.report import batch_stats, check_limits, near_duplicate_pairs, parse_fail_on
from sft_hf.templates import get_template
from sft_hf.builtin.toy import train_bpe_tokenizer

CHAPTER7 = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction-data.json"  # ../shared beside the repo
ALPACA = get_template("alpaca")


def load_chapter7():
    if not CHAPTER7.exists():
        pytest.skip(f"{CHAPTER7} not found (the shared chapter 7 data)")
    return json.loads(CHAPTER7.read_text())


def save_tokenizer(records, folder, vocab_size):
    texts = [ALPACA.format_prompt(r) + r["output"] for r in records]
    train_bpe_tokenizer(texts, vocab_size=vocab_size).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def ids_lengths(tokenizer, record):
    """(prompt tokens, response tokens + EOS), straight from the tokenizer."""
    prompt = len(tokenizer(ALPACA.format_prompt(record))["input_ids"])
    return prompt, len(tokenizer(record["output"], add_special_tokens=False)["input_ids"]) + 1


def run_report(tmp_path, data, tok_dir, *flags):
    out = tmp_path / "report"
    code = cli_main(["report", "--out_dir", str(out), "--dataset_name", str(data), "--model_name_or_path",
                     str(tok_dir), "--output_dir", str(tmp_path), *flags])
    return code, out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """22 chapter 7 records split 18 train / 2 test / 2 validation (file order), with three plants:
    train[10] is an exact copy of train[7]; validation[0] is train[3] with one word added (a near duplicate
    across splits); test[1] has a response too long for max_length (dropped)."""
    chapter7 = load_chapter7()
    records = [dict(r) for r in chapter7[:21]]
    records[10] = dict(records[7])
    records[19] = {"instruction": "Repeat the word forever.", "input": "", "output": "again " * 120}
    near = dict(records[3], output=records[3]["output"].replace("they went", "they still went"))
    assert near["output"] != records[3]["output"]
    records = records[:20] + [near, records[20]]
    folder = tmp_path_factory.mktemp("planted")
    data = folder / "data.json"
    data.write_text(json.dumps(records))
    tokenizer = save_tokenizer(records, folder / "tok", vocab_size=400)
    return records, data, folder / "tok", tokenizer


def test_report_on_planted_fixture(planted, tmp_path, capsys):
    records, data, tok_dir, tokenizer = planted
    lengths = [ids_lengths(tokenizer, r) for r in records]
    max_length = 96
    code, out = run_report(tmp_path, data, tok_dir, "--max_length", str(max_length),
                           "--per_device_train_batch_size", "4", "--completion_only_loss", "true")
    assert code == 0
    summary = json.loads((out / "report.json").read_text())
    assert {k: v["examples"] for k, v in summary["splits"].items()} == {"train": 18, "validation": 2, "test": 2}

    # truncated: longer than max_length but the response fits; dropped: the response + EOS alone does not fit
    split_of = ["train"] * 18 + ["test"] * 2 + ["validation"] * 2
    truncated = [s for (p, r), s in zip(lengths, split_of) if p + r > max_length and r <= max_length]
    dropped = [s for (p, r), s in zip(lengths, split_of) if r > max_length]
    assert dropped == ["test"]  # the plant
    assert len(truncated) > 0  # the fixture does exercise truncation
    assert summary["truncated"] == len(truncated) and summary["dropped"] == 1
    assert summary["splits"]["test"]["dropped"] == 1
    assert summary["splits"]["train"]["truncated"] == truncated.count("train")
    assert summary["truncated_fraction"] == pytest.approx(len(truncated) / 22)
    assert summary["splits"]["test"]["length_max"] == sum(lengths[19])  # lengths are measured before truncation

    # trained tokens (completion_only_loss): every kept train response + EOS; tokens: kept lengths after truncation
    train = lengths[:18]
    assert summary["trained_tokens"] == sum(r for p, r in train)
    assert summary["tokens"] == sum(min(p + r, max_length) for p, r in train)
    assert summary["trained_token_fraction"] == pytest.approx(summary["trained_tokens"] / summary["tokens"])

    assert summary["empty_input"] == sum(1 for r in records if not r["input"]) and summary["empty_input"] > 0
    assert summary["empty_instruction"] == 0 and summary["empty_output"] == 0
    assert summary["exact_duplicates"] == 1 and summary["exact_duplicate_groups"] == [["train[7]", "train[10]"]]
    assert summary["near_duplicates"] == 1 and summary["near_duplicates_across_splits"] == 1
    (pair,) = summary["near_duplicate_pairs"]
    assert (pair["a"], pair["b"]) == ("train[3]", "validation[0]") and 0.9 <= pair["cosine"] < 1.0
    assert "they still went" in pair["b_text"]
    assert (out / "length_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "train[3] ~ validation[0]" in capsys.readouterr().out


def test_fail_on_exits_non_zero_for_ci(planted, tmp_path, capsys):
    _, data, tok_dir, _ = planted
    code, _ = run_report(tmp_path, data, tok_dir, "--max_length", "96",
                         "--fail_on", "near_duplicates=0,dropped_fraction=0.5")
    assert code == 1
    assert re.search(r"FAIL: near_duplicates = 1 > 0", capsys.readouterr().err)
    summary = {"near_duplicates": 1, "dropped": 1, "truncated_fraction": 0.25, "max_length": 96, "splits": {}}
    assert check_limits(summary, parse_fail_on("near_duplicates=1,dropped=1")) == []
    assert check_limits(summary, parse_fail_on("truncated_fraction=0.01")) == ["truncated_fraction = 0.25 > 0.01"]
    with pytest.raises(ValueError, match="unknown.*near_dups"):
        check_limits(summary, parse_fail_on("near_dups=0"))
    with pytest.raises(ValueError, match="name=number"):
        parse_fail_on("near_duplicates")


def test_padding_and_trained_tokens_by_hand():
    lengths, prompts = [10, 2, 9, 3], [4, 1, 5, 1]
    rows = [{"input_ids": list(range(1, n + 1)), "completion_mask": [0] * p + [1] * (n - p)}
            for n, p in zip(lengths, prompts)]
    collator = InstructionDataCollator(pad_token_id=0, completion_only_loss=True)
    stats = batch_stats(rows, collator, batch_size=2, group_size=4, seed=0)
    # group_by_length with groups of 4 sorts the whole set longest first: batches (10, 9) and (3, 2)
    assert stats["padding_fraction_group_by_length"] == pytest.approx(2 / 26)
    # the random sampler's order for seed 0, padded batch by batch
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    batches = [[lengths[i] for i in order[:2]], [lengths[i] for i in order[2:]]]
    positions = sum(2 * max(b) for b in batches)
    assert stats["padding_fraction_random"] == pytest.approx((positions - 24) / positions)
    assert stats["tokens"] == 24 and stats["trained_tokens"] == 6 + 1 + 4 + 2  # responses only
    full = batch_stats(rows, InstructionDataCollator(pad_token_id=0), batch_size=2, group_size=4, seed=0)
    assert full["trained_tokens"] == 24 - 4  # every token but each row's first (nothing predicts it)
    free = batch_stats(rows, InstructionDataCollator(pad_token_id=0, padding_free=True), 2, 4, 0)
    assert free["padding_fraction_random"] == 0 and free["padding_fraction_group_by_length"] == 0
    # rounded up to a multiple of 8 tokens per row, the filler is what pads
    free8 = batch_stats(rows, InstructionDataCollator(pad_token_id=0, padding_free=True, pad_to_multiple_of=8), 2, 4, 0)
    rounded = sum(-(-sum(b) // 8) * 8 for b in batches)
    assert free8["padding_fraction_random"] == pytest.approx((rounded - 24) / rounded) and rounded > 24
    assert free8["tokens"] == 24


def test_near_duplicate_threshold_and_exact_copies():
    texts = ["The cat sat on the mat.", "the cat sat on the mat", "The cat sat on the mat.",
             "Quantum chromodynamics describes quarks."]
    count, across, pairs = near_duplicate_pairs(texts, 0.9, groups=["a", "b", "a", "b"])
    # 0~2 are identical (an exact duplicate, not a near one); 0~1 and 1~2 differ only in case and punctuation
    assert count == 2 and across == 2
    assert [(i, j) for i, j, _ in pairs] == [(0, 1), (1, 2)] and all(c == pytest.approx(1.0) for *_, c in pairs)
    _, _, (pair,) = near_duplicate_pairs(["red green blue", "red green blue yellow"], 0.0)
    assert near_duplicate_pairs(["red green blue", "red green blue yellow"], pair[2] + 1e-3)[0] == 0
    assert near_duplicate_pairs(["red green blue", "red green blue yellow"], pair[2])[0] == 1  # >=, not >


def test_report_on_chapter7_data(tmp_path):
    """1100 records → 935 train / 55 validation / 110 test, 775 empty inputs (shared/README.md)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    chapter7 = load_chapter7()
    tokenizer = save_tokenizer(chapter7, tmp_path / "tok", vocab_size=1000)
    max_length = 96
    code, out = run_report(tmp_path, CHAPTER7, tmp_path / "tok", "--max_length", str(max_length),
                           "--per_device_train_batch_size", "8", "--completion_only_loss", "true")
    assert code == 0
    summary = json.loads((out / "report.json").read_text())
    assert {k: v["examples"] for k, v in summary["splits"].items()} == {"train": 935, "validation": 55, "test": 110}
    assert summary["empty_input"] == 775
    distinct = {(r["instruction"], r["input"], r["output"]) for r in chapter7}
    assert summary["exact_duplicates"] == 1100 - len(distinct) == 0

    lengths = [ids_lengths(tokenizer, r) for r in chapter7]
    truncated = sum(p + r > max_length and r <= max_length for p, r in lengths)
    dropped = sum(r > max_length for p, r in lengths)
    assert truncated > 0 and (summary["truncated"], summary["dropped"]) == (truncated, dropped)
    train = [(p, r) for p, r in lengths[:935] if r <= max_length]
    assert summary["trained_tokens"] == sum(r for _, r in train)
    assert summary["tokens"] == sum(min(p + r, max_length) for p, r in train)
    assert summary["padding_fraction_group_by_length"] < summary["padding_fraction_random"]

    # Near duplicates, cross-checked with sklearn's dense cosine_similarity over chapter 7's preprocessing.
    texts = [re.sub(r"[^\w\s]", "", "\n".join((r["instruction"], r["input"], r["output"])).lower()) for r in chapter7]
    cosine = cosine_similarity(TfidfVectorizer(analyzer="char", ngram_range=(1, 3)).fit_transform(texts))
    assert summary["near_duplicates"] == int(np.sum(np.triu(cosine >= 0.9 - 1e-9, k=1)))
    names = {(p["a"], p["b"]) for p in summary["near_duplicate_pairs"]}
    # Found by reading the data: same question, answers differing by one word / by "78" vs "78.37".
    assert chapter7[509]["instruction"] == chapter7[695]["instruction"] == "What is the capital of Germany?"
    assert {("train[509]", "train[695]"), ("train[451]", "train[654]")} <= names
