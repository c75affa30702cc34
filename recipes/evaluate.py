"""Evaluate an instruction-tuned model: the code is sft_hf/evaluation/cli.py (also `sft-hf evaluate`).

    python recipes/evaluate.py --model outputs/run --dataset_name data.json --judge_backend ollama --judge_model llama3
    python recipes/evaluate.py --responses run/test_responses.json --compare_with base/test_responses.json ...

`python recipes/evaluate.py --help` lists every option.
"""
import sys
from pathlib import Path

# Python puts this script's folder first on sys.path, where this file would stand in for the `evaluate` library that
# scoring imports: the checkout's root takes its place (which also runs a checkout without installing).
sys.path[0] = str(Path(__file__).resolve().parent.parent)

if __name__ == "__main__":
    from sft_hf.errors import run_cli
    from sft_hf.evaluation.cli import main

    sys.exit(run_cli(main))  # bad arguments, data, responses file or judge: one line, exit code 2 (Ctrl-C: 130)
