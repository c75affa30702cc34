"""`streaming: true`: the rows a stream yields (every record once per pass, shuffled in blocks, deterministic with the
seed, a mixture's shares), errors that name the record, and training: the same batches and losses as the map-style
run with shuffling off, a resume after SIGKILL equal to a run never interrupted, two processes each reading their
own share."""
import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch

from sft_hf.data import DataError
from sft_hf.errors import RecipeError
from sft_hf.streaming import load_streams, process_rows
from sft_hf.templates import get_template
from tiny_setup import CRASH_WHILE_SAVING_STEP_12, ROOT, load_weights, run_train, tiny_recipe_args, train_losses, write_jsonl, \
    write_tiny_dataset, write_tiny_model



def records(n, tag="r"):
    return [{"instruction": f"{tag} {i}", "input": "", "output": f"answer {i}"} for i in range(n)]


def stream(tokenizer, shuffle_buffer_size=8, seed=0, **data):
    data_args = SimpleNamespace(dataset_name=None, dataset_config=None, column_mapping=None, dataset_mixture=None,
                                max_train_samples=None, max_eval_samples=None, skip_bad_records=False,
                                shuffle_buffer_size=shuffle_buffer_size, dataset_num_proc=None)
    vars(data_args).update(data)
    args = SimpleNamespace(max_steps=10, dataloader_num_workers=0, data_seed=None, seed=seed, max_length=None,
                           trained_turns="all", world_size=1)
    _, raw, spec = load_streams(data_args, args, tokenizer, get_template("alpaca"))
    return raw, spec


def first_words(tokenizer, rows):
    """The instruction each row was made from (its first tokens decode to the Alpaca preamble + instruction)."""
    texts = [tokenizer.decode(r["input_ids"]) for r in rows]
    return [t.split("### Instruction:\n")[1].split("\n")[0] for t in texts]


