"""Tiny offline assets for the scale tests: a hidden-32 Llama + BPE tokenizer and a small toy-task dataset,
and a helper that runs recipes/train.py in a subprocess (optionally through `accelerate launch`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "recipes" / "train.py")
GOOD = {"instruction": "Add one.", "input": "2", "output": "3"}  # an Alpaca record that passes every check

# A `run_train` prelude: killed inside Trainer._save_checkpoint for step 12, the weights and optimizer of
# checkpoint-12 are on disk, its RNG and trainer state are not. SIGKILL: no Python cleanup, no atexit, like the OOM
# killer or a preempted node.
CRASH_WHILE_SAVING_STEP_12 = """
import os, signal
from transformers import Trainer
save_rng_state = Trainer._save_rng_state
def crash_while_saving(self, output_dir):
    if self.state.global_step == 12:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng_state(self, output_dir)
Trainer._save_rng_state = crash_while_saving
"""


def write_jsonl(path: Path, lines: list) -> str:
    """`lines` items are dicts (dumped as JSON) or raw str/bytes lines written as they are."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def write_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, dropout: float = 0.0) -> str:
    import torch
    import transformers

    from sft_hf.templates import get_template
    from sft_hf.builtin.toy import make_toy_records, train_bpe_tokenizer

    template = get_template("alpaca")
    texts = [template.format_prompt(r) + r["output"] for r in make_toy_records(300, seed=7)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    common = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=None)
    if arch == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                          attention_dropout=dropout, tie_word_embeddings=False, **common)
    elif arch == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=dropout,
                                         embd_pdrop=dropout, attn_pdrop=dropout, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_tiny_dataset(path: Path, n: int = 80, seed: int = 3) -> str:
    from sft_hf.builtin.toy import make_toy_records

    path.write_text("".join(json.dumps(r) + "\n" for r in make_toy_records(n, seed=seed)))
    return str(path)


def tiny_recipe_args(model: str, data: str, output_dir: Path, **overrides) -> list[str]:
    """Flags for recipes/train.py: 80 records → 64 train, 8 test, 8 validation, no generation, fp32, deterministic."""
    recipe = dict(
        model_name_or_path=model, dataset_name=data, output_dir=str(output_dir), template="alpaca",
        train_split_ratio=0.8, test_split_ratio=0.1, max_length=64, completion_only_loss=True,
        learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, num_train_epochs=1, max_steps=-1,
        logging_steps=1, eval_strategy="no", save_strategy="no", eval_exact_match=False, seed=42,
        precision="fp32", dataloader_num_workers=0, report_to="none", train_sampling_strategy="random",
        disable_tqdm=True,
    )
    recipe.update(overrides)
    argv = []
    for key, value in recipe.items():
        argv += [f"--{key}", str(value)]
    return argv


def run_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def run_train(argv: list[str], accelerate_config: str | None = None, prelude: str | None = None,
              check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python recipes/train.py ...`, or `accelerate launch --config_file X recipes/train.py ...`.
    `prelude` is Python run in the training process before train.py (e.g. to make it crash at a chosen step)."""
    script = [TRAIN]
    if prelude is not None:
        script = ["-c", prelude + f"\nimport runpy, sys\nsys.argv = [{TRAIN!r}] + sys.argv[1:]\n"
                                  f"runpy.run_path({TRAIN!r}, run_name='__main__')\n"]
    if accelerate_config:
        if prelude is not None:
            raise ValueError("prelude is for plain python runs")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config] + script
    else:
        cmd = [sys.executable] + script
    result = subprocess.run(cmd + argv, env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def train_losses(output_dir: Path) -> list[float]:
    state = json.loads(Path(output_dir, "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def load_weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder, "model.safetensors")))


def train_argv(tiny, out, *extra):
    """Flags for a 2-step run of conftest.py's `tiny` model and data, saving a checkpoint every step."""
    return ["--model_name_or_path", tiny["model"], "--dataset_name", tiny["data"], "--output_dir", str(out),
            "--max_steps", "2", "--eval_exact_match", "false", "--eval_strategy", "no", "--logging_steps", "1",
            "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "1",
            "--learning_rate", "1e-3", "--warmup_steps", "0", "--report_to", "none", *extra]


def run_or_kill_group(cmd: list[str], timeout: int, what: str) -> subprocess.CompletedProcess:
    """Run `cmd` (a launcher and the processes it starts) in a session of its own; still going after `timeout`
    seconds, it is killed with all its processes and the test fails: a hang is a failure, not a stuck suite."""
    import pytest

    process = subprocess.Popen(cmd, env=run_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{what} hung for {timeout} s:\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
