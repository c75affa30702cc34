"""Load the tokenizer and model through the normal `from_pretrained` paths (Hub id, local dir, or built-in)."""
from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_hf import toy

logger = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path.startswith("builtin:"):
        return toy.build_builtin_model(name_or_path[len("builtin:") :])
    return name_or_path


def load_tokenizer(model_args):
    path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code
    )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no eos_token; the model could never learn to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: the collator masks padding by length, not by id
    return tokenizer


def load_model(model_args, tokenizer, training_args=None):
    path = resolve_model_path(model_args.model_name_or_path)
    dtype = model_args.dtype
    if dtype == "auto":  # full fine-tuning keeps fp32 master weights; Trainer's autocast does the rest
        dtype = torch.float32 if not model_args.use_peft else "auto"
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=model_args.model_revision,
        dtype=getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
    )
    # Generation must stop at the EOS we train on, and pad with the pad token we batch with.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model_args.use_peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        model.print_trainable_parameters()
    return model
