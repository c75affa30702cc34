"""`sft-hf inspect`: the HTML shows every token with the exact label the collator produced.

Expected masks are derived here straight from the tokenizer (prompt ids, response ids, EOS), not from the pipeline.
"""
import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import yaml
from datasets import Dataset
from transformers import AutoTokenizer

from sft_hf.cli import main as cli_main
from sft_hf.collator import IGNORE_INDEX, InstructionDataCollator
from sft_hf.inspection.examples import build_views, render_html, render_terminal
from sft_hf.templates import get_template
from sft_hf.builtin.toy import train_bpe_tokenizer

RECORDS = [
    {"instruction": "Reverse the words.", "input": "red green blue", "output": "blue green red"},
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Translate to French.", "input": "good morning my friend", "output": "bonjour mon ami"},
]
ALPACA = get_template("alpaca")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [ALPACA.format_prompt(r) + r["output"] for r in RECORDS] * 3
    folder = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(texts, vocab_size=300).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)  # the normal loading path, as load_tokenizer does


def expected_ids(tokenizer, record):
    """(prompt ids, response ids + EOS), straight from the tokenizer."""
    prompt = tokenizer(ALPACA.format_prompt(record))["input_ids"]
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, response


class TokenSpans(HTMLParser):
    """Collects the examples of the page and, for each, its token spans' attributes."""

    def __init__(self):
        super().__init__()
        self.examples, self.cuts = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if "example" in classes:
            self.examples.append({**attrs, "tokens": []})
        elif "tok" in classes and "data-pos" in attrs:
            self.examples[-1]["tokens"].append({
                "pos": int(attrs["data-pos"]), "id": int(attrs["data-id"]), "label": int(attrs["data-label"]),
                "kind": classes[1], "eos": "eos" in classes,
            })
        elif "cut" in classes and self.examples:
            self.cuts.append((len(self.examples) - 1, attrs["data-cut"]))


def parse(page: str) -> TokenSpans:
    parser = TokenSpans()
    parser.feed(page)
    return parser


def views_html(tokenizer, records, collator, max_length=None, batch_size=8):
    views = build_views(Dataset.from_list(records), tokenizer, ALPACA, max_length, collator, batch_size)
    return views, parse(render_html(views, {"test": 1}, max_length))


def test_completion_only_masks_padding_and_eos_exactly(tokenizer):
    collator = InstructionDataCollator(pad_token_id=tokenizer.eos_token_id, completion_only_loss=True)
    _, page = views_html(tokenizer, RECORDS, collator)
    lengths = [sum(len(part) for part in expected_ids(tokenizer, r)) for r in RECORDS]
    width = max(lengths)
    assert len(page.examples) == 3
    for record, example, length in zip(RECORDS, page.examples, lengths):
        prompt, response = expected_ids(tokenizer, record)
        ids = prompt + response
        tokens = example["tokens"]
        assert len(tokens) == width  # padded to the batch's longest row
        assert [t["id"] for t in tokens[:length]] == ids
        padding = [IGNORE_INDEX] * (width - length)
        assert [t["label"] for t in tokens] == [IGNORE_INDEX] * len(prompt) + response + padding
        assert [t["kind"] for t in tokens] == (
            ["masked"] * len(prompt) + ["trained"] * len(response) + ["padding"] * (width - length))
        # pad == eos here: only the row's own EOS is marked EOS (and trained), the padding after it is not
        assert [t["pos"] for t in tokens if t["eos"]] == [length - 1]
        assert tokens[length - 1]["label"] == tokenizer.eos_token_id
        assert int(example["data-trained"]) == len(response)
        assert int(example["data-padding"]) == width - length
    assert sum(int(e["data-padding"]) for e in page.examples) > 0  # the fixture does pad something


def test_full_sequence_loss_trains_everything_but_the_first_token(tokenizer):
    collator = InstructionDataCollator(pad_token_id=tokenizer.eos_token_id, completion_only_loss=False)
    _, page = views_html(tokenizer, RECORDS[:1], collator)
    prompt, response = expected_ids(tokenizer, RECORDS[0])
    tokens = page.examples[0]["tokens"]
    assert [t["label"] for t in tokens] == prompt + response  # the collator's labels: the ids themselves
    # the model predicts token k from tokens < k: position 0 is never a target, whatever its label
    assert [t["kind"] for t in tokens] == ["masked"] + ["trained"] * (len(prompt) + len(response) - 1)


