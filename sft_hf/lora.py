"""LoRA and QLoRA through peft: which modules get adapters, 4-bit loading, and merging an adapter into a full model.

LoRA scaling: peft multiplies the low-rank update by `lora_alpha / r`. Chapter 7 exercise 7.4 of "Build a Large
Language Model (From Scratch)" multiplies by `alpha` alone (no division by the rank), so its rank 16 / alpha 16
equals peft `r=16, lora_alpha=256` (256 / 16 = 16).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Attention and MLP projections per architecture (`config.model_type`). gpt2's Conv1D `c_proj` is both the attention
# output and the MLP down projection. Architectures not listed get peft's "all-linear" (every Linear but the LM head).
LORA_TARGET_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
ALL_LINEAR = "all-linear"
FAN_IN_FAN_OUT = {"gpt2"}  # Conv1D stores weights transposed


class QLoRAUnavailable(RuntimeError):
    pass


def lora_target_modules(model_type: str, given: list[str] | str | None = None) -> list[str] | str:
    """`given` (from the recipe) wins; else the table above; else "all-linear"."""
    if given:
        return given
    return LORA_TARGET_MODULES.get(model_type, ALL_LINEAR)


def make_lora_config(model_args, model_type: str):
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=lora_target_modules(model_type, model_args.lora_target_modules),
        fan_in_fan_out=model_type in FAN_IN_FAN_OUT,
        task_type="CAUSAL_LM",
    )


def quantization_config(model_args):
    """BitsAndBytesConfig for QLoRA (`load_in_4bit`), None otherwise; a clear error where 4-bit cannot run."""
    if not getattr(model_args, "load_in_4bit", False):
        return None
    if not model_args.use_peft:
        raise QLoRAUnavailable("load_in_4bit trains LoRA adapters on a frozen 4-bit model: set use_peft: true too")
    if not torch.cuda.is_available():
        raise QLoRAUnavailable(
            "load_in_4bit (QLoRA) needs a CUDA GPU and none is available here; drop load_in_4bit to train LoRA "
            "on full-precision weights"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise QLoRAUnavailable("load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=getattr(model_args, "bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=getattr(model_args, "use_bnb_nested_quant", False),
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,  # lets FSDP shard the 4-bit weights like the others
    )


def apply_lora(model, model_args, gradient_checkpointing: bool = False):
    """Wrap `model` with fresh LoRA adapters (4-bit models are first prepared for k-bit training)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = make_lora_config(model_args, model.config.model_type)
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA on %s: %s trainable of %s parameters (%.2f%%)", config.target_modules, f"{trainable:,}",
                f"{total:,}", 100 * trainable / total)
    return model


def merge_adapter(adapter_dir: str, out_dir: str, dtype: str = "auto", overwrite: bool = False) -> str:
    """Load base model + adapter from `adapter_dir`, fold the LoRA update into the weights and save a plain
    transformers model (plus the tokenizer and template found beside the adapter) to `out_dir`."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from sft_hf.errors import RecipeError
    from sft_hf.run.safety import atomic_save

    if not Path(adapter_dir, "adapter_config.json").is_file():
        raise RecipeError(f"{adapter_dir}: no adapter_config.json; is this a LoRA output_dir?")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise RecipeError(f"{out_dir} is a file: name a folder for the merged model")
    if Path(out_dir).is_dir() and any(Path(out_dir).iterdir()) and not overwrite:
        raise RecipeError(f"{out_dir} exists and is not empty: choose another folder for the merged model, or pass "
                          "--overwrite to replace its model files")
    if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise RecipeError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=torch_dtype)
    merged = model.merge_and_unload()
    with atomic_save(out_dir) as staging:  # an interrupted merge leaves out_dir as it was
        merged.save_pretrained(staging)
        try:
            tokenizer_source = adapter_dir if Path(adapter_dir, "tokenizer_config.json").is_file() else \
                model.peft_config["default"].base_model_name_or_path
            AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(staging)
        except OSError as error:
            logger.warning("merged model saved without a tokenizer: %s", error)
        for extra in ("sft_template.json",):
            if Path(adapter_dir, extra).is_file():
                shutil.copy(Path(adapter_dir, extra), Path(staging, extra))
    return out_dir


@dataclass
class MergeArguments:
    _argument_group_name = "merge-lora"
    adapter_dir: str = field(metadata={"help": "output_dir of a LoRA run (has adapter_config.json)."})
    out_dir: str = field(metadata={"help": "Where to write the merged model."})
    dtype: str = field(default="auto", metadata={"help": "auto (as saved), float32, bfloat16 or float16."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the model files of a non-empty out_dir."})


def main(argv=None) -> int:
    """`sft-hf merge-lora ADAPTER_DIR OUT_DIR [--dtype bfloat16]` (also recipes/merge_lora.py)."""
    from sft_hf.run.parser import Command, parse_command

    command = Command(prog="sft-hf merge-lora", dataclass_types=(MergeArguments,), positional=("adapter_dir", "out_dir"),
                      usage="{prog} ADAPTER_DIR OUT_DIR [--dtype bfloat16] [--overwrite true]",
                      summary="Fold a LoRA adapter into its base model and save a full model.")
    args, _ = parse_command(command, argv)
    merge_adapter(args.adapter_dir, args.out_dir, args.dtype, args.overwrite)
    print(f"Merged {args.adapter_dir} into a full model at {args.out_dir}")
    return 0
