"""Labels, padding and masks, checked value by value."""
import torch
from datasets import Dataset

from sft_hf import IGNORE_INDEX, InstructionDataCollator, tokenize_dataset
from sft_hf.templates import get_template

E = 50256  # GPT-2's <|endoftext|>, used as both EOS and pad in chapter 7


def shifted_targets(batch):
    """What the causal-LM loss compares against: labels shifted left by one (the model does this internally)."""
    return batch["labels"][:, 1:].tolist()


def test_chapter_7_collate_check():
    rows = [{"input_ids": [0, 1, 2, 3, 4, E]}, {"input_ids": [5, 6, E]}, {"input_ids": [7, 8, 9, E]}]
    batch = InstructionDataCollator(pad_token_id=E)(rows)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3, 4, E], [5, 6, E, E, E, E], [7, 8, 9, E, E, E]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert shifted_targets(batch) == [[1, 2, 3, 4, E], [6, E, -100, -100, -100], [8, 9, E, -100, -100]]


def test_chapter_7_data_pad_equals_eos_keeps_the_stop_token(instruction_records, bpe_tokenizer):
    tok = bpe_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    records = instruction_records[:8]
    tokenized = tokenize_dataset(Dataset.from_list(records), tok, "alpaca", max_length=None, verbose=False)
    batch = InstructionDataCollator(pad_token_id=tok.pad_token_id)(tokenized.to_list())
    alpaca = get_template("alpaca")
    width = batch["input_ids"].shape[1]
    for i, record in enumerate(records):
        expected = tok(alpaca.format_prompt(record))["input_ids"] + tok(record["output"])["input_ids"] + [E_ID(tok)]
        n = len(expected)
        assert batch["input_ids"][i, :n].tolist() == expected
        assert batch["labels"][i].tolist() == expected + [IGNORE_INDEX] * (width - n)
        assert batch["labels"][i, n - 1].item() == tok.eos_token_id  # the row's own EOS is a target
        assert batch["input_ids"][i, n:].eq(tok.pad_token_id).all()  # padding uses the same id, and is masked
    # Exactly one EOS target per row, however many pad(=EOS) tokens the row carries.
    assert (batch["labels"] == tok.eos_token_id).sum(dim=1).tolist() == [1] * len(records)


def E_ID(tok):
    return tok.eos_token_id


def test_completion_only_loss_masks_exactly_the_prompt(instruction_records, bpe_tokenizer):
    tok = bpe_tokenizer
    records = instruction_records[:4]
    tokenized = tokenize_dataset(Dataset.from_list(records), tok, "alpaca", max_length=None, verbose=False)
    batch = InstructionDataCollator(pad_token_id=tok.pad_token_id, completion_only_loss=True)(tokenized.to_list())
    alpaca = get_template("alpaca")
    for i, record in enumerate(records):
        n_prompt = len(tok(alpaca.format_prompt(record))["input_ids"])
        response = tok(record["output"])["input_ids"] + [tok.eos_token_id]
        row = batch["labels"][i].tolist()
        assert row[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert row[n_prompt : n_prompt + len(response)] == response
        assert all(x == IGNORE_INDEX for x in row[n_prompt + len(response) :])
        assert tok.decode(response[:-1]) == record["output"]


def test_rows_with_only_input_ids_train_every_real_token_and_pad_to_multiple():
    batch = InstructionDataCollator(pad_token_id=0, pad_to_multiple_of=8)([{"input_ids": [5, 6, 7]}, {"input_ids": [9]}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"].tolist() == [[5, 6, 7] + [-100] * 5, [9] + [-100] * 7]


def test_collator_truncates_to_max_length():
    batch = InstructionDataCollator(pad_token_id=0, max_length=3)([{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [6]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [6, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [6, -100, -100]]


def test_padding_free_flattens_with_position_ids_and_no_cross_example_target():
    rows = [{"input_ids": [0, 1, 2, E], "completion_mask": [0, 0, 1, 1]}, {"input_ids": [5, 6, E], "completion_mask": [0, 1, 1]}]
    batch = InstructionDataCollator(pad_token_id=E, padding_free=True)(rows)
    assert batch["input_ids"].tolist() == [[0, 1, 2, E, 5, 6, E]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 1, 2, E, -100, 6, E]]
    assert "attention_mask" not in batch
    masked = InstructionDataCollator(pad_token_id=E, padding_free=True, completion_only_loss=True)(rows)
    assert masked["labels"].tolist() == [[-100, -100, 2, E, -100, 6, E]]


def test_padding_free_loss_equals_padded_loss(tiny_model_dir):
    """Same examples, same trained tokens: the flattened batch gives the padded batch's loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    rows = [{"input_ids": [11, 12, 13, 14, 15, 2], "completion_mask": [0, 0, 0, 1, 1, 1]},
            {"input_ids": [21, 22, 2], "completion_mask": [0, 1, 1]}]
    padded = InstructionDataCollator(pad_token_id=2, completion_only_loss=True)(rows)
    flat = InstructionDataCollator(pad_token_id=2, completion_only_loss=True, padding_free=True)(rows)
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        # transformers builds the block-diagonal mask from position_ids only without a KV cache (Trainer sets
        # use_cache=False for training); with a cache the examples would see each other.
        loss_flat = model(**flat, use_cache=False).loss
    torch.testing.assert_close(loss_flat, loss_padded, rtol=1e-5, atol=1e-5)


def test_bookkeeping_counts_each_sources_examples_and_trained_tokens_and_passes_the_stream_position():
    from sft_hf.collator import SOURCE_COUNTS, STREAM_POSITION

    rows = [{"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1], "source": 1, "stream_position": [0, 5]},
            {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1], "source": 0, "stream_position": [0, 6]},
            {"input_ids": [8, 9, 10, 11, 12], "completion_mask": [1, 0, 0, 1, 1], "source": 1,
             "stream_position": [1, 0]}]
    # trained targets after the shift: the row's first token is never one (row 3's masked-in first token is not)
    expected = [[1, 2], [2, 4]]  # source 0: 1 example, 2 tokens; source 1: 2 examples, 2 + 2 tokens
    for padding_free in (False, True):
        collator = InstructionDataCollator(pad_token_id=0, completion_only_loss=True, padding_free=padding_free,
                                           num_sources=2)
        batch = collator(rows)
        assert batch[SOURCE_COUNTS].tolist() == expected
        assert batch[SOURCE_COUNTS][:, 1].sum().item() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
        assert batch[STREAM_POSITION].tolist() == [1, 0]  # the last row's: what a resume continues after
    plain = InstructionDataCollator(pad_token_id=0)([{"input_ids": [1, 2]}])
    assert set(plain) == {"input_ids", "attention_mask", "labels"}  # no bookkeeping without sources or a stream
