"""Supervised instruction fine-tuning: the whole run is sft_hf/train.py (also `sft-hf train`).

    accelerate launch recipes/train.py                                  # the offline default recipe
    accelerate launch recipes/train.py --config recipes/gpt2-medium-alpaca.yaml --learning_rate 1e-4

Every value comes from the YAML recipe and any flag overrides it. Without --config: the default recipe
(recipes/default.yaml), unless the command line names a model or dataset (then TrainingArguments' / TRL's defaults).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

if __name__ == "__main__":
    from sft_hf.speed import allocator

    allocator.use_fast_allocator()  # before torch allocates anything: re-runs this command once on tcmalloc (Linux)
    from sft_hf.errors import run_cli
    from sft_hf.train import main

    sys.exit(run_cli(main))  # bad data / template / recipe: one line on stderr and exit code 2, not a traceback
