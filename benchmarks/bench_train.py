"""Trained tokens per second: sft-hf vs TRL's SFTTrainer on the same offline workload, side by side.

    HF_HUB_OFFLINE=1 python benchmarks/bench_train.py                      # W1, 3 repeats, full epoch (~15 min)
    HF_HUB_OFFLINE=1 python benchmarks/bench_train.py --quick              # W1, 1 repeat, 25% of the epoch (~3 min)
    HF_HUB_OFFLINE=1 python benchmarks/bench_train.py --workload W2 --repeats 2 --fraction 0.5
    HF_HUB_OFFLINE=1 python benchmarks/bench_train.py --workload W3                 # SmolLM2-135M, 40 steps
    HF_HUB_OFFLINE=1 python benchmarks/bench_train.py --workload W3 --launch accelerate  # through the user's command
    HF_HUB_OFFLINE=1 python benchmarks/bench_train.py --device cuda --workload W3 --repeats 1  # GPU: MFU, vs TRL
    python benchmarks/bench_train.py --device cuda --workload W4                    # GPU: MFU, vs TRL flash-attention

Each contender trains in its own process (so peak RSS, threads and compiled code are its own), one after the other
in a rotated order per repeat, so machine noise hits every contender alike; the table reports medians and ratios.
Tokens/s counts the tokens of the examples trained (prompt + output + EOS: W1 trains every token), divided by the
wall time of `trainer.train()`. "final loss" is the mean token loss of the trained model on the first 256 training
examples, computed the same way for every contender (it shows they trained the same thing).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH_SIZE, LEARNING_RATE, SEED, MAX_LENGTH = 8, 5e-5, 0, 1024

# sft-hf's default configuration for this workload: only the workload's own settings (batch, lr, epochs, seed) are
# passed; everything that makes it fast is the library's default (length-grouped sampling, oneDNN linears where they
# pay: sft_hf/speed/onednn_linear.py).
OURS_WORKLOAD_FLAGS = [
    "--per_device_train_batch_size", str(BATCH_SIZE), "--learning_rate", str(LEARNING_RATE),
    "--num_train_epochs", "1", "--seed", str(SEED), "--max_length", str(MAX_LENGTH), "--logging_steps", "10",
    "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--weight_decay", "0.0",
    "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
]
PADDED = ["--attn_implementation", "sdpa"]  # plain SDPA: padding-free rows don't pay, so padded batches
CONTENDERS = {
    # padding-free rows, attention per example (sdpa_varlen), random order, rows rounded to 8 tokens, oneDNN linears
    "sft-hf default": dict(kind="ours", flags=[]),
    # the same, through the user's command (`accelerate launch recipes/train.py --config ...`, in a subprocess)
    "sft-hf default · accelerate launch": dict(kind="ours", flags=[], launch=True),
    "sft-hf padded (length-grouped)": dict(kind="ours", flags=PADDED),  # the `auto` sampling of padded batches
    "sft-hf padded (random)": dict(kind="ours", flags=PADDED + ["--train_sampling_strategy", "random"]),
    "TRL defaults (bf16 autocast + grad checkpointing)": dict(kind="trl", config={}, slow=True),
    "TRL fp32 padded": dict(kind="trl", config=dict(bf16=False, gradient_checkpointing=False)),
    "TRL fp32 padding_free": dict(kind="trl", config=dict(bf16=False, gradient_checkpointing=False,
                                                          padding_free=True, max_length=None)),
    "TRL fp32 packing (bfd rows of 1024)": dict(kind="trl", config=dict(bf16=False, gradient_checkpointing=False,
                                                                         packing=True), slow=True),
}
# Extra contenders for finding which lever pays (`--contenders` picks any of these by name).
ABLATIONS = {
    "sft-hf default - oneDNN linear": dict(kind="ours", flags=["--onednn_linear", "false"]),
    "sft-hf default - recipe callbacks": dict(kind="ours", flags=[], callbacks=False),
    "sft-hf default (length-grouped)": dict(kind="ours", flags=["--train_sampling_strategy", "group_by_length"]),
    "sft-hf default - filler (rows not rounded up)": dict(kind="ours", flags=["--pad_to_multiple_of", "1"]),
    "sft-hf padding-free on plain sdpa": dict(kind="ours", flags=PADDED + ["--padding_free", "true",
                                                                           "--train_sampling_strategy", "random"]),
    "sft-hf padded (length-grouped) + pad to multiple of 8": dict(kind="ours",
                                                                flags=PADDED + ["--pad_to_multiple_of", "8"]),
    "sft-hf padded (batch_rebalance)": dict(kind="ours", flags=PADDED + ["--train_sampling_strategy",
                                                                        "batch_rebalance"]),
    "sft-hf default + adamw_torch (foreach)": dict(kind="ours", flags=["--optim", "adamw_torch"]),
    "sft-hf default + 1 dataloader worker": dict(kind="ours", flags=["--dataloader_num_workers", "1"]),
    "sft-hf default - logits only where trained": dict(kind="ours", flags=["--logits_where_trained", "false"]),
    "sft-hf default - tcmalloc (glibc malloc)": dict(kind="ours", flags=[], system_malloc=True),
    "sft-hf padded (eager attention)": dict(kind="ours", flags=["--attn_implementation", "eager"]),
    # the CPU bf16 levers (speed/), one at a time (in-process only: `patches` are applied in the child)
    "sft-hf default - fused cross-entropy": dict(kind="ours", flags=["--fused_cross_entropy", "false"]),
    "sft-hf default - matmul attention (SDPA flash)": dict(kind="ours", flags=[], patches=["flash_attention"]),
    "sft-hf default - sparse embedding gradient": dict(kind="ours", flags=[], patches=["dense_embedding_gradient"]),
    # with the stock (MKL) linears: dynamo then has no custom autograd function to trace
    "sft-hf padded (length-grouped) + torch.compile": dict(kind="ours", flags=PADDED + ["--torch_compile", "true"]),
}
# Issue 15: bf16 autocast (native on CPUs with AVX512-BF16/AMX and on Ampere+ GPUs; skipped where emulated unless
# --allow-emulated-bf16: 50× slower matmuls) and the GPU's best.
BF16_CONTENDERS = {
    "sft-hf fp32": dict(kind="ours", flags=["--precision", "fp32"]),
    "sft-hf bf16": dict(kind="ours", flags=["--precision", "bf16"], bf16=True),  # bf16 weights, fp32 masters on CPU
    "sft-hf bf16 autocast": dict(kind="ours", flags=["--precision", "bf16-autocast"], bf16=True),
    # the sft-hf default of 2026-12-01 on such a CPU: bf16 autocast, SDPA's flash kernel, the stock head and loss
    "sft-hf bf16 autocast without the bf16 levers": dict(
        kind="ours", flags=["--precision", "bf16-autocast", "--fused_cross_entropy", "false"],
        patches=["flash_attention", "dense_embedding_gradient"], bf16=True),
    "TRL bf16 autocast padding_free (no checkpointing)": dict(
        kind="trl", config=dict(bf16=True, gradient_checkpointing=False, padding_free=True, max_length=None),
        bf16=True),
    "sft-hf flash-attention": dict(kind="ours", flags=["--attn_implementation", "flash_attention_2"], gpu=True),
    "TRL bf16 padding_free flash-attention": dict(
        kind="trl", config=dict(bf16=True, gradient_checkpointing=False, padding_free=True, max_length=None),
        attn="flash_attention_2", bf16=True, gpu=True),
}
CONTENDERS["TRL defaults (bf16 autocast + grad checkpointing)"]["bf16"] = True
# GPUs without native bf16 (T4, V100): TRL's best candidate in the precision sft-hf's `auto` picks there
TRL_FP16 = "TRL fp16 autocast padding_free (no checkpointing)"
FP16_CONTENDERS = {TRL_FP16: dict(kind="trl", config=dict(fp16=True, bf16=False, gradient_checkpointing=False,
                                                        padding_free=True, max_length=None), gpu=True)}
ALL_CONTENDERS = {**CONTENDERS, **BF16_CONTENDERS, **FP16_CONTENDERS, **ABLATIONS}
# The default contenders of the real-model workloads: TRL's candidates for its best on a CPU (bf16 autocast without
# checkpointing, padding_free) and on a GPU (the same with flash-attention), its defaults, sft-hf default/fp32/bf16.
REAL_MODEL_CONTENDERS = {
    "cpu": ["sft-hf default", "sft-hf default · accelerate launch", "sft-hf fp32", "sft-hf bf16 autocast",
            "TRL bf16 autocast padding_free (no checkpointing)", "TRL defaults (bf16 autocast + grad checkpointing)",
            "TRL fp32 padding_free"],
    "cuda": ["sft-hf default", "sft-hf flash-attention", "TRL bf16 padding_free flash-attention",
             "TRL bf16 autocast padding_free (no checkpointing)", "TRL defaults (bf16 autocast + grad checkpointing)"],
}
W3_STEPS = 40
# TRL's best = its fastest configuration in the run; its defaults too: with native bf16 (AVX512-BF16, AMX, GPUs)
# bf16 autocast can beat fp32 even with gradient checkpointing.
TRL_BEST_CANDIDATES = [name for name, c in {**CONTENDERS, **BF16_CONTENDERS, **FP16_CONTENDERS}.items()
                       if c["kind"] == "trl"]
TRL_DEFAULTS = "TRL defaults (bf16 autocast + grad checkpointing)"


# ----------------------------------------------------------------------------------------------------------------
# One training run (runs in a child process)
# ----------------------------------------------------------------------------------------------------------------
class _TokenCounter:
    """Wraps a collator to count real (non-padding) tokens and all positions, to report the padding fraction."""

    def __init__(self, collator):
        self.collator, self.real, self.positions = collator, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        self.positions += batch["input_ids"].numel()
        self.real += sum(min(len(f["input_ids"]), MAX_LENGTH) for f in features)  # the rest is padding or filler
        return batch


def _records(fraction: float) -> list[dict]:
    from benchmarks.workloads import train_records

    records = train_records()
    return records[: max(BATCH_SIZE, round(len(records) * fraction))]


def _build_ours(model_dir: str, flags: list[str], n_records: int, output_dir: str, callbacks: bool = True):
    """The recipes/train.py code path: parse_recipe → tokenize_dataset → load_model → collator → InstructionTrainer."""
    from benchmarks.workloads import DATA_FILE
    from sft_hf import (InstructionTrainer, get_template, load_instruction_dataset, load_model, load_tokenizer,
                        parse_recipe, tokenize_dataset)
    from sft_hf.collator import recipe_collator

    argv = ["--model_name_or_path", model_dir, "--dataset_name", str(DATA_FILE), "--template", "alpaca",
            "--output_dir", output_dir, "--max_train_samples", str(n_records), *OURS_WORKLOAD_FLAGS, *flags]
    model_args, data_args, args = parse_recipe(argv, default_recipe=None)
    tokenizer = load_tokenizer(model_args)
    raw = load_instruction_dataset(data_args.dataset_name, train_split_ratio=data_args.train_split_ratio,
                                   test_split_ratio=data_args.test_split_ratio)
    raw_train = raw["train"].select(range(n_records))
    start = time.perf_counter()
    train = tokenize_dataset(raw_train, tokenizer, get_template(data_args.template), args.max_length,
                             data_args.dataset_num_proc, verbose=False)
    prep_seconds = time.perf_counter() - start
    model = load_model(model_args, tokenizer, args)
    collator = recipe_collator(tokenizer, args, model)
    trainer = InstructionTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                 data_collator=collator, callbacks=_recipe_callbacks(callbacks))
    return trainer, tokenizer, prep_seconds


def _recipe_callbacks(wanted: bool) -> list:
    """The callbacks recipes/train.py adds (stop at a non-finite gradient), where present."""
    if not wanted:
        return []
    try:
        from sft_hf.run.safety import StopOnNonFiniteLoss
    except ImportError:
        return []
    return [StopOnNonFiniteLoss()]


def _build_trl(model_dir: str, config: dict, n_records: int, output_dir: str, attn: str | None = None):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from benchmarks.bench_data import alpaca_text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)
    import torch

    # use_cpu: TRL's bf16 default refuses to run on a CPU otherwise
    config = {"use_cpu": not torch.cuda.is_available(), "max_length": MAX_LENGTH, **config}
    args = SFTConfig(output_dir=output_dir, per_device_train_batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
                     num_train_epochs=1, seed=SEED, lr_scheduler_type="linear",
                     save_strategy="no", report_to="none", **config)
    raw = Dataset.from_list(_records(1.0)[:n_records])
    start = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=raw, processing_class=tokenizer,
                         formatting_func=alpaca_text)
    prep_seconds = time.perf_counter() - start  # includes the trainer's own setup; bench_data.py isolates the prep
    return trainer, tokenizer, prep_seconds


def _loss_records(workload: str) -> list[dict]:
    """W1/W2: the first 256 training examples (a random model learns them first). W3/W4: chapter 7's 55 validation
    records (the last 5%), the validation loss bf16 and fp32 are compared by."""
    from benchmarks.workloads import DATA_FILE

    if workload in ("W3", "W4"):
        return json.loads(DATA_FILE.read_text())[1045:]
    return _records(1.0)[:256]


def _final_loss(model, tokenizer, records: list[dict]) -> float:
    """Mean token loss (every token, as trained) on `records`, the same code for every contender, in fp32."""
    import torch
    from datasets import Dataset

    from sft_hf import InstructionDataCollator, tokenize_dataset

    data = tokenize_dataset(Dataset.from_list(records), tokenizer, "alpaca", MAX_LENGTH, verbose=False)
    collator = InstructionDataCollator(pad_token_id=tokenizer.pad_token_id)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), 16):
            batch = collator([data[j] for j in range(i, min(i + 16, len(data)))])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / count


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads) and its finished children: robust to a busy machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def apply_patches(patches: list[str]) -> None:
    """Turn a lever off inside this child process (ablations that have no recipe flag)."""
    for patch in patches:
        if patch == "flash_attention":  # SDPA for every example length, as before the matmul path
            from sft_hf.speed import varlen_attention

            varlen_attention.MATMUL_ATTENTION_MAX_LENGTH = 0
        elif patch == "dense_embedding_gradient":  # the tied embedding's gradient dense, zero-filled and added
            import sft_hf.trainer

            sft_hf.trainer.sparse_tied_embedding_gradient = lambda model: False
        else:
            raise ValueError(f"unknown patch {patch!r}")


def run_one(name: str, workload: str, fraction: float, threads: int | None) -> dict:
    import datasets
    import torch
    import transformers

    from benchmarks.workloads import build_workload

    if threads:
        torch.set_num_threads(threads)
    datasets.disable_caching()
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_warning()
    contender = ALL_CONTENDERS[name]
    apply_patches(contender.get("patches", []))
    model_dir = build_workload(workload)
    n_records = len(_records(fraction))
    with tempfile.TemporaryDirectory() as output_dir:
        if contender["kind"] == "ours":
            trainer, tokenizer, prep_seconds = _build_ours(model_dir, contender["flags"], n_records, output_dir,
                                                           callbacks=contender.get("callbacks", True))
        else:
            trainer, tokenizer, prep_seconds = _build_trl(model_dir, contender["config"], n_records, output_dir,
                                                          contender.get("attn"))
        counter = None
        if trainer.args.dataloader_num_workers == 0:  # the counts live in this process only then
            counter = trainer.data_collator = _TokenCounter(trainer.data_collator)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        cpu_start, start = _cpu_seconds(), time.perf_counter()
        result = trainer.train()
        seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    return {
        "contender": name if ALL_CONTENDERS[name].get("launch") else name + " · accelerate launch",
        "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
        "cpu_seconds": cpu_seconds, "tokens_per_cpu_second": tokens / cpu_seconds,
        "train_loss": result.training_loss, "final_loss": _final_loss(trainer.model, tokenizer, _loss_records(workload)),
        "padding_fraction": 1 - counter.real / counter.positions if counter else None,
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                          else trainer.optimizer).__name__ + (" fused" if trainer.args.optim.endswith("fused") else ""),
        "epoch_fraction": n_records / len(_records(1.0)), "prep_seconds": prep_seconds, "params": n_params,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ----------------------------------------------------------------------------------------------------------------
# The driver (parent process)
# ----------------------------------------------------------------------------------------------------------------
def matmul_flops(seconds: float = 1.5, n: int = 1024) -> dict[str, float]:
    """The best fp32 n×n @ n×n FLOP/s of this machine right now (all threads), through `torch.matmul` (MKL on a
    CPU: the roofline) and, on a CPU, through oneDNN (the best fp32 GEMM in the same torch wheel)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    kernels = {"torch.matmul": lambda: a @ b}
    from sft_hf.precision import cpu_has_native_bf16, gpu_has_native_bf16

    if (device == "cpu" and cpu_has_native_bf16()) or (device == "cuda" and gpu_has_native_bf16()):
        a16, b16 = a.bfloat16(), b.bfloat16()
        kernels["bf16 torch.matmul"] = lambda: a16 @ b16
    if device == "cpu":
        from sft_hf.speed.onednn_linear import _mm_t, onednn_pays

        if onednn_pays():
            kernels["oneDNN"] = lambda: _mm_t(a, b)
    rates = {}
    for name, matmul in kernels.items():
        best, deadline = 0.0, time.perf_counter() + seconds
        for _ in range(3):
            matmul()  # warm up
        while time.perf_counter() < deadline:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(4):
                matmul()
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
        rates[name] = best
    return rates


