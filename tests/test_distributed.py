"""`accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` really runs 2 data-parallel processes on the
CPU and trains exactly like one process with the same global batch; FSDP on CPU processes is tried too."""
import json
import subprocess
import sys

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

from tiny_setup import ROOT, load_weights, run_env, run_train, tiny_recipe_args, train_losses, write_tiny_dataset, \
    write_tiny_model

CONFIGS = ROOT / "accelerate_configs"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    return write_tiny_model(tmp / "model"), write_tiny_dataset(tmp / "data.jsonl"), tmp


def test_every_config_parses():
    expected = {"cpu": 1, "cpu_2proc": 2, "single_gpu": 1, "multi_gpu": 8, "fsdp": 8, "deepspeed_zero2": 8,
                "deepspeed_zero3": 8, "multi_node": 16}
    for name, processes in expected.items():
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert config.num_processes == processes, name
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert load_config_from_file(str(CONFIGS / "deepspeed_zero3.yaml")).deepspeed_config["zero_stage"] == 3


def test_two_cpu_processes_match_one_padded_or_padding_free(assets):
    model, data, tmp = assets
    # 64 train records: one process with batch 8 and two processes with batch 4 each both take 8 optimizer steps
    # over the same 8 global batches; each process pads (or flattens) its own half, which must not change the loss.
    # The default (padding-free rows, sdpa_varlen attention, random order) must train exactly what padded batches do.
    runs = {"one": (8, "cpu", False), "two": (4, "cpu_2proc", False),
            "one_free": (8, "cpu", None), "two_free": (4, "cpu_2proc", None)}
    for name, (batch, config, padding_free) in runs.items():
        extra = {} if padding_free is None else {"padding_free": padding_free}
        run_train(tiny_recipe_args(model, data, tmp / name, per_device_train_batch_size=batch, max_length=128,
                                   **extra), accelerate_config=str(CONFIGS / f"{config}.yaml"))

    states = {name: json.loads((tmp / name / "trainer_state.json").read_text()) for name in runs}
    # world size 2 inside the script: had each process trained alone (world size 1), batch 4 would take 16 steps
    assert all(state["global_step"] == 8 for state in states.values())
    losses = {name: train_losses(tmp / name) for name in runs}
    assert all(len(v) == 8 for v in losses.values())
    assert losses["one"][-1] < losses["one"][0] - 0.5  # it learned something, so matching is not trivial
    padding = {name: [h["padding_fraction"] for h in state["log_history"] if "padding_fraction" in h]
               for name, state in states.items()}
    assert max(padding["two"]) > 0.05  # the processes did pad their halves
    assert max(padding["two_free"]) < 0.05  # padding-free: only the filler to a multiple of 8 tokens
    weights = {name: load_weights(tmp / name) for name in runs}
    for name in ("two", "one_free", "two_free"):
        torch.testing.assert_close(torch.tensor(losses[name]), torch.tensor(losses["one"]), rtol=1e-5, atol=1e-5,
                                   msg=name)
        assert weights[name].keys() == weights["one"].keys()
        for key in weights["one"]:
            torch.testing.assert_close(weights[name][key], weights["one"][key], rtol=1e-4, atol=1e-4,
                                       msg=f"{name}: {key}")


FSDP_PROBE = """
import os, torch
os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # as recipes/train.py does without CUDA
from transformers import TrainingArguments
from accelerate import Accelerator
TrainingArguments(output_dir=os.environ["PROBE_DIR"], report_to=[])
accelerator = Accelerator()
if accelerator.is_main_process:
    print("DISTRIBUTED_TYPE", accelerator.state.distributed_type.value, accelerator.num_processes)
"""