def test_a_pass_is_every_record_once_shuffled_in_blocks_deterministically(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", records(20))
    _, spec = stream(bpe_tokenizer, shuffle_buffer_size=8, dataset_name=path)
    rows = list(itertools.islice(process_rows(0, spec, 1), 40))
    names = first_words(bpe_tokenizer, rows)
    # blocks of 8 records, each shuffled; passes follow each other (20 records: block 2 holds 4 of the first pass
    # and 4 of the second)
    assert sorted(names[:8]) == sorted(f"r {i}" for i in range(8)) and names[:8] != [f"r {i}" for i in range(8)]
    assert sorted(names[16:24]) == sorted([f"r {i}" for i in range(16, 20)] + [f"r {i}" for i in range(4)])
    assert [r["stream_position"] for r in rows[:9]] == [[0, j] for j in range(8)] + [[1, 0]]
    _, same = stream(bpe_tokenizer, shuffle_buffer_size=8, dataset_name=path)
    assert first_words(bpe_tokenizer, itertools.islice(process_rows(0, same, 1), 40)) == names
    _, other = stream(bpe_tokenizer, shuffle_buffer_size=8, seed=1, dataset_name=path)
    assert first_words(bpe_tokenizer, itertools.islice(process_rows(0, other, 1), 40)) != names
    _, ordered = stream(bpe_tokenizer, shuffle_buffer_size=0, dataset_name=path)
    assert first_words(bpe_tokenizer, itertools.islice(process_rows(0, ordered, 1), 25)) == [
        f"r {i % 20}" for i in range(25)]


def test_a_stream_resumes_at_the_row_after_the_last_one_trained(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", records(30))
    _, spec = stream(bpe_tokenizer, shuffle_buffer_size=7, dataset_name=path)
    straight = list(itertools.islice(process_rows(0, spec, 1), 50))
    for trained in (1, 6, 7, 13, 33):  # inside a block, at its last row, in the second pass
        _, first = stream(bpe_tokenizer, shuffle_buffer_size=7, dataset_name=path)
        rows = process_rows(0, first, 1)
        seen = list(itertools.islice(rows, trained + 3))  # the dataloader reads ahead of what is trained
        state = first.positions[0].resume_state(seen[trained - 1]["stream_position"])
        state = json.loads(json.dumps(state))  # as trainer_state.json holds it
        _, resumed = stream(bpe_tokenizer, shuffle_buffer_size=7, dataset_name=path)
        resumed.start[0] = state
        again = list(itertools.islice(process_rows(0, resumed, 1), 50 - trained))
        assert [r["input_ids"] for r in again] == [r["input_ids"] for r in straight[trained:]], trained


def test_a_streamed_mixture_takes_counts_exactly_and_weights_within_bounds(tmp_path, bpe_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", records(50, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", records(50, "b"))
    _, spec = stream(bpe_tokenizer, shuffle_buffer_size=0, dataset_mixture=[{"path": a, "count": 30},
                                                                            {"path": b, "count": 10}])
    rows = list(itertools.islice(process_rows(0, spec, 1), 80))
    first_pass, second = [r["source"] for r in rows[:40]], [r["source"] for r in rows[40:]]
    assert (first_pass.count(0), first_pass.count(1)) == (30, 10) == (second.count(0), second.count(1))
    names = first_words(bpe_tokenizer, rows[:40])
    assert [n for n in names if n.startswith("a")] == [f"a {i}" for i in range(30)]  # each source's first records
    # weights 1 : 3: each draw is source 1 with p = 3/4; 2,000 draws stay within 5 standard deviations
    _, spec = stream(bpe_tokenizer, shuffle_buffer_size=100, dataset_mixture=[{"path": a, "weight": 1},
                                                                              {"path": b, "weight": 3}])
    n = 2000
    sources = [r["source"] for r in itertools.islice(process_rows(0, spec, 1), n)]
    assert abs(sources.count(1) / n - 0.75) <= 5 * math.sqrt(0.75 * 0.25 / n)
    with pytest.raises(RecipeError, match="a stream's size is unknown, so every source takes a count"):
        stream(bpe_tokenizer, dataset_mixture=[{"path": a, "count": 3}, {"path": b}])
    with pytest.raises(RecipeError, match="a fraction needs the source's size"):
        stream(bpe_tokenizer, dataset_mixture=[{"path": a, "fraction": 0.5}])


def test_held_out_records_are_the_head_of_a_single_split_source(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", records(30))
    raw, spec = stream(bpe_tokenizer, shuffle_buffer_size=0, dataset_name=path, max_eval_samples=4)
    assert raw["test"]["instruction"] == [f"r {i}" for i in range(4)]
    assert raw["validation"]["instruction"] == [f"r {i}" for i in range(4, 8)]
    assert first_words(bpe_tokenizer, itertools.islice(process_rows(0, spec, 1), 3)) == ["r 8", "r 9", "r 10"]
    raw, _ = stream(bpe_tokenizer, dataset_name=path)
    assert len(raw["test"]) == len(raw["validation"]) == 0  # without max_eval_samples a stream holds none out


def test_a_bad_streamed_record_names_source_record_line_and_field(tmp_path, bpe_tokenizer):
    bad = records(12)
    bad[9] = {"instruction": "x", "output": 5}
    path = write_jsonl(tmp_path / "data.jsonl", bad)
    _, spec = stream(bpe_tokenizer, shuffle_buffer_size=4, dataset_name=path)
    with pytest.raises(DataError, match=rf"^{path}: record 9 \(line 10\), field 'output': expected text, got int 5$"):
        list(itertools.islice(process_rows(0, spec, 1), 12))
    _, spec = stream(bpe_tokenizer, shuffle_buffer_size=0, dataset_name=path, skip_bad_records=True)
    names = first_words(bpe_tokenizer, itertools.islice(process_rows(0, spec, 1), 12))
    assert names == [f"r {i}" for i in range(12) if i != 9] + ["r 0"]  # skipped, then the next pass
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"line 2, column 17: malformed JSON.*\n.*a stream cannot skip"):
        stream(bpe_tokenizer, dataset_name=str(malformed))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    return write_tiny_model(tmp / "model", dropout=0.1), write_tiny_dataset(tmp / "data.jsonl"), tmp


def test_a_streamed_run_trains_the_map_style_batches_to_the_same_losses(assets):
    model, data, tmp = assets
    common = dict(max_steps=6, train_split_ratio=1.0, test_split_ratio=0.0, per_device_train_batch_size=4,
                  learning_rate=5e-3)
    run_train(tiny_recipe_args(model, data, tmp / "mapped", train_sampling_strategy="sequential", **common))
    run_train(tiny_recipe_args(model, data, tmp / "streamed", streaming="true", shuffle_buffer_size=0, **common))
    mapped, streamed = train_losses(tmp / "mapped"), train_losses(tmp / "streamed")
    assert len(mapped) == 6 and mapped[-1] < mapped[0]
    torch.testing.assert_close(torch.tensor(streamed), torch.tensor(mapped), rtol=1e-6, atol=1e-6)




def test_a_streamed_run_killed_and_resumed_equals_one_never_interrupted(assets):
    model, data, tmp = assets
    # 80 records in shuffled blocks of 12, batches of 4: checkpoint 8 stops inside block 2; dropout: the RNG matters
    recipe = dict(max_steps=16, per_device_train_batch_size=4, streaming="true", shuffle_buffer_size=12,
                  save_strategy="steps", save_steps=4, learning_rate=5e-3)
    run_train(tiny_recipe_args(model, data, tmp / "straight", **recipe))
    crashed = tmp / "crashed"
    result = run_train(tiny_recipe_args(model, data, crashed, **recipe), prelude=CRASH_WHILE_SAVING_STEP_12,
                       check=False)
    assert result.returncode == -9, result.stderr[-3000:]
    saved = json.loads((crashed / "checkpoint-8" / "trainer_state.json").read_text())
    position = saved["stateful_callbacks"]["DataStateCallback"]["attributes"]["streams"]["0"]
    assert (position["block"], position["next"]) == (2, 8)  # 32 rows trained: block 2 (rows 24-35), 8 of them
    run_train(tiny_recipe_args(model, data, crashed, resume_from_checkpoint="true", **recipe))
    straight, resumed = train_losses(tmp / "straight"), train_losses(crashed)
    assert len(straight) == len(resumed) == 16
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight), rtol=1e-6, atol=1e-6)
    straight_weights, resumed_weights = load_weights(tmp / "straight"), load_weights(crashed)
    for name in straight_weights:
        torch.testing.assert_close(resumed_weights[name], straight_weights[name], rtol=1e-6, atol=1e-6, msg=name)