# Dense bf16 tensor-core peaks (FLOP/s) for MFU on common GPUs; anything else: pass --peak-tflops.
GPU_PEAK_TFLOPS = {"H100": 989, "A100": 312, "L4": 121, "A10": 125, "L40": 181, "4090": 165, "3090": 71, "T4": 65,
                   "V100": 125}


def machine_header() -> str:
    import torch
    import transformers
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        cpu += f" (emulated: ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}, " \
               f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'default')})"
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · CPU {cpu}, {os.cpu_count()} cores "
            f"(torch threads {torch.get_num_threads()}), GPU {gpu}, load average {load} · Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"TRL {trl_version}")


def run_launched(name: str, opts) -> dict:
    """sft-hf through the user's command: `accelerate launch recipes/train.py --config <recipe>` in a subprocess
    (the recipe holds the workload's settings and the contender's flags). Tokens/s = the tokens of the records
    trained ÷ the run's own `train_runtime` (its `trainer.train()`); the loss is computed on the saved model."""
    import yaml
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.workloads import DATA_FILE, build_workload
    from sft_hf import tokenize_dataset

    model_dir = build_workload(opts.workload)
    n_records = len(_records(opts.fraction))
    slug = name.replace(" ", "_").replace("/", "_")
    out = Path(opts.log_dir, "launched", slug)
    flags = ["--model_name_or_path", model_dir, "--dataset_name", str(DATA_FILE), "--template", "alpaca",
             "--output_dir", str(out), "--overwrite_output_dir", "true", "--max_train_samples", str(n_records),
             "--max_eval_samples", "8", *OURS_WORKLOAD_FLAGS, *ALL_CONTENDERS[name]["flags"]]
    recipe = Path(opts.log_dir, f"{slug}.yaml")
    recipe.write_text(yaml.safe_dump({k[2:]: v for k, v in zip(flags[::2], flags[1::2])}, sort_keys=False))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "recipes/train.py", "--config", str(recipe)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if ALL_CONTENDERS[name].get("system_malloc"):
        env["SFT_HF_ALLOCATOR"] = "system"
    cpu_start = _cpu_seconds()
    with open(Path(opts.log_dir, f"{slug}.launched.log"), "a") as log_file:
        proc = subprocess.run(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} (accelerate launch) failed (exit {proc.returncode}); see {log_file.name}")
    cpu_seconds = _cpu_seconds() - cpu_start  # the whole command (load, tokenize, save too): a lower bound
    results = json.loads(Path(out, "all_results.json").read_text())
    state = json.loads(Path(out, "trainer_state.json").read_text())
    pads = [h["padding_fraction"] for h in state["log_history"] if "padding_fraction" in h]
    tokenizer = AutoTokenizer.from_pretrained(out)
    data = tokenize_dataset(Dataset.from_list(_records(1.0)[:n_records]), tokenizer, "alpaca", MAX_LENGTH,
                            verbose=False)
    tokens, seconds = sum(data["length"]), results["train_runtime"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype="float32")
    return {
        "contender": name if ALL_CONTENDERS[name].get("launch") else name + " · accelerate launch",
        "tokens": tokens, "seconds": seconds,
        "tokens_per_second": tokens / seconds, "cpu_seconds": cpu_seconds, "tokens_per_cpu_second": tokens / cpu_seconds,
        "train_loss": results.get("train_loss"), "final_loss": _final_loss(model, tokenizer, _loss_records(opts.workload)),
        "padding_fraction": statistics.mean(pads) if pads else None, "optimizer": "see log",
        "epoch_fraction": n_records / len(_records(1.0)), "prep_seconds": None,
        "params": sum(p.numel() for p in model.parameters()), "threads": None, "peak_rss_mb": None,
    }


