"""The benchmark's workload is chapter 7's train split on a 4 M Llama, its table does the arithmetic it claims, and the
trainer's per-step token counting (sync-free) logs exact numbers. No timings are asserted: speed lives in
benchmarks/bench_train.py."""
import json
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from sft_hf import tokenize_dataset
from sft_hf.builtin import toy
from sft_hf.templates import get_template

from conftest import INSTRUCTION_DATA

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import bench_train, workloads  # noqa: E402


def test_w1_workload_is_chapter_7s_train_split_on_a_4m_llama(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "CACHE", tmp_path)
    model_dir = workloads.build_workload("W1")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    # 4096×256 tied embedding + 4 × (4·256² attention + 3·256·688 MLP + 2·256 norms) + 256 final norm
    assert sum(p.numel() for p in model.parameters()) == 4096 * 256 + 4 * (4 * 256**2 + 3 * 256 * 688 + 512) + 256
    records = workloads.train_records()
    assert records == json.loads(INSTRUCTION_DATA.read_text())[:935]  # chapter 7's train split, in file order
    data = tokenize_dataset(Dataset.from_list(records), tokenizer, "alpaca", 1024, verbose=False)
    alpaca = get_template("alpaca")
    expected = [len(tokenizer(alpaca.format_prompt(r))["input_ids"]) + len(tokenizer(r["output"])["input_ids"]) + 1
                for r in records]  # prompt + response + EOS, each tokenized alone: nothing truncated at 1024
    assert data["length"] == expected


def test_summary_ratios_and_roofline():
    def run(rate, loss=2.0, params=4_000_000):
        return dict(tokens_per_second=rate, tokens_per_cpu_second=rate, padding_fraction=0.01, prep_seconds=0.1,
                    peak_rss_mb=900.0, final_loss=loss, epoch_fraction=1.0, params=params)

    runs = {
        "sft-hf default": [run(3000), run(2700), run(3300)],
        "TRL fp32 padded": [run(2000), run(1000), run(2100)],
        "TRL fp32 padding_free": [run(1500)],
        bench_train.TRL_DEFAULTS: [run(150)],
    }
    flops = [{"torch.matmul": 100e9, "oneDNN": 240e9}, {"torch.matmul": 144e9, "oneDNN": 288e9}]
    table = bench_train.summarize(runs, flops)
    ours = next(line for line in table.splitlines() if line.startswith("| sft-hf default"))
    cells = [c.strip() for c in ours.split("|")[1:-1]]
    # median 3000, TRL's best median 2000 → 1.50×; 6 × 4 M × 3000 = 72 GFLOP/s over the best measurements:
    # 144 GFLOP/s torch.matmul → 50%, 288 GFLOP/s best GEMM → 25%
    assert cells[1:5] == ["3,000 (2,700–3,300)", "1.50×", "50%", "25%"]
    assert "1.50× TRL's best (TRL fp32 padded" in table and "20.0× TRL's defaults" in table


def test_gpu_contenders_and_mfu(monkeypatch):
    """`--device cuda`: on an A100 the real-model comparison without flash-attn installed drops its two
    flash-attention contenders and says so; on a T4 (bf16 emulated) TRL's bf16 contenders give way to TRL in fp16.
    The table's MFU is 6 × parameters × tokens/s over the GPU's dense peak."""
    names, notes = bench_train.default_contenders("W3", cuda=True, native_bf16=True, flash_attn=False)
    assert names == ["sft-hf default", "TRL bf16 autocast padding_free (no checkpointing)",
                     "TRL defaults (bf16 autocast + grad checkpointing)"]
    assert notes == ["flash-attn is not installed: skipping ['sft-hf flash-attention', 'TRL bf16 padding_free "
                     "flash-attention'] (pip install flash-attn)"]
    names, notes = bench_train.default_contenders("W3", cuda=True, native_bf16=False, flash_attn=True)
    assert names == ["sft-hf default", "sft-hf flash-attention", bench_train.TRL_FP16]
    assert "the sft-hf default is fp16 here" in notes[0]
    assert bench_train.TRL_FP16 in bench_train.TRL_BEST_CANDIDATES
    cpu, _ = bench_train.default_contenders("W3", cuda=False, native_bf16=False)
    assert not any(bench_train.ALL_CONTENDERS[n].get("gpu") for n in cpu)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    run = dict(tokens_per_second=52_000, tokens_per_cpu_second=1.0, padding_fraction=0.0, prep_seconds=0.1,
               peak_rss_mb=900.0, final_loss=1.0, epoch_fraction=0.3, params=135_000_000)
    table = bench_train.summarize({"sft-hf default": [run], bench_train.TRL_FP16: [dict(run, tokens_per_second=26_000)]},
                                  [{"torch.matmul": 19.5e12}], workload="W3")
    # 6 × 135 M × 52,000 tokens/s = 42.1 TFLOP/s of the A100's 312
    assert table.splitlines()[2].endswith("| 13.5% |")
    assert "2.00× TRL's best" in table and "MFU 13.5% of the GPU's dense bf16/fp16 peak (312 TFLOP/s)" in table


def test_benchmark_data_prep_matches_trl_tokens(tmp_path, monkeypatch):
    """Both preparations produce the same 53,366 tokens for W1: the benchmark compares like with like."""
    pytest.importorskip("trl")
    from benchmarks import bench_data

    monkeypatch.setattr(toy, "CACHE", tmp_path)
    model_dir = workloads.build_workload("W1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = workloads.train_records()[:200]
    _, ours = bench_data.time_ours(records, tokenizer)
    _, trl = bench_data.time_trl(bench_data.trl_trainer_for_data_prep(model_dir, tokenizer), records)
    assert ours["input_ids"] == trl["input_ids"]
