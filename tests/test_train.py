"""The training run (sft_hf/train.py, `accelerate launch recipes/train.py`) end to end: the shortened default recipe
learns and saves a standard HF model; bad data is one line before any training; Ctrl-C says what is kept."""
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_hf import train as train_recipe  # noqa: E402  (recipes/train.py runs it)
from sft_hf.errors import run_cli
from sft_hf.run.safety import staging_dir
from sft_hf.templates import get_template
from sft_hf.trainer import InstructionTrainer

from tiny_setup import GOOD, ROOT, train_argv, write_jsonl


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


def test_ctrl_c_says_in_one_line_what_is_kept_and_how_to_go_on(tiny, tmp_path, capsys, monkeypatch):
    from transformers.trainer_callback import CallbackHandler

    on_step_end = CallbackHandler.on_step_end

    def ctrl_c_at_step_3(self, args, state, control):  # Ctrl-C during training, after checkpoint-2 was saved
        if state.global_step == 3:
            raise KeyboardInterrupt
        return on_step_end(self, args, state, control)

    out = tmp_path / "out"
    monkeypatch.setattr(CallbackHandler, "on_step_end", ctrl_c_at_step_3)
    assert run_cli(train_recipe.main, train_argv(tiny, out, "--max_steps", "5")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: interrupted at step 3 of 5; {out / 'checkpoint-2'} is the newest complete checkpoint: run the same "
        "command with --resume_from_checkpoint true to go on from it")
    assert not (out / "config.json").exists() and not staging_dir(out).exists()  # no final model: training stopped

    # Ctrl-C during the evaluation after training: the trained model was saved before it, and says what it lacks
    monkeypatch.setattr(CallbackHandler, "on_step_end", on_step_end)
    monkeypatch.setattr(InstructionTrainer, "evaluate", lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    argv = train_argv(tiny, out, "--max_steps", "5", "--resume_from_checkpoint", "true")
    (out / "README.md").write_text("a card of an earlier model\n")  # must not be left describing the new one
    assert run_cli(train_recipe.main, argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: interrupted after training: the trained model is saved in {out}, without this run's evaluation, "
        "metrics and model card")
    assert json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["global_step"] == 5
    AutoModelForCausalLM.from_pretrained(out)  # loads
    assert not (out / "README.md").exists() and not (out / "all_results.json").exists()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "run"
    cmd = [sys.executable, str(ROOT / "recipes/train.py"), "--output_dir", str(out), "--max_steps", "500",
           "--eval_steps", "250", "--logging_steps", "50"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_shortened_default_recipe_learns(default_run):
    out, stdout = default_run
    results = json.loads((out / "all_results.json").read_text())
    assert results["baseline_exact_match"] <= 0.02  # a randomly initialised model answers nothing right
    # 500 of the default 1000 steps
    assert results["eval_exact_match"] >= 0.9  # 1.000 here (0.985 with 600: the last few answers come and go)
    assert "Before training: exact match on 200 held-out instructions: 0.0" in stdout
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < 0.6 * losses[0]
    logged = [h for h in state["log_history"] if "train_tokens_per_second" in h]
    # padding-free rows: only the filler that rounds each row of ~800 tokens up to a multiple of 8 tokens (32 with
    # bf16 weights on a CPU with native bf16), where padded batches would be ~20% padding
    assert logged and all(0 <= h["padding_fraction"] < 0.04 for h in logged)


def test_saved_model_is_standard_hf_format(default_run):
    from transformers import AutoModelForCausalLM, GenerationConfig, pipeline

    out, _ = default_run
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "sft_template.json",
                 "README.md", "loss_curve.png", "all_results.json", "trainer_state.json", "test_responses.json"):
        assert (out / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == tokenizer.eos_token_id and generation.pad_token_id == tokenizer.pad_token_id
    assert json.loads((out / "sft_template.json").read_text())["name"] == "alpaca"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "eval_exact_match" in card

    # the pipeline reproduces the greedy responses the recipe recorded for the held-out set

    records = json.loads((out / "test_responses.json").read_text())[:5]
    generate = pipeline("text-generation", model=str(out))
    for record in records:
        prompt = get_template("alpaca").format_prompt(record)
        text = generate(prompt, max_new_tokens=16, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert text.strip() == record["model_response"]
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 1_000_000