def run_child(name: str, opts) -> dict:
    if ALL_CONTENDERS[name]["kind"] == "ours" and (opts.launch == "accelerate" or ALL_CONTENDERS[name].get("launch")):
        return run_launched(name, opts)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--child", name, "--child-out", out.name, "--workload", opts.workload,
               "--fraction", str(opts.slow_fraction if ALL_CONTENDERS[name].get("slow") else opts.fraction)]
        if opts.threads:
            cmd += ["--threads", str(opts.threads)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = Path(opts.log_dir, f"{name.replace(' ', '_').replace('/', '_')}.log")
        with open(log, "a") as log_file:
            proc = subprocess.run(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log}")
        return json.loads(Path(out.name).read_text())


def summarize(runs: dict[str, list[dict]], flops: list[dict[str, float]], peak_tflops: float | None = None,
              workload: str = "W1") -> str:
    """The markdown table, then how the sft-hf default compares with its targets.

    Two rooflines: 6 × parameters × tokens/s over the best `torch.matmul` rate measured in the run and over the best fp32 GEMM of any kernel measured (oneDNN on CPUs where it beats MKL)."""
    import torch

    # noise only ever slows a matmul down: the best measurement is the machine's rate
    matmul = max(f["torch.matmul"] for f in flops)
    best_gemm = max(max(f.values()) for f in flops)  # bf16 where native: the bf16 roofline
    rates = {name: [r["tokens_per_second"] for r in rs] for name, rs in runs.items()}
    medians = {name: statistics.median(v) for name, v in rates.items()}
    trl_best = max((n for n in TRL_BEST_CANDIDATES if n in medians), key=medians.get, default=None)
    gpu_peak = None
    if torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name(0)
        gpu_peak = peak_tflops * 1e12 if peak_tflops else next(
            (v * 1e12 for k, v in GPU_PEAK_TFLOPS.items() if k in gpu_name), None)
    columns = ["contender", "trained tokens/s, median (min–max)", "vs TRL best", "roofline (torch.matmul)",
               "roofline (best GEMM)", "tokens/CPU-s", "padding", "data prep", "peak RSS", "final loss", "epoch"]
    columns += ["MFU"] if torch.cuda.is_available() else []
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for name, rs in runs.items():
        rate, r0 = medians[name], rs[0]
        pads = [r["padding_fraction"] for r in rs if r["padding_fraction"] is not None]
        cells = [
            name,
            f"{rate:,.0f} ({min(rates[name]):,.0f}–{max(rates[name]):,.0f})",
            f"{rate / medians[trl_best]:.2f}×" if trl_best else "–",
            f"{6 * r0['params'] * rate / matmul:.0%}",
            f"{6 * r0['params'] * rate / best_gemm:.0%}",
            f"{statistics.median(r['tokens_per_cpu_second'] for r in rs):,.0f}",
            f"{statistics.median(pads):.1%}" if pads else "–",
            f"{statistics.median(r['prep_seconds'] for r in rs):.2f} s" if r0["prep_seconds"] is not None else "–",
            f"{max(r['peak_rss_mb'] for r in rs):,.0f} MB" if r0["peak_rss_mb"] is not None else "–",
            f"{statistics.median(r['final_loss'] for r in rs):.3f}",
            f"{r0['epoch_fraction']:.0%}",
        ]
        if torch.cuda.is_available():
            cells.append(f"{6 * r0['params'] * rate / gpu_peak:.1%}" if gpu_peak else "? (--peak-tflops)")
        lines.append("| " + " | ".join(cells) + " |")
    r0 = next(iter(runs.values()))[0]
    measured = "; ".join(f"{k} " + ", ".join(f"{f[k] / 1e9:.0f}" for f in flops if k in f) for k in flops[0])
    lines.append(f"\nRoofline: 6 × {r0['params'] / 1e6:.2f} M parameters × tokens/s ÷ {matmul / 1e9:.0f} GFLOP/s "
                 f"(best torch.matmul) or ÷ {best_gemm / 1e9:.0f} GFLOP/s (best GEMM, bf16 where native); 1024³ GFLOP/s "
                 f"measured before, between and after the repeats: {measured}.")
    for ours in [n for n in ("sft-hf default", "sft-hf default · accelerate launch") if n in medians]:
        checks = []
        if trl_best:
            target = "2×" if workload in ("W3", "W4") else "1.5×"  # the targets: 2× on the real model, 1.5× on W1
            checks.append(f"{medians[ours] / medians[trl_best]:.2f}× TRL's best ({trl_best}; target ≥ {target})")
        if TRL_DEFAULTS in medians:
            checks.append(f"{medians[ours] / medians[TRL_DEFAULTS]:.1f}× TRL's defaults (target ≥ 15×)")
        checks.append(f"{6 * r0['params'] * medians[ours] / matmul:.0%} of the torch.matmul roofline (target ≥ 50%), "
                      f"{6 * r0['params'] * medians[ours] / best_gemm:.0%} of the best-GEMM one")
        if gpu_peak:
            checks.append(f"MFU {6 * r0['params'] * medians[ours] / gpu_peak:.1%} of the GPU's dense bf16/fp16 peak "
                          f"({gpu_peak / 1e12:.0f} TFLOP/s)")
        lines.append(f"{ours}: " + "; ".join(checks) + ".")
    return "\n".join(lines)


def default_contenders(workload: str, cuda: bool, native_bf16: bool, allow_emulated_bf16: bool = False,
                        flash_attn: bool = True) -> tuple[list[str], list[str]]:
    """The contenders a run compares by default on this machine, and a line for each group left out and why. On a GPU
    without native bf16 (T4, V100) the bf16 contenders give way to TRL in fp16, the precision sft-hf picks there."""
    names = REAL_MODEL_CONTENDERS["cuda" if cuda else "cpu"] if workload in ("W3", "W4") else list(CONTENDERS)
    names = [n for n in names if cuda or not ALL_CONTENDERS[n].get("gpu")]
    notes = []
    if not native_bf16 and not allow_emulated_bf16:
        skipped = [n for n in names if ALL_CONTENDERS[n].get("bf16") or n == "sft-hf fp32"]
        notes.append(f"bf16 is emulated on this {'GPU' if cuda else 'CPU'}: skipping {skipped} (the sft-hf default "
                     f"is {'fp16' if cuda else 'fp32'} here; --allow-emulated-bf16 runs them)")
        names = [n for n in names if n not in skipped] + ([TRL_FP16] if cuda else [])
    flash = [n for n in names if "flash_attention_2" in (*ALL_CONTENDERS[n].get("flags", []),
                                                            ALL_CONTENDERS[n].get("attn"))]
    if flash and not flash_attn:
        notes.append(f"flash-attn is not installed: skipping {flash} (pip install flash-attn)")
        names = [n for n in names if n not in flash]
    return names, notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W1", choices=["W1", "W2", "W3", "W4"])
    parser.add_argument("--steps", type=int, default=None,
                        help=f"train this many steps of batch {BATCH_SIZE} (the first steps × {BATCH_SIZE} records); "
                             f"W3/W4 default: {W3_STEPS}")
    parser.add_argument("--launch", default="inprocess", choices=["inprocess", "accelerate"],
                        help="accelerate: sft-hf contenders run the user's command, `accelerate launch "
                             "recipes/train.py --config <recipe>`, in a subprocess (TRL's stay in-process)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--allow-emulated-bf16", action="store_true",
                        help="run bf16 contenders also where bf16 is emulated (50x slower matmuls)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=1.0, help="train on this fraction of the epoch's records")
    parser.add_argument("--slow-fraction", type=float, default=0.25,
                        help="fraction for the slow contenders (TRL defaults, TRL packing): their tokens/s is the "
                             "same on a slice, their final loss is then after that slice only")
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, 25%% of the epoch, 10%% for the slow contenders")
    parser.add_argument("--contenders", default=None,
                        help=f"comma-separated names (default: all of {list(CONTENDERS)}; ablations: "
                             f"{list(ABLATIONS)})")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every contender")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (CUDA only)")
    parser.add_argument("--log-dir", default=None, help="where each contender's output goes (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write every run's numbers here")
    parser.add_argument("--skip-data", action="store_true", help="skip the data-preparation comparison")
    parser.add_argument("--emulate-avx2-cpu", action="store_true",
                        help="cap oneDNN and ATen at AVX2 (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY) in every process: "
                             "a CPU without AVX-512 and native bf16, like the one TRL's defaults were first measured on")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child and ALL_CONTENDERS[opts.child]["kind"] == "ours" and not ALL_CONTENDERS[opts.child].get("system_malloc"):
        from sft_hf.speed import allocator

        allocator.use_fast_allocator()  # as recipes/train.py does: re-runs this child once on tcmalloc
    from benchmarks.workloads import build_workload, train_records  # noqa: F811

    if opts.child:
        Path(opts.child_out).write_text(json.dumps(run_one(opts.child, opts.workload, opts.fraction, opts.threads)))
        return
    if opts.emulate_avx2_cpu:  # read when torch loads and oneDNN starts: before either, inherited by the children
        os.environ.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    if opts.quick:
        opts.repeats, opts.fraction, opts.slow_fraction = 1, 0.25, min(opts.slow_fraction, 0.1)
    import torch

    from sft_hf.precision import cpu_has_native_bf16, gpu_has_native_bf16

    cuda = torch.cuda.is_available()
    if opts.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device here")
    if opts.device == "cpu" and cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every contender on the CPU
        cuda = False
    if opts.workload == "W4" and not cuda:
        parser.error("W4 (≈0.6 B parameters) is a GPU workload: use --device cuda on a GPU machine")
    real_model = opts.workload in ("W3", "W4")
    steps = opts.steps or (W3_STEPS if real_model else None)
    if steps:
        opts.fraction = steps * BATCH_SIZE / len(train_records())
        opts.slow_fraction = opts.fraction
    opts.skip_data = opts.skip_data or real_model
    opts.slow_fraction = min(opts.slow_fraction, opts.fraction)
    if opts.contenders is not None:
        names = [n.strip() for n in opts.contenders.split(",")]
    else:
        names, notes = default_contenders(
            opts.workload, cuda, gpu_has_native_bf16() if cuda else cpu_has_native_bf16(), opts.allow_emulated_bf16,
            importlib.util.find_spec("flash_attn") is not None)
        for note in notes:
            print(note)
    unknown = [n for n in names if n not in ALL_CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; known: {list(ALL_CONTENDERS)}")
    opts.log_dir = opts.log_dir or tempfile.mkdtemp(prefix="sft_hf_bench_")
    Path(opts.log_dir).mkdir(parents=True, exist_ok=True)

    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)  # the matmul roofline with the same threads as the contenders
    header = machine_header()
    print(header)
    build_workload(opts.workload)
    print(f"Workload {opts.workload}, {opts.repeats} repeat(s), sft-hf contenders "
          f"{'through accelerate launch' if opts.launch == 'accelerate' else 'in-process'} unless named so, "
          f"fraction {opts.fraction} of the epoch "
          f"({opts.slow_fraction} for the slow contenders); logs in {opts.log_dir}", flush=True)
    runs = {name: [] for name in names}
    flops = []
    for repeat in range(opts.repeats):
        flops.append(matmul_flops())
        order = names[repeat % len(names):] + names[: repeat % len(names)]  # rotate: no contender always first
        for name in order:
            r = run_child(name, opts)
            runs[name].append(r)
            print(f"  repeat {repeat + 1}/{opts.repeats} · {name}: {r['tokens_per_second']:,.0f} tokens/s "
                  f"({r['tokens']:,} tokens in {r['seconds']:.1f} s, {r['tokens_per_cpu_second']:,.0f} per CPU-s), "
                  f"final loss {r['final_loss']:.3f}", flush=True)
    flops.append(matmul_flops())
    print()
    print(summarize(runs, flops, opts.peak_tflops, opts.workload))
    if not opts.skip_data:
        from benchmarks.bench_data import markdown, measure

        print()
        print(markdown(measure(build_workload(opts.workload), opts.repeats), len(train_records())))
    if opts.json:
        Path(opts.json).write_text(json.dumps({"machine": header, "runs": runs, "matmul_flops": flops}, indent=1))


if __name__ == "__main__":
    main()
