"""One optimizer step of InstructionTrainer on 8 fixed rows; writes the logged loss and the updated weights.

Run in-process by tests/test_trainer.py and under `accelerate launch --multi_gpu --num_processes 2` (two gloo
processes on CPU) to check that batch layout does not change the loss or the gradients.
"""
import json
import random
import sys

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from sft_hf import InstructionDataCollator, InstructionTrainer, SFTArguments


def rows(vocab_size: int, eos: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for length in (40, 5, 23, 9, 31, 12, 7, 18):  # very different numbers of trained tokens per row
        ids = [rng.randrange(3, vocab_size) for _ in range(length - 1)] + [eos]
        n_prompt = rng.randrange(1, length - 1)
        out.append({"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * (length - n_prompt)})
    return out


def run(model_dir: str, out_dir: str, batch_size: int, accumulation: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = Dataset.from_list(rows(model.config.vocab_size, model.config.eos_token_id))
    args = SFTArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, logging_steps=1, save_strategy="no", train_sampling_strategy="sequential",
        dataloader_drop_last=False, seed=0, disable_tqdm=True, use_cpu=True, precision="fp32",  # exact, on any CPU
    )
    trainer = InstructionTrainer(
        model=model, args=args, train_dataset=data,
        data_collator=InstructionDataCollator(pad_token_id=model.config.pad_token_id, completion_only_loss=True),
    )
    trainer.train()
    result = {"loss": trainer.state.log_history[0]["loss"], "world_size": args.world_size}
    if trainer.is_world_process_zero():
        save_file({k: v.clone().contiguous() for k, v in trainer.model.state_dict().items()}, f"{out_dir}/weights.safetensors")
        with open(f"{out_dir}/result.json", "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    model_dir, out_dir, batch_size, accumulation = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    run(model_dir, out_dir, batch_size, accumulation)
