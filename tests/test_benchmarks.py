"""The benchmark's workload is chapter 7's train split on a 4 M Llama, its table does the arithmetic it claims, and the
trainer's per-step token counting (sync-free) logs exact numbers. No timings are asserted: speed lives in
benchmarks/bench_train.py."""
import json
import logging
import random
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from sft_hf import InstructionDataCollator, InstructionTrainer, SFTArguments, tokenize_dataset
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


def _rows(vocab_size: int, eos: int) -> list[dict]:
    rng = random.Random(0)
    return [{"input_ids": [rng.randrange(3, vocab_size) for _ in range(n - 1)] + [eos]} for n in (9, 5, 7, 3)]


def test_trainer_logs_exact_token_counts_and_batching(tiny_model_dir, tmp_path, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = Dataset.from_list(_rows(model.config.vocab_size, model.config.eos_token_id))
    args = SFTArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                        save_strategy="no", report_to="none", train_sampling_strategy="sequential",
                        disable_tqdm=True, use_cpu=True)
    with caplog.at_level(logging.INFO, logger="sft_hf.trainer"):
        trainer = InstructionTrainer(model=model, args=args, train_dataset=data,
                                     data_collator=InstructionDataCollator(model.config.pad_token_id))
    assert "Batching: padded batches in sequential order" in caplog.text
    trainer.train()
    logs = [h for h in trainer.state.log_history if "padding_fraction" in h]
    # batch 1: rows of 9 and 5 tokens → 18 positions, 4 of them padding; batch 2: 7 and 3 → 14 positions, 4 padding
    assert [h["padding_fraction"] for h in logs] == [round(4 / 18, 4), round(4 / 14, 4)]
    assert trainer.trained_tokens_total == (9 - 1) + (5 - 1) + (7 - 1) + (3 - 1)  # every token after the first


def test_trainer_counts_the_padding_free_filler_as_padding(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa_varlen")
    data = Dataset.from_list(_rows(model.config.vocab_size, model.config.eos_token_id))
    args = SFTArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                        save_strategy="no", report_to="none", train_sampling_strategy="sequential",
                        disable_tqdm=True, use_cpu=True)
    collator = InstructionDataCollator(model.config.pad_token_id, padding_free=True, pad_to_multiple_of=8)
    trainer = InstructionTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "padding_fraction" in h]
    # rows of 9 + 5 tokens → 16 positions, 2 of them filler; rows of 7 + 3 → 16 positions, 6 of them filler
    assert [h["padding_fraction"] for h in logs] == [round(2 / 16, 4), round(6 / 16, 4)]
    # each example's first token is not a target, nor is the filler
    assert trainer.trained_tokens_total == (9 - 1) + (5 - 1) + (7 - 1) + (3 - 1)


def test_padding_free_without_varlen_kernel_is_flagged(tiny_model_dir, tmp_path, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")  # no varlen kernel
    data = Dataset.from_list(_rows(model.config.vocab_size, model.config.eos_token_id))
    args = SFTArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, save_strategy="no",
                        report_to="none", use_cpu=True)
    collator = InstructionDataCollator(model.config.pad_token_id, padding_free=True)
    with caplog.at_level(logging.INFO, logger="sft_hf.trainer"):
        InstructionTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    assert "Batching: padding-free rows" in caplog.text and "WARNING: without a variable-length" in caplog.text


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


def test_onednn_linear_matches_nn_linear(tiny_model_dir):
    from sft_hf.speed import onednn_linear

    if onednn_linear._linear is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN linear op")
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fast = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_linear = sum(type(m) is torch.nn.Linear for m in fast.modules())
    assert onednn_linear.use_onednn_linear(fast) == n_linear == 2 * 7 + 1  # 7 per layer + the LM head
    assert list(fast.state_dict()) == list(stock.state_dict())  # save_pretrained writes the same tensors
    ids = torch.randint(3, stock.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    losses = []
    for model in (stock, fast):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (name, p_stock), p_fast in zip(stock.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast.grad, p_stock.grad, rtol=1e-4, atol=1e-6, msg=name)
