"""LoRA and QLoRA through peft: which modules get adapters, 4-bit loading, and merging an adapter into a full model.

LoRA scaling: peft multiplies the low-rank update by `lora_alpha / r`. Chapter 7 exercise 7.4 of "Build a Large
Language Model (From Scratch)" multiplies by `alpha` alone (no division by the rank), so its rank 16 / alpha 16
equals peft `r=16, lora_alpha=256` (256 / 16 = 16).
"""
from __future__ import annotations

import json
import logging
import os
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


def compute_dtype(args=None) -> torch.dtype:
    """What QLoRA's 4-bit layers multiply in: the run's precision plan (sft_hf/precision.py sets `args.bf16` / `args.fp16`),
    so a T4 or V100, where `precision: auto` picks fp16, never computes in emulated bf16 under fp16 autocast. Without
    training arguments: bf16 where the GPU multiplies it natively, else fp16."""
    if args is None:
        from sft_hf.precision import gpu_has_native_bf16

        return torch.bfloat16 if gpu_has_native_bf16() else torch.float16
    if getattr(args, "bf16", False):
        return torch.bfloat16
    return torch.float16 if getattr(args, "fp16", False) else torch.float32


def weight_sharding(args=None) -> str | None:
    """"fsdp" or "zero3" when the run shards its weights over the processes, else None: what `accelerate launch` with
    accelerate_configs/fsdp.yaml or deepspeed_zero3.yaml exports (ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED and
    the ZeRO stage or config file), or the training arguments' own `fsdp` / `deepspeed`."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP") or getattr(args, "fsdp", None):
        return "fsdp"
    config = getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not (config or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")):
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if config:
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        stage = (config.get("zero_optimization") or {}).get("stage", stage)
    return "zero3" if str(stage) == "3" else None


def quantized_load_dtype(args=None) -> torch.dtype:
    """The dtype QLoRA's other weights load in and its 4-bit weights are packed into (`bnb_4bit_quant_storage`): the
    compute dtype, so that FSDP and ZeRO-3 shard the packed weights like the others (peft's FSDP-QLoRA and
    ZeRO-3-QLoRA guides). fp16 under FSDP is the exception: there the trained weights must stay fp32 for the fp16
    gradient scaler (peft's guide: quant storage float32 for fp16 mixed precision)."""
    dtype = compute_dtype(args)
    return torch.float32 if dtype == torch.float16 and weight_sharding(args) == "fsdp" else dtype


def quantization_config(model_args, args=None):
    """BitsAndBytesConfig for QLoRA (`load_in_4bit`), None otherwise; a clear error where 4-bit cannot run. `args`:
    the training arguments, whose resolved precision sets the compute dtype."""
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

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=getattr(model_args, "bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=getattr(model_args, "use_bnb_nested_quant", False),
        bnb_4bit_compute_dtype=compute_dtype(args),
        bnb_4bit_quant_storage=quantized_load_dtype(args),  # lets FSDP and ZeRO-3 shard the 4-bit weights
    )


def quantized_load_kwargs(args=None) -> dict:
    """`from_pretrained` arguments of a QLoRA model besides its quantization config. One process, or DDP: the
    whole model on this process's GPU (TRL's `get_kbit_device_map`). FSDP or ZeRO-3: no `device_map` (ZeRO-3 refuses
    one; bitsandbytes then loads onto the current GPU, which FSDP or ZeRO-3 shards when training starts) and the
    other weights in the packed weights' dtype, as peft's guides do."""
    if weight_sharding(args):
        return {"device_map": None, "dtype": quantized_load_dtype(args)}
    if args is not None:
        index = args.local_process_index
    else:
        from accelerate import PartialState

        index = PartialState().local_process_index
    return {"device_map": {"": index}}


def prepare_training_args(model_args, args) -> None:
    """What LoRA changes in the training arguments, decided after parsing:
    - DDP's `find_unused_parameters` off unless the recipe set it: every adapter takes part in every forward pass,
      and Trainer would switch the search on for any model that is not a transformers `PreTrainedModel` (a PeftModel
      is not), which costs a graph traversal per step and breaks reentrant activation checkpointing;
    - under FSDP or ZeRO-3, reentrant activation checkpointing unless the recipe chose (peft's sharded guides run it,
      TRL forces it for PEFT under ZeRO-3)."""
    if not getattr(model_args, "use_peft", False):
        return
    if args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = False
    if args.activation_checkpointing and weight_sharding(args):
        args.activation_checkpointing_kwargs = {"use_reentrant": True, **(args.activation_checkpointing_kwargs or {})}


def apply_lora(model, model_args, gradient_checkpointing: bool = False, sharding: str | None = None):
    """Wrap `model` with fresh LoRA adapters. A 4-bit model on one process or DDP is first prepared by peft for
    k-bit training (its other weights upcast to fp32, input gradients for checkpointing). Under FSDP or ZeRO-3
    (`sharding`) that upcast is skipped, as in TRL's and peft's sharded QLoRA: the frozen weights stay in the dtype
    the 4-bit weights are packed in, so they shard together, without fp32 copies (Trainer's activation checkpointing
    turns the input gradients on itself)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) and not sharding:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = make_lora_config(model_args, model.config.model_type)
    model = get_peft_model(model, config)
    if sharding == "zero3":
        # peft keeps adapters in fp32 while the base is bf16/fp16; ZeRO-3 gathers parameters into buffers of one
        # dtype and fails at the first step on mixed ones (TRL casts them likewise). DeepSpeed keeps fp32 masters.
        base = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
        for param in model.parameters():
            if param.requires_grad and base is not None and base != torch.float32:
                param.data = param.data.to(base)
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