class MaskByPadId(InstructionDataCollator):
    """The classic bug: labels masked by comparing ids with the pad id, which is also the EOS id."""

    def __call__(self, features):
        batch = super().__call__(features)
        batch["labels"][batch["input_ids"] == self.pad_token_id] = IGNORE_INDEX
        return batch


def test_a_masked_stop_token_shows_as_untrained(tokenizer):
    collator = MaskByPadId(pad_token_id=tokenizer.eos_token_id, completion_only_loss=True)
    views, page = views_html(tokenizer, RECORDS, collator)
    for record, example in zip(RECORDS, page.examples):
        prompt, response = expected_ids(tokenizer, record)
        eos = [t for t in example["tokens"] if t["eos"]]
        assert len(eos) == 1 and eos[0]["pos"] == len(prompt) + len(response) - 1
        assert eos[0]["label"] == IGNORE_INDEX and eos[0]["kind"] == "masked"
        assert int(example["data-trained"]) == len(response) - 1  # the response without its stop token
    # the terminal view says the same: the EOS is not followed by a label id
    from rich.console import Console

    console = Console(record=True, width=200, color_system=None)
    render_terminal(views, console=console)
    text = console.export_text()
    assert f"<|endoftext|>({tokenizer.eos_token_id})" not in text and "<|endoftext|>" in text


def test_truncation_and_drops_are_marked(tokenizer):
    long_prompt = {"instruction": "Translate to French. " * 6, "input": "good morning", "output": "bonjour"}
    long_answer = {"instruction": "Say it.", "input": "", "output": "blue green red " * 20}
    records = [RECORDS[1], long_answer, long_prompt]
    lengths = [sum(map(len, expected_ids(tokenizer, r))) for r in records]
    max_length = lengths[0] + 2  # the first fits, the third's prompt is cut, the second's response cannot fit
    assert lengths[2] > max_length and len(expected_ids(tokenizer, long_answer)[1]) > max_length
    collator = InstructionDataCollator(pad_token_id=tokenizer.eos_token_id, completion_only_loss=True,
                                       max_length=max_length)
    views, page = views_html(tokenizer, records, collator, max_length=max_length)
    fits, dropped, cut = page.examples
    assert (fits["data-dropped"], dropped["data-dropped"], cut["data-dropped"]) == ("0", "1", "0")
    assert dropped["tokens"] == [] and "DROPPED" in render_html(views, max_length=max_length)
    assert int(cut["data-cut-left"]) == lengths[2] - max_length and int(fits["data-cut-left"]) == 0
    assert page.cuts == [(2, "left")]
    prompt, response = expected_ids(tokenizer, long_prompt)
    kept_prompt = prompt[lengths[2] - max_length :]  # the prompt's end survives, the response is whole
    real = [t for t in cut["tokens"] if t["kind"] != "padding"]
    assert [t["id"] for t in real] == kept_prompt + response
    assert [t["label"] for t in real] == [IGNORE_INDEX] * len(kept_prompt) + response
    # the kept examples share one batch: the shorter one is padded to max_length
    assert len(fits["tokens"]) == max_length and int(fits["data-padding"]) == max_length - lengths[0]


@pytest.mark.parametrize("multiple", [None, 8])
def test_padding_free_rows_are_split_back_into_examples(tokenizer, multiple):
    collator = InstructionDataCollator(pad_token_id=tokenizer.eos_token_id, completion_only_loss=True,
                                       padding_free=True, pad_to_multiple_of=multiple)
    _, page = views_html(tokenizer, RECORDS, collator)
    assert len(page.examples) == len(RECORDS)  # the filler up to the multiple is not shown as an example
    for record, example in zip(RECORDS, page.examples):
        prompt, response = expected_ids(tokenizer, record)
        assert [t["id"] for t in example["tokens"]] == prompt + response
        assert [t["label"] for t in example["tokens"]] == [IGNORE_INDEX] * len(prompt) + response
        assert example["data-padding"] == "0"


