"""Data preparation time (template + tokenize + EOS + lengths): sft-hf's `tokenize_dataset` vs TRL's SFTTrainer
dataset preparation, on the same records and tokenizer, alternating, and how ours scales with `num_proc`.

    HF_HUB_OFFLINE=1 python benchmarks/bench_data.py --workload W1 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import datasets
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.workloads import build_workload, train_records  # noqa: E402
from sft_hf import get_template, tokenize_dataset  # noqa: E402

datasets.disable_caching()  # a cache hit would time a file read, not the preparation
datasets.disable_progress_bars()


def time_ours(records: list[dict], tokenizer, num_proc: int | None = None) -> tuple[float, Dataset]:
    raw = Dataset.from_list(records)
    start = time.perf_counter()
    tokenized = tokenize_dataset(raw, tokenizer, "alpaca", max_length=1024, num_proc=num_proc, verbose=False)
    return time.perf_counter() - start, tokenized


def alpaca_text(record: dict) -> str:
    return get_template("alpaca").format_prompt(record) + record["output"]


def trl_trainer_for_data_prep(model_dir: str, tokenizer):
    """A TRL SFTTrainer whose only use is its `_prepare_dataset` (the preparation it runs in `__init__`)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = SFTConfig(output_dir="/tmp/sft_hf_bench_trl_data", report_to="none", bf16=False, use_cpu=True)
    tiny = Dataset.from_list([{"text": "warm up"}])
    return SFTTrainer(model=model, args=args, train_dataset=tiny, processing_class=tokenizer)


def time_trl(trainer, records: list[dict], num_proc: int | None = None) -> tuple[float, Dataset]:
    raw = Dataset.from_list(records)
    trainer.args.dataset_num_proc = num_proc
    start = time.perf_counter()
    prepared = trainer._prepare_dataset(raw, trainer.processing_class, trainer.args, False, alpaca_text, "train")
    return time.perf_counter() - start, prepared


def measure(model_dir: str, repeats: int, scale: int = 10, quiet: bool = False) -> dict:
    """Median seconds per contender: W1 records as-is, and `scale`× the records with num_proc 1 and 2."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the table readable
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = train_records()
    trl_trainer = trl_trainer_for_data_prep(model_dir, tokenizer)
    big = records * scale
    cases = {
        "ours": lambda: time_ours(records, tokenizer)[0],
        "trl": lambda: time_trl(trl_trainer, records)[0],
        f"ours x{scale} num_proc=1": lambda: time_ours(big, tokenizer, 1)[0],
        f"ours x{scale} num_proc=2": lambda: time_ours(big, tokenizer, 2)[0],
        f"trl x{scale} num_proc=1": lambda: time_trl(trl_trainer, big, 1)[0],
        f"trl x{scale} num_proc=2": lambda: time_trl(trl_trainer, big, 2)[0],
    }
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():  # alternating: machine noise hits every contender alike
            times[name].append(run())
    ours_tokens = sum(time_ours(records, tokenizer)[1]["length"])
    trl_tokens = sum(len(ids) for ids in time_trl(trl_trainer, records)[1]["input_ids"])
    result = {name: statistics.median(ts) for name, ts in times.items()}
    result["tokens"] = {"ours": ours_tokens, "trl": trl_tokens}
    result["scale"] = scale
    return result


def markdown(result: dict, n_records: int) -> str:
    scale = result["scale"]
    rows = [
        "| data preparation (template + tokenize + EOS + lengths) | sft-hf | TRL SFTTrainer | TRL / sft-hf |",
        "| --- | --- | --- | --- |",
        f"| {n_records} records, num_proc=None | {result['ours']:.2f} s | {result['trl']:.2f} s "
        f"| {result['trl'] / result['ours']:.2f}× |",
    ]
    for n in (1, 2):
        ours, trl = result[f"ours x{scale} num_proc={n}"], result[f"trl x{scale} num_proc={n}"]
        rows.append(f"| {n_records * scale} records, num_proc={n} | {ours:.2f} s | {trl:.2f} s | {trl / ours:.2f}× |")
    tokens = result["tokens"]
    rows.append(f"\nTokens: sft-hf {tokens['ours']:,}, TRL {tokens['trl']:,} (TRL tokenizes prompt + output as one "
                "text; sft-hf tokenizes them apart to know where the response starts).")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W1", choices=["W1", "W2"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=10, help="replicate the records this many times for num_proc")
    opts = parser.parse_args(argv)
    result = measure(build_workload(opts.workload), opts.repeats, opts.scale)
    print(markdown(result, len(train_records())))


if __name__ == "__main__":
    main()
