"""The run's precision, decided once: `plan_precision` turns the recipe's `precision` (and Trainer's `bf16` / `fp16`),
the run's device and the model into a `PrecisionPlan` that the arguments, the collator and the trainer all read.

    auto           bf16 where the device multiplies bf16 natively (Ampere+ GPUs, CPUs with AVX512-BF16 or AMX),
                   fp16 on older GPUs, else fp32. Emulated bf16 makes training many times slower.
    bf16           on a CPU: bf16 weights with fp32 master weights kept by the optimizer (speed/master_weights.py):
                   autocast's casts of every weight at every step cost more there than the bf16 matmuls save.
                   On a GPU, and where master weights cannot be exact: bf16 autocast.
    bf16-autocast  fp32 weights, bf16 autocast (Trainer's --bf16).
    fp16           fp32 weights, fp16 autocast with loss scaling (Trainer's --fp16).
    fp32           no reduced precision.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "bf16-autocast", "fp16")
# Padding-free rows are rounded up to this many tokens: their length then takes few distinct values, so
# shape-specialised kernels (oneDNN primitives) are reused from step to step for < 1 % filler. bf16 weights on a CPU
# multiply in AMX tiles of 32-deep bf16 blocks, so rows there are rounded to 32 (docs/speed.md measures both).
ROW_MULTIPLE = 8
ROW_MULTIPLE_BF16_WEIGHTS = 32


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str  # what trains: fp32, bf16 (bf16 weights + fp32 masters), bf16-autocast or fp16
    device: str  # "cuda" or "cpu": where the run computes
    why: str  # for the log: why this precision on this run

    @property
    def master_weights(self) -> bool:
        """The model holds bf16 weights, the optimizer their fp32 masters."""
        return self.precision == "bf16"

    @property
    def autocast(self) -> str | None:
        """"bf16" / "fp16": Trainer's mixed precision over fp32 weights; None: none."""
        return {"bf16-autocast": "bf16", "fp16": "fp16"}.get(self.precision)

    @property
    def row_multiple(self) -> int:
        """Padding-free rows are rounded up to this many tokens."""
        return ROW_MULTIPLE_BF16_WEIGHTS if self.master_weights and self.device == "cpu" else ROW_MULTIPLE

    def describe(self) -> str:
        what = {"fp32": "fp32", "bf16": "bf16 weights with fp32 master weights in the optimizer",
                "bf16-autocast": "fp32 weights, bf16 autocast", "fp16": "fp32 weights, fp16 autocast with loss "
                "scaling"}[self.precision]
        return f"{what} on {self.device.upper() if self.device == 'cuda' else 'the CPU'} ({self.why})"


def run_device(args=None) -> str:
    """"cpu" when the run is told to use the CPU (`use_cpu`; accelerate's cpu configs and `--cpu` export
    ACCELERATE_USE_CPU) or has no CUDA, else "cuda". Precision and threads both ask this, before TrainingArguments
    sets up its device (which, on one process, reads cuda:0 when only ACCELERATE_USE_CPU says CPU)."""
    from accelerate.utils import parse_flag_from_env

    cpu_asked = getattr(args, "use_cpu", False) or parse_flag_from_env("ACCELERATE_USE_CPU")
    return "cuda" if torch.cuda.is_available() and not cpu_asked else "cpu"


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX-BF16); elsewhere PyTorch emulates bf16 matmuls
    (many times slower than fp32). A oneDNN ISA cap below BF16 (ONEDNN_MAX_CPU_ISA, how the benchmarks emulate an
    older CPU) counts as not native."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if not (isa in ("ALL", "DEFAULT") or "BF16" in isa or "AMX" in isa or "FP16" in isa or "AVX10" in isa):
        return False
    if not torch.backends.mkldnn.is_available():  # oneDNN runs the bf16 matmuls
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers; fall back to the kernel's flags
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_has_native_bf16() -> bool:
    """Ampere or newer: `is_bf16_supported()` alone also says yes where bf16 is only emulated (T4, V100)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def _masters_ruled_out(args, model) -> str | None:
    """Why bf16 weights with fp32 masters cannot be exact for this run (it then trains under bf16 autocast), or None."""
    if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
        return "FSDP and DeepSpeed bring their own mixed precision"
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in ("adamw_torch", "adamw_torch_fused"):
        return f"optim {optim} is not AdamW"
    if args.gradient_accumulation_steps > 1:
        return "gradient accumulation would sum bf16 gradients"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "several processes would all-reduce bf16 gradients"
    if getattr(args, "load_best_model_at_end", False):
        return "load_best_model_at_end would load a checkpoint's bf16 weights over the fp32 masters"
    if model is not None and hasattr(model, "peft_config"):
        return "a LoRA model's frozen base would stay rounded to bf16"
    return None


def plan_precision(args, model=None) -> PrecisionPlan:
    """The precision of a run with these training arguments (`precision`, `bf16`, `fp16`, the optimizer, the
    processes) on its device, for `model` when it is known (a LoRA model rules out master weights)."""
    device = run_device(args)
    # plain TrainingArguments (a library user's) have no `precision`: their bf16 / fp16 flags are the choice
    precision = getattr(args, "precision", None) or ("bf16-autocast" if args.bf16 else "fp16" if args.fp16 else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        why = f"precision: {precision}"
    elif args.bf16 or args.fp16:  # Trainer's own flags ask for autocast
        precision, why = ("bf16-autocast", "--bf16") if args.bf16 else ("fp16", "--fp16")
    elif device == "cuda":
        precision, why = ("bf16", "a GPU with native bf16") if gpu_has_native_bf16() else \
            ("fp16", "a GPU without native bf16")
    elif cpu_has_native_bf16():
        precision, why = "bf16", "a CPU with native bf16 (AVX512-BF16 or AMX)"
    else:
        precision, why = "fp32", "a CPU without native bf16: emulated bf16 would be slower than fp32"
    if precision == "bf16" and device == "cuda":
        precision = "bf16-autocast"
    elif precision == "bf16" and (ruled_out := _masters_ruled_out(args, model)):
        precision, why = "bf16-autocast", f"{why}; not bf16 weights: {ruled_out}"
    return PrecisionPlan(precision=precision, device=device, why=why)


def apply_precision(args, plan: PrecisionPlan) -> None:
    """Sets the training arguments Trainer reads (`bf16`, `fp16`, and `mixed_precision` once they are set up) to
    `plan`, and keeps the plan as `args.precision_plan`."""
    args.precision_plan = plan
    args.bf16, args.fp16 = plan.autocast == "bf16", plan.autocast == "fp16"
    if hasattr(args, "mixed_precision"):  # TrainingArguments.__post_init__ has run: the Accelerator reads this
        args.mixed_precision = plan.autocast or "no"
    if plan.autocast == "bf16" and plan.device == "cpu":
        # Trainer refuses bf16 without a bf16 GPU unless told the run is on the CPU ("Your setup doesn't support
        # bf16/gpu"); the run is on the CPU, so say so.
        args.use_cpu = True


def settle_precision(args, model) -> PrecisionPlan:
    """The plan once the model is known (a LoRA model cannot keep fp32 masters), applied to `args`."""
    plan = plan_precision(args, model)
    if plan != getattr(args, "precision_plan", None):
        apply_precision(args, plan)
    return plan