@pytest.mark.parametrize("trained_turns", ["all", "last"])
def test_multi_turn_chat_shows_roles_and_trains_each_reply(tokenizer, trained_turns):
    chatml = get_template("chatml")  # with this tokenizer, an assistant turn ends with its EOS <|endoftext|>
    record = {"messages": [
        {"role": "user", "content": "Name a primary color."}, {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "blue"},
    ]}
    collator = InstructionDataCollator(pad_token_id=tokenizer.eos_token_id, completion_only_loss=True)
    views = build_views(Dataset.from_list([record]), tokenizer, chatml, None, collator, batch_size=1,
                        trained_turns=trained_turns)
    page = render_html(views)
    (example,) = parse(page).examples
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tokenizer.eos_token_id]
    parts = [("user", ids("<|im_start|>user\nName a primary color.<|im_end|>\n"), False),
             ("assistant", ids("<|im_start|>assistant\n"), False), ("assistant", ids("Red.") + eos, True),
             ("assistant", ids("\n"), False), ("user", ids("<|im_start|>user\nAnother one?<|im_end|>\n"), False),
             ("assistant", ids("<|im_start|>assistant\n"), False), ("assistant", ids("blue") + eos, True)]
    trained = [t for _, p, reply in parts for t in p if reply]
    if trained_turns == "last":
        parts = [(r, p, reply and k == len(parts) - 1) for k, (r, p, reply) in enumerate(parts)]
    assert [t["id"] for t in example["tokens"]] == [t for _, p, _ in parts for t in p]
    assert [t["kind"] for t in example["tokens"]] == [
        "trained" if reply else "masked" for _, p, reply in parts for _ in p]
    assert len(trained) == len(ids("Red.")) + len(ids("blue")) + 2
    # a blue marker per message: role, its tokens, how many are trained
    markers = re.findall(r'class="role" data-role="(\w+)" data-tokens="(\d+)" data-trained="(\d+)"', page)
    n = [len(parts[0][1]), sum(len(p) for _, p, _ in parts[1:4]), len(parts[4][1]), sum(len(p) for _, p, _ in parts[5:])]
    first_trained = 0 if trained_turns == "last" else len(ids("Red.")) + 1
    assert markers == [("user", str(n[0]), "0"), ("assistant", str(n[1]), str(first_trained)),
                       ("user", str(n[2]), "0"), ("assistant", str(n[3]), str(len(ids("blue")) + 1))]


def test_cli_inspect_uses_the_recipe_arguments(tokenizer, tmp_path, capsys):
    records = [{"instruction": f"Reverse the words {i}.", "input": "red green", "output": "green red"}
               for i in range(10)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "inspect.html"
    code = cli_main(["inspect", "--n", "2", "--html", str(out), "--dataset_name", str(data), "--model_name_or_path",
                     str(tmp_path / "tok"), "--completion_only_loss", "false", "--max_length", "512",
                     "--output_dir", str(tmp_path)])
    assert code == 0
    page = parse(out.read_text())
    assert [e["data-index"] for e in page.examples] == ["0", "1"]
    prompt, response = expected_ids(tokenizer, records[0])
    assert [t["label"] for t in page.examples[0]["tokens"] if t["kind"] != "padding"] == prompt + response
    assert "completion_only_loss <code>False</code>" in out.read_text()
    terminal = capsys.readouterr().out
    assert re.search(r"train\[0\] · \d+ tokens", terminal) and "train[1]" in terminal and "train[2]" not in terminal


def test_inspect_and_report_take_a_recipe_as_train_does(tokenizer, tmp_path, capsys):
    """A --dataset_name on the command line replaces the recipe's mixture (train's rule), and values a run cannot
    use are refused, in `sft-hf inspect` and `sft-hf report` alike."""
    records = [{"instruction": f"Name color {i}.", "input": "", "output": "red"} for i in range(10)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer.save_pretrained(tmp_path / "tok")
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": str(tmp_path / "tok"), "output_dir": str(tmp_path),
                                      "dataset_mixture": [{"path": "elsewhere.jsonl", "fraction": 0.5}]}))
    page = tmp_path / "inspect.html"
    assert cli_main(["inspect", "--config", str(recipe), "--dataset_name", str(data), "--n", "1",
                     "--html", str(page)]) == 0
    assert f"<code>{data}</code>" in page.read_text() and "elsewhere" not in page.read_text()
    assert re.search(r"train\[0\] · \d+ tokens", capsys.readouterr().out)
    assert cli_main(["report", "--config", str(recipe), "--dataset_name", str(data),
                     "--out_dir", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["splits"]["train"]["examples"] == 8
    for command in ("inspect", "report"):
        assert cli_main([command, "--config", str(recipe), "--dataset_name", str(data),
                         "--per_device_train_batch_size", "0"]) == 2
        assert capsys.readouterr().err.strip() == ("error: command line: per_device_train_batch_size must be at least "
                                                   "1, got 0")


def test_module_entry_point_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "sft_hf"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "inspect" in result.stderr and "report" in result.stderr
