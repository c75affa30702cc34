"""Fold a LoRA adapter into its base model and save a plain transformers model.

    python recipes/merge_lora.py outputs/qwen2.5-0.5b-lora outputs/qwen2.5-0.5b-merged [--dtype bfloat16]

The merged folder loads with `AutoModelForCausalLM.from_pretrained` (no peft needed) and gives the same logits
as the adapter model; the tokenizer and sft_template.json are copied along.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from sft_hf.lora import main  # noqa: E402
from sft_hf.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))  # not an adapter, out_dir not empty: one line and exit code 2