def test_two_processes_each_stream_their_own_share_and_resume_their_own_positions(assets):
    """Two processes of 4 rows each (every other record of the one-shard file) train what one process with batches
    of 8 trains on the records in file order: no record twice, none left out. Each process's position is gathered
    into the checkpoint and given back to it: resumed from checkpoint-4, the 2-process run trains steps 5-8 exactly
    as the run that went through."""
    import shutil

    _, data, tmp = assets
    model = write_tiny_model(tmp / "model_without_dropout")  # two processes draw other dropout masks than one
    common = dict(max_steps=8, train_split_ratio=1.0, test_split_ratio=0.0, learning_rate=5e-3)
    streamed = dict(streaming="true", shuffle_buffer_size=0, per_device_train_batch_size=4, save_strategy="steps",
                    save_steps=4, **common)
    config = str(ROOT / "accelerate_configs" / "cpu_2proc.yaml")
    run_train(tiny_recipe_args(model, data, tmp / "one", train_sampling_strategy="sequential",
                               per_device_train_batch_size=8, **common))
    run_train(tiny_recipe_args(model, data, tmp / "two", **streamed), accelerate_config=config)
    one, two = train_losses(tmp / "one"), train_losses(tmp / "two")
    assert len(one) == 8
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)

    saved = json.loads((tmp / "two" / "checkpoint-4" / "trainer_state.json").read_text())
    streams = saved["stateful_callbacks"]["DataStateCallback"]["attributes"]["streams"]
    # 4 steps × 4 rows per process: the 17th row of each process's share, in its first (unshuffled) block
    assert sorted(streams) == ["0", "1"] and all((s["block"], s["next"]) == (0, 16) for s in streams.values())
    resumed = tmp / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp / "two" / "checkpoint-4", resumed / "checkpoint-4")
    run_train(tiny_recipe_args(model, data, resumed, resume_from_checkpoint=str(resumed / "checkpoint-4"),
                               **streamed), accelerate_config=config)
    again = train_losses(resumed)
    assert len(again) == 8  # the checkpoint's log history, then steps 5-8
    torch.testing.assert_close(torch.tensor(again[4:]), torch.tensor(two[4:]), rtol=1e-6, atol=1e-6)


def test_streaming_without_max_steps_is_one_line(assets, capsys):
    from sft_hf import train
    from sft_hf.errors import run_cli

    model, data, tmp = assets
    assert run_cli(train.main, tiny_recipe_args(model, data, tmp / "no_steps", streaming="true")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: streaming: true needs max_steps (a stream has no length to count epochs in)")
    assert not (tmp / "no_steps").exists()


def test_inspect_shows_the_head_of_a_stream_as_training_reads_it(tmp_path, tiny_model_dir, capsys):
    from sft_hf.cli import main as cli_main
    from sft_hf.streaming import first_records

    path = write_jsonl(tmp_path / "data.jsonl", records(40))
    data_args = SimpleNamespace(dataset_name=path, dataset_config=None, column_mapping=None, dataset_mixture=None,
                                max_eval_samples=3, skip_bad_records=False)
    head = first_records(data_args, get_template("alpaca"), 2)
    assert head["test"]["instruction"] == ["r 0", "r 1"] and head["validation"]["instruction"] == ["r 3", "r 4"]
    assert head["train"]["instruction"] == ["r 6", "r 7"]  # where the run's stream starts (after 2 × 3 held out)
    code = cli_main(["inspect", "--model_name_or_path", tiny_model_dir, "--dataset_name", path, "--streaming", "true",
                     "--n", "2", "--html", str(tmp_path / "inspect.html"), "--output_dir", str(tmp_path)])
    assert code == 0 and "2 examples:" in capsys.readouterr().out
