"""`accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` really runs 2 data-parallel processes on the
CPU and trains exactly like one process with the same global batch; FSDP on CPU processes is tried too."""
import json
import subprocess
import sys

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

from tiny_setup import ROOT, load_weights, run_env, run_or_kill_group, run_train, tiny_recipe_args, train_losses, \
    write_tiny_dataset, write_tiny_model

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


def test_lora_on_two_processes_trains_the_same_without_ddps_unused_parameter_search(assets, tmp_path):
    """A PeftModel is not a transformers PreTrainedModel, so Trainer would wrap it in DDP with
    find_unused_parameters=True (a graph traversal every step); LoRA runs turn it off (sft_hf.lora.
    prepare_training_args, the LoRA recipe). Every adapter takes part in every step: the losses are unchanged."""
    model, data, _ = assets
    runs = {"default": {}, "search": {"ddp_find_unused_parameters": "true"}}
    stderr, losses = {}, {}
    for name, extra in runs.items():
        result = run_train(tiny_recipe_args(model, data, tmp_path / name, per_device_train_batch_size=4,
                                            max_length=128, use_peft="true", lora_r=4, lora_alpha=8,
                                            lora_dropout=0.0, learning_rate=2e-2, **extra),
                           accelerate_config=str(CONFIGS / "cpu_2proc.yaml"))
        stderr[name], losses[name] = result.stderr, train_losses(tmp_path / name)
    # torch's DDP says so when it searched and found nothing unused: only where the search was asked for
    unused_warning = "find_unused_parameters=True was specified in DDP constructor, but did not find any unused"
    assert unused_warning in stderr["search"] and unused_warning not in stderr["default"]
    assert len(losses["default"]) == 8 and losses["default"][-1] < losses["default"][0]
    torch.testing.assert_close(torch.tensor(losses["default"]), torch.tensor(losses["search"]), rtol=1e-6, atol=1e-6)


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


def test_exact_match_and_samples_on_two_processes_are_those_of_one(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_hf.evaluation.generation import generate_responses
    from sft_hf.evaluation.metrics import exact_match
    from tiny_setup import TRAIN

    model, data, _ = assets
    out = tmp_path / "run"
    # 7 held-out records over 2 processes, batch 3: shares of 4 and 3, i.e. 2 and 1 generate calls unless padded
    argv = tiny_recipe_args(model, data, out, per_device_train_batch_size=4, max_steps=4, max_length=128,
                            eval_exact_match=True, max_eval_samples=7, per_device_eval_batch_size=3,
                            max_new_tokens=8, eval_generation_samples=3, eval_strategy="steps", eval_steps=2,
                            onednn_linear=False)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
         TRAIN, *argv], env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
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


def run_two_processes(script: str, *args, timeout: int = 180) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 script args` on the CPU; a hang fails the test after `timeout` seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    return run_or_kill_group(cmd, timeout, script)


def eos_twin_model(folder) -> str:
    """The tiny Llama, its EOS row of the output projection set to 1.1 × that of a token it often writes, so that
    greedy answers end after a varying number of tokens (a random model would almost never write EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny_setup import write_tiny_model

    write_tiny_model(folder)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 1.1 * model.lm_head.weight[213]
    model.save_pretrained(folder)
    return str(folder)


def test_generation_with_fsdp2_sharded_weights_gives_the_unsharded_answers(tmp_path):
    """Weights sharded by torch's FSDP2 on 2 gloo processes: every forward pass all-gathers from both, so both must
    run the same forward passes. Process 0 gets 5 short prompts, process 1 five long ones (cropped to the context),
    answers end at different steps, and the free memory fits one long row (but many short ones) per process. Both
    the full model (default batch size) and a LoRA model (batch size 2) must finish, with one process's answers."""
    import random

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_hf.evaluation.generation import generate_responses

    model_dir = eos_twin_model(tmp_path / "model")
    words = "sort the digits ascending descending largest smallest number sequence of".split()
    rng = random.Random(0)
    lengths = (1, 2, 3, 1, 4, 40, 60, 30, 50, 45)  # words per instruction: shares of 5 short and 5 long prompts
    records = [{"instruction": " ".join(f"{rng.choice(words)} {rng.randint(0, 9)}" for _ in range(n)), "input": ""}
               for n in lengths]
    (tmp_path / "records.json").write_text(json.dumps(records))
    max_new_tokens = 16
    # KV cache per row: keys and values × 2 layers × 2 KV heads × head dim 8 × 4 bytes × (prompt + new tokens); a
    # quarter of the memory, halved for the 2 processes, fits 1.5 rows of the longest prompt (256 positions)
    available = int(1.5 * 4 * 2 * (2 * 2 * 2 * 8 * 4 * 256))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    alone = generate_responses(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, records, "raw",
                               max_new_tokens, show_progress=False)
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora_alone = generate_responses(lora, tokenizer, records, "raw", max_new_tokens, batch_size=2,
                                    show_progress=False)
    # not trivial: answers of different lengths in each share, some ended by EOS, and the adapters change them
    for answers in (alone, lora_alone):
        for share in (answers[:5], answers[5:]):
            assert len({len(tokenizer(a)["input_ids"]) for a in share}) > 1, answers
    assert lora_alone != alone

    out = tmp_path / "sharded.json"
    result = run_two_processes(str(ROOT / "tests" / "scripts" / "sharded_generation.py"), model_dir,
                               str(tmp_path / "records.json"), str(out), str(max_new_tokens), str(available))
    assert result.returncode == 0, result.stderr[-6000:]
    sharded = json.loads(out.read_text())
    assert sharded["full"] == alone
    assert sharded["lora"] == lora_alone
