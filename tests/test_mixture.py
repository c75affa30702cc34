"""`dataset_mixture`: the recipe key, the counts and shares each source gives (exact for fractions and counts, within
stated bounds for weights), records of every format under one template, held-out splits per source, errors that name
the source, line and field, and the per-source counts of a training run (log, metrics, model card, report)."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from datasets import Dataset

from sft_hf.data import DataError, load_instruction_dataset, load_recipe_splits
from sft_hf.errors import RecipeError
from sft_hf.mixture import load_mixture, parse_mixture
from sft_hf.run.config import parse_recipe, save_recipe
from sft_hf.templates import get_template
from sft_hf.tokenization import tokenize_dataset
from tiny_setup import run_train, tiny_recipe_args, write_jsonl, write_tiny_model



def alpaca(n, tag="a"):
    return [{"instruction": f"{tag} task {i}", "input": f"in {i}" if i % 3 else "", "output": f"{tag} answer {i}"}
            for i in range(n)]


def chat(n):
    return [{"messages": [{"role": "user", "content": f"chat question {i}"},
                          {"role": "assistant", "content": f"chat reply {i}"}]} for i in range(n)]


def sharegpt(n):
    return [{"conversations": [{"from": "human", "value": f"sg question {i}"},
                               {"from": "gpt", "value": f"sg reply {i}"}]} for i in range(n)]


def prompt_completion(n):
    return [{"prompt": f"pc prompt {i}", "completion": f"pc completion {i}"} for i in range(n)]


def data_args(sources, **overrides):
    values = dict(dataset_mixture=sources, train_split_ratio=0.8, test_split_ratio=0.1, shuffle_seed=None,
                  skip_bad_records=False, max_train_samples=None, max_eval_samples=None, dataset_num_proc=None)
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture
def files(tmp_path):
    return {"alpaca": write_jsonl(tmp_path / "alpaca.jsonl", alpaca(200)),
            "chat": write_jsonl(tmp_path / "chat.jsonl", chat(100)),
            "sharegpt": write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt(50)),
            "pc": write_jsonl(tmp_path / "pc.jsonl", prompt_completion(40))}


def test_fractions_and_counts_take_exact_numbers_in_file_order_deterministically(files):
    sources = [{"path": files["alpaca"], "fraction": 0.25}, {"path": files["chat"], "count": 30},
               {"path": files["sharegpt"]}]
    mixed = load_mixture(data_args({"seed": 7, "sources": sources}), get_template("chatml"))
    # each source split alone (80 / 10 / 10 %), then its share of its 160 / 80 / 40 train records
    assert [(s.available, s.taken, s.validation, s.test) for s in mixed.sources] == [
        (160, 40, 20, 20), (80, 30, 10, 10), (40, 40, 5, 5)]
    assert mixed["train"]["source"] == [0] * 40 + [1] * 30 + [2] * 40
    texts = [m[0]["content"] for m in mixed["train"]["messages"]]
    alpaca_taken = [int(t.split()[2]) for t in texts[:40]]
    assert alpaca_taken == sorted(alpaca_taken) and len(set(alpaca_taken)) == 40  # a subset, in file order
    assert set(alpaca_taken) <= set(range(160))  # from the train split only
    again = load_mixture(data_args({"seed": 7, "sources": sources}), get_template("chatml"))
    assert again["train"]["messages"] == mixed["train"]["messages"]
    other = load_mixture(data_args({"seed": 8, "sources": sources}), get_template("chatml"))
    assert other["train"]["messages"] != mixed["train"]["messages"]
    # rounding: half up (0.25 × 162 = 40.5 → 41)
    odd = write_jsonl(files["alpaca"].replace("alpaca.jsonl", "odd.jsonl"), alpaca(162))
    assert len(load_mixture(data_args([{"path": odd, "fraction": 0.25}], train_split_ratio=1.0, test_split_ratio=0.0),
                            get_template("alpaca"))["train"]) == 41


def test_weights_interleave_with_over_sampling_within_bounds(files):
    # 160 and 40 train records, weights 1 : 1. Records are drawn until both sources have been drawn completely at
    # least once: the small one repeats. Each draw is source 0 with p = 1/2, so the share of source 0 among n draws
    # is within 5 standard deviations of 1/2 (a bound that fails by chance with probability < 1e-6).
    sources = [{"path": files["alpaca"], "weight": 1}, {"path": files["sharegpt"], "weight": 1}]
    mixed = load_mixture(data_args({"seed": 3, "sources": sources}), get_template("chatml"))
    n = len(mixed["train"])
    counts = [mixed["train"]["source"].count(k) for k in (0, 1)]
    assert counts[0] >= 160 and counts[1] >= 40 and sum(counts) == n  # every record at least once
    assert abs(counts[0] / n - 0.5) <= 5 * math.sqrt(0.25 / n)
    assert mixed.sources[1].taken == counts[1] and mixed.sources[1].taken > 40  # over-sampled, and said so
    assert "(×" in mixed.sources[1].line()
    first = {m[0]["content"] for m, s in zip(mixed["train"]["messages"], mixed["train"]["source"]) if s == 0}
    assert len(first) == 160  # every alpaca train record is in
    again = load_mixture(data_args({"seed": 3, "sources": sources}), get_template("chatml"))
    assert again["train"]["source"] == mixed["train"]["source"]
    # weights 3 : 1 over two sources of 160: draws stop when the lighter one is exhausted once (~640 draws)
    sources = [{"path": files["alpaca"], "weight": 3}, {"path": files["alpaca"].replace("alpaca", "alpaca2"),
                                                        "weight": 1}]
    write_jsonl(files["alpaca"].replace("alpaca.jsonl", "alpaca2.jsonl"), alpaca(200, tag="b"))
    mixed = load_mixture(data_args({"seed": 5, "sources": sources}), get_template("alpaca"))
    n = len(mixed["train"])
    share = mixed["train"]["source"].count(0) / n
    assert abs(share - 0.75) <= 5 * math.sqrt(0.75 * 0.25 / n)


def test_every_format_mixes_under_one_template_with_the_tokens_it_has_alone(files, bpe_tokenizer):
    sources = [{"path": files[name]} for name in ("alpaca", "chat", "sharegpt", "pc")]
    for template, columns in (("chatml", ["messages", "source"]), ("alpaca", ["instruction", "input", "output",
                                                                              "source"])):
        mixed = load_mixture(data_args(sources, train_split_ratio=1.0, test_split_ratio=0.0), get_template(template))
        assert mixed["train"].column_names == columns
        assert [s.taken for s in mixed.sources] == [200, 100, 50, 40]
        rows = tokenize_dataset(mixed["train"], bpe_tokenizer, template, max_length=None, verbose=False)
        assert rows["source"] == mixed["train"]["source"]
        start = 0
        for name, n in (("alpaca", 200), ("chat", 100), ("sharegpt", 50), ("pc", 40)):
            alone = load_instruction_dataset(files[name], train_split_ratio=1.0, test_split_ratio=0.0,
                                             template=template)["train"]
            expected = tokenize_dataset(alone, bpe_tokenizer, template, max_length=None, verbose=False)
            assert rows["input_ids"][start : start + n] == expected["input_ids"], (template, name)
            assert rows["completion_mask"][start : start + n] == expected["completion_mask"], (template, name)
            start += n


def test_held_out_splits_come_from_each_source(tmp_path, files):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", alpaca(30, "h"))
    write_jsonl(folder / "test.jsonl", alpaca(7, "t"))
    sources = [{"path": files["alpaca"], "count": 10, "train_split_ratio": 0.5, "test_split_ratio": 0.25},
               {"path": str(folder)}]
    mixed = load_mixture(data_args(sources), get_template("alpaca"))
    # the file: its own ratios (100 / 50 / 50 of 200); the folder: its own train and test splits, no validation
    assert [(s.available, s.taken, s.validation, s.test) for s in mixed.sources] == [(100, 10, 50, 50), (30, 30, 0, 7)]
    assert mixed["test"]["instruction"][50:] == [f"t task {i}" for i in range(7)]
    assert set(mixed["test"]["instruction"][:50]) == {f"a task {i}" for i in range(100, 150)}  # the next 25 %
    capped = load_mixture(data_args(sources, max_eval_samples=4), get_template("alpaca"))
    assert capped["test"]["source"] == [0] * 4 + [1] * 4  # max_eval_samples per source
    assert capped["validation"]["source"] == [0] * 4
    recipe_splits = load_recipe_splits(data_args(sources, max_eval_samples=4, max_train_samples=12),
                                       get_template("alpaca"))
    assert len(recipe_splits["test"]) == 8 and len(recipe_splits["train"]) == 12
    assert set(recipe_splits["train"]["source"]) == {0, 1}  # a mixed sample, not the first source's head


def test_a_bad_record_names_its_source_line_and_field(tmp_path, files):
    bad = chat(5)
    bad[3] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}
    path = write_jsonl(tmp_path / "bad_chat.jsonl", bad)
    with pytest.raises(DataError, match=rf"^{path}: record 3 \(line 4\), field 'messages', message 1, 'content': "
                                        r"empty assistant turn$"):
        load_mixture(data_args([{"path": files["alpaca"]}, {"path": path}]), get_template("chatml"))
    mapped = write_jsonl(tmp_path / "qa.jsonl", [{"q": "a", "a": "b"}, {"q": "c", "a": 4}])
    with pytest.raises(DataError, match=r"record 1 \(line 2\), field 'a' \(column_mapping → 'output'\): expected text"):
        load_mixture(data_args([{"path": files["alpaca"]},
                                {"path": mapped, "column_mapping": {"q": "instruction", "a": "output"}}]),
                     get_template("alpaca"))
    mixed = load_mixture(data_args([{"path": files["alpaca"], "count": 5}, {"path": path}], skip_bad_records=True,
                                   train_split_ratio=1.0, test_split_ratio=0.0), get_template("chatml"))
    assert [(s.available, s.skipped) for s in mixed.sources] == [(200, 0), (4, 1)]
    with pytest.raises(DataError, match=r"count 500 is more than its 160 train records; .*weight to over-sample"):
        load_mixture(data_args([{"path": files["alpaca"], "count": 500}]), get_template("alpaca"))
    with pytest.raises(DataError, match=r"chat.jsonl:train_sft: no split 'train_sft' \(found \['train'\]\)"):
        load_mixture(data_args([{"path": files["chat"], "split": "train_sft"}]), get_template("chatml"))


@pytest.mark.parametrize("value, message", [
    ([{"path": "a.jsonl", "fraction": 0.5, "count": 3}], r"give one of fraction, count or weight, not fraction and"),
    ([{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}], r"every source needs one \(b.jsonl has none\)"),
    ([{"path": "a.jsonl", "fracton": 0.5}], r"source 0: unknown key 'fracton'; did you mean 'fraction'\?"),
    ([{"path": "a.jsonl", "fraction": 1.5}], r"fraction must be a number in \(0, 1\], got 1.5"),
    ([{"path": "a.jsonl", "count": 0}], r"count must be a whole number of records >= 1, got 0"),
    ([{"config": "x"}], r"source 0: needs a path"),
    ({"sources": [], "seed": 1}, r"expected a non-empty list of sources"),
    ({"sources": ["a.jsonl"], "sede": 1}, r"unknown key 'sede'"),
    ('[{"path": "a.jsonl",]', r"dataset_mixture is not valid JSON"),
])
def test_mixture_recipe_errors_are_one_line(value, message):
    with pytest.raises(RecipeError, match=message):
        parse_mixture(value)


def test_the_recipe_key_from_yaml_and_from_the_command_line(tmp_path, files):
    sources = [{"path": files["alpaca"], "fraction": 0.5}, {"path": files["chat"], "count": 20}]
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "builtin:tiny-llama", "template": "chatml",
                                      "dataset_mixture": {"seed": 4, "sources": sources}}))
    _, from_yaml, _ = parse_recipe(["--config", str(recipe)])
    _, from_cli, _ = parse_recipe(["--model_name_or_path", "builtin:tiny-llama", "--template", "chatml",
                                   "--dataset_mixture", json.dumps({"seed": 4, "sources": sources})])
    assert from_yaml.dataset_mixture == from_cli.dataset_mixture == {"seed": 4, "sources": sources}
    _, bare_list, _ = parse_recipe(["--model_name_or_path", "m", "--dataset_mixture", json.dumps(sources)])
    assert parse_mixture(bare_list.dataset_mixture).seed == 0
    # the saved recipe.yaml runs again as it was
    from sft_hf.run.config import parse_recipe_and_values

    *_, values = parse_recipe_and_values(["--config", str(recipe), "--learning_rate", "0.001"])
    save_recipe(values, tmp_path / "saved.yaml")
    assert parse_recipe(["--config", str(tmp_path / "saved.yaml")])[1].dataset_mixture == from_yaml.dataset_mixture
    # on the command line, one replaces the recipe's other
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "x.jsonl",
                                      "column_mapping": {"a": "b"}}))
    _, replaced, _ = parse_recipe(["--config", str(recipe), "--dataset_mixture", json.dumps(sources)])
    assert (replaced.dataset_name, replaced.column_mapping) == ("builtin:toy-tasks", None)
    with pytest.raises(RecipeError, match="give dataset_name or dataset_mixture, not both"):
        parse_recipe(["--model_name_or_path", "m", "--dataset_name", "x.jsonl",
                      "--dataset_mixture", json.dumps(sources)])
    with pytest.raises(RecipeError, match="^--dataset_mixture without --model_name_or_path"):
        parse_recipe(["--dataset_mixture", json.dumps(sources)])


def test_a_mixed_run_counts_each_source_in_log_metrics_card_and_report(tmp_path, files, capsys):
    from sft_hf.cli import main as cli_main

    model = write_tiny_model(tmp_path / "model")
    toy = tmp_path / "toy.jsonl"
    from sft_hf.builtin.toy import make_toy_records

    records = make_toy_records(120, seed=5)
    write_jsonl(toy, records[:60])
    toy_chat = write_jsonl(tmp_path / "toy_chat.jsonl", [
        {"messages": [{"role": "user", "content": r["instruction"] + " " + r["input"]},
                      {"role": "assistant", "content": r["output"]}]} for r in records[60:]])
    mixture = json.dumps([{"path": str(toy), "fraction": 0.5}, {"path": toy_chat, "count": 20}])
    argv = tiny_recipe_args(model, str(toy), tmp_path / "run", max_steps=5, per_device_train_batch_size=4)
    argv = argv[: argv.index("--dataset_name")] + argv[argv.index("--dataset_name") + 2:]
    result = run_train(argv + ["--dataset_mixture", mixture])
    out = tmp_path / "run"
    metrics = json.loads((out / "all_results.json").read_text())
    sources = metrics["sources"]
    assert [(s["available"], s["taken"], s["validation"], s["test"]) for s in sources] == [(48, 24, 6, 6),
                                                                                         (48, 20, 6, 6)]
    assert sum(s["examples_trained"] for s in sources) == 5 * 4  # every example of the 5 batches, by source
    assert sum(s["tokens_trained"] for s in sources) == metrics["train_trained_tokens"] > 0
    assert all(s["tokens"] > s["trained_tokens"] > 0 for s in sources)
    assert f"source {toy} (fraction 0.5): 24 of 48 train records" in result.stderr
    card = (out / "README.md").read_text()
    assert "on a mixture of 2 sources" in card
    assert f"| `{toy_chat}` | count 20 | 20 | 48 | {sources[1]['examples_trained']} | " in card
    code = cli_main(["report", "--model_name_or_path", model, "--template", "alpaca", "--max_length", "64",
                     "--train_split_ratio", "0.8", "--test_split_ratio", "0.1",
                     "--dataset_mixture", mixture, "--output_dir", str(tmp_path / "rep")])
    assert code == 0
    report = json.loads((tmp_path / "rep" / "data_report" / "report.json").read_text())
    assert [(s["taken"], s["tokens"], s["trained_tokens"]) for s in report["sources"]] == [
        (s["taken"], s["tokens"], s["trained_tokens"]) for s in sources]
    assert report["dataset_name"] == "a mixture of 2 sources"


def test_map_style_mixture_in_a_dataset_dict_keeps_types(files):
    """Sources whose messages carry different keys (tool calls in one) share one schema, nulls elsewhere."""
    tools = [{"messages": [{"role": "user", "content": "weather?"},
                           {"role": "assistant", "content": None, "tool_calls": [
                               {"type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                           {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}] * 5
    path = write_jsonl(Path(files["chat"]).with_name("tools.jsonl"), tools)
    mixed = load_mixture(data_args([{"path": files["chat"]}, {"path": path}], train_split_ratio=1.0,
                                   test_split_ratio=0.0), get_template("chatml"))
    assert mixed["train"][0]["messages"][1].get("tool_calls") is None
    assert mixed["train"][-1]["messages"][1]["tool_calls"][0]["function"]["name"] == "weather"
    assert isinstance(mixed["train"], Dataset)
