"""`packing: true` is TRL's packing: whole examples best-fit-decreasing into rows of max_length, position ids restarting
per example, no example's first token predicted from the one before; checked by hand and against TRL itself."""
import random

import pytest
import torch
from datasets import Dataset

from sft_hf import IGNORE_INDEX, InstructionDataCollator, tokenize_dataset
from sft_hf.packing import best_fit_decreasing, pack_dataset


def test_best_fit_decreasing_by_hand():
    # longest first, each into the bin with the least room that holds it: 7 opens bin 0 (room 3), 5 opens bin 1
    # (room 5), 4 → bin 1 (room 1), 3 → bin 0 (room 0), 2 fits nowhere: bin 2 (room 8), 1 → bin 1, 1 → bin 2
    assert best_fit_decreasing([3, 5, 1, 7, 2, 4, 1], capacity=10) == [[3, 0], [1, 5, 2], [4, 6]]
    # ties: equal lengths keep their order, and equal rooms fill the bin opened first
    assert best_fit_decreasing([2, 2, 2, 2], capacity=3) == [[0], [1], [2], [3]]
    assert best_fit_decreasing([1, 1, 1, 1], capacity=2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="example 1 has 5 tokens"):
        best_fit_decreasing([2, 5], capacity=4)


def test_trls_docstring_example():
    # trl.pack_dataset's own example (strategy bfd, seq_length 4), whose longest sequence fits here
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [6, 7], [8, 9, 10], [11]],
                              "completion_mask": [[0, 1, 1, 1], [0, 1], [0, 0, 1], [1]]})
    packed = pack_dataset(rows, 4, verbose=False)
    assert packed["input_ids"] == [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7]]
    assert packed["completion_mask"] == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 1]]
    assert packed["seq_lengths"] == [[4], [3, 1], [2]]
    assert packed["length"] == [4, 4, 2]


def test_rows_are_trls_rows():
    trl = pytest.importorskip("trl")
    rng = random.Random(0)
    ids = [[rng.randrange(100) for _ in range(rng.randint(1, 60))] for _ in range(2500)]  # three map batches
    ours = pack_dataset(Dataset.from_dict({"input_ids": ids}), 64, verbose=False)
    theirs = trl.pack_dataset(Dataset.from_dict({"input_ids": ids}), 64, strategy="bfd")
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["seq_lengths"] == theirs["seq_lengths"]
    assert len(ours) < 0.6 * len(ids)  # 2500 examples of 30.5 tokens on average fit two to a row and more


def test_collated_packed_rows_are_the_examples_padding_free(instruction_records, bpe_tokenizer):
    tok = bpe_tokenizer
    examples = tokenize_dataset(Dataset.from_list(instruction_records[:40]), tok, "alpaca", 256, verbose=False)
    packed = pack_dataset(examples, 256, verbose=False)
    assert sum(map(len, packed["seq_lengths"])) == 40 and max(packed["length"]) <= 256
    collator = InstructionDataCollator(pad_token_id=tok.pad_token_id, completion_only_loss=True, padding_free=True)
    batch = collator(packed.select(range(3)).to_list())
    # the same examples, in packed order, collated one by one into a padding-free row
    order = [i for members in best_fit_decreasing(examples["length"][:40], 256)[:3] for i in members]
    alone = collator([examples[i] for i in order])
    for key in ("input_ids", "position_ids", "labels"):
        assert torch.equal(batch[key], alone[key]), key
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(order)
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)  # never predicted from the previous example
    row = batch["labels"][0].tolist()
    assert sum(t != IGNORE_INDEX for t in row) == sum(sum(examples[i]["completion_mask"][1:]) for i in order)


def test_collated_packed_rows_match_trls_collator(instruction_records, bpe_tokenizer):
    trl = pytest.importorskip("trl")
    tok = bpe_tokenizer
    examples = tokenize_dataset(Dataset.from_list(instruction_records[:30]), tok, "alpaca", 256, verbose=False)
    packed = pack_dataset(examples, 256, verbose=False).select(range(2)).to_list()
    ours = InstructionDataCollator(pad_token_id=tok.pad_token_id, padding_free=True)(packed)
    theirs = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id,
                                                                     padding_free=True)(
        [{"input_ids": r["input_ids"], "seq_lengths": r["seq_lengths"]} for r in packed])
    for key in ("input_ids", "position_ids", "labels"):
        assert torch.equal(ours[key], theirs[key]), key


def test_a_trl_recipes_packing_trains_packed_rows(tmp_path, capsys):
    """A TRL-style recipe (`packing: true`, batch 2, max_length 256) through the training run: the train split is
    packed before training, each optimizer step takes 2 packed rows, and the run learns."""
    from sft_hf import train
    from tiny_setup import tiny_recipe_args, write_tiny_dataset, write_tiny_model

    model, data = write_tiny_model(tmp_path / "model"), write_tiny_dataset(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    train.main(tiny_recipe_args(model, data, out, packing=True, max_length=256, per_device_train_batch_size=2))
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith("[packing]"))
    examples, rows = int(line.split()[1]), int(line.split("→ ")[1].split()[0])
    assert examples == 64 and rows < examples
    import json

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == -(-rows // 2)  # one epoch of packed rows, two a step
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]