def test_fsdp_on_two_cpu_processes(assets, tmp_path):
    model, data, _ = assets
    probe = tmp_path / "probe.py"
    probe.write_text(FSDP_PROBE)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
         "--num_processes", "2", str(probe)],
        env=dict(run_env(), PROBE_DIR=str(tmp_path)), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed_type, processes = result.stdout.split("DISTRIBUTED_TYPE")[1].split()[:2]
    assert processes == "2"
    if distributed_type != "FSDP":
        import accelerate

        pytest.skip(f"accelerate {accelerate.__version__} turns FSDP on only for GPU-class devices; 2 CPU "
                    f"processes run as {distributed_type} (gloo) even with fsdp.yaml, although torch's FSDP2 itself "
                    "runs on gloo. Test FSDP on a multi-GPU runner.")

    # Reached only where accelerate runs FSDP: sharded training matches one process, and the final save reloads.
    run_train(tiny_recipe_args(model, data, tmp_path / "one", per_device_train_batch_size=8, max_length=128),
              accelerate_config=str(CONFIGS / "cpu.yaml"))
    run_train(tiny_recipe_args(model, data, tmp_path / "fsdp", per_device_train_batch_size=4, max_length=128,
                               save_strategy="steps", save_steps=4),
              accelerate_config=str(CONFIGS / "fsdp.yaml"))
    assert (tmp_path / "fsdp" / "checkpoint-4" / "pytorch_model_fsdp_0").is_dir()  # sharded checkpoint
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "fsdp")),
                               torch.tensor(train_losses(tmp_path / "one")), rtol=1e-4, atol=1e-4)
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fsdp"))
    reference = load_weights(tmp_path / "one")
    for name, tensor in reloaded.state_dict().items():
        if name in reference:
            torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-4, msg=name)


# Generation as under FSDP / ZeRO-3: transformers then keeps the processes' forward passes in step (`synced_gpus`,
# one all_reduce per generated token), so a process that generates while the other does anything else waits forever.
# Weights cannot be sharded on CPU processes here (accelerate runs FSDP on GPUs only), but the collectives are the same.
SYNCED_GENERATION = """
import faulthandler, runpy, sys
faulthandler.dump_traceback_later(150, exit=True)  # a hang fails with every process's stack, not a silent timeout
import transformers.generation.utils as generation_utils
generation_utils.is_fsdp_managed_module = lambda module: True
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_exact_match_and_samples_generated_by_every_process_in_step(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_hf.evaluation.generation import generate_responses
    from sft_hf.evaluation.metrics import exact_match
    from tiny_setup import TRAIN

    model, data, _ = assets
    script = tmp_path / "train_synced.py"
    script.write_text(SYNCED_GENERATION.format(train=TRAIN))
    out = tmp_path / "run"
    # 7 held-out records over 2 processes, batch 3: shares of 4 and 3, i.e. 2 and 1 generate calls unless padded
    argv = tiny_recipe_args(model, data, out, per_device_train_batch_size=4, max_steps=4, max_length=128,
                            eval_exact_match=True, max_eval_samples=7, per_device_eval_batch_size=3,
                            max_new_tokens=8, eval_generation_samples=3, eval_strategy="steps", eval_steps=2,
                            onednn_linear=False)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
         str(script), *argv], env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]

    results = json.loads((out / "all_results.json").read_text())
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 7
    # the same answers, in record order, as one process generating alone with the saved model
    tokenizer = AutoTokenizer.from_pretrained(out)
    alone = generate_responses(AutoModelForCausalLM.from_pretrained(out), tokenizer, responses, "alpaca", 8,
                               show_progress=False)
    assert [r["model_response"] for r in responses] == alone
    assert results["eval_exact_match"] == exact_match(alone, [r["output"] for r in responses])
    before = generate_responses(AutoModelForCausalLM.from_pretrained(model), tokenizer, responses, "alpaca", 8,
                                show_progress=False)
    assert results["baseline_exact_match"] == exact_match(before, [r["output"] for r in responses])
    samples = [json.loads(line) for line in (out / "eval_generations.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2] * 3 + [4] * 6  # evaluations at steps 2 and 4, and the final one
