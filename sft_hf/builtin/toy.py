"""Offline assets for the default recipe: a generated instruction dataset with exactly checkable answers, a
byte-level BPE tokenizer trained on it, and a small Llama built from a config. Everything is deterministic and
written to a cache folder, then loaded through the normal `load_dataset` / `from_pretrained` paths.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from sft_hf.run.cache import CACHE, atomic_write_dir

TOY_VERSION = "v3"
EOS = "<|endoftext|>"


def _digits(rng: random.Random) -> list[str]:
    # Distinct digits: each output token has one source in the input, which a small model learns to attend to fast.
    return [str(d) for d in rng.sample(range(10), rng.randint(3, 6))]


# instruction → how to answer from the digits. Every answer is checkable by string equality, and depends only on which
# digits occur (not on where), which a small model learns within minutes on a CPU.
TASKS = {
    "Sort the numbers in ascending order.": lambda xs: " ".join(sorted(xs)),
    "Sort the numbers in descending order.": lambda xs: " ".join(sorted(xs, reverse=True)),
    "What is the largest number?": lambda xs: max(xs),
    "What is the smallest number?": lambda xs: min(xs),
}


def make_toy_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        instruction = rng.choice(list(TASKS))
        xs = _digits(rng)
        records.append({"instruction": instruction, "input": " ".join(xs), "output": TASKS[instruction](xs)})
    return records


def write_builtin_dataset(name: str) -> dict[str, Path]:
    if name != "toy-tasks":
        raise ValueError(f"unknown built-in dataset {name!r}: the built-in one is 'toy-tasks'")
    sizes = {"train": 6000, "validation": 100, "test": 200}

    def write(folder: Path):
        seen = set()
        for i, (split, n) in enumerate(sizes.items()):
            records = []
            for r in make_toy_records(4 * n, seed=1000 + i):  # held-out splits share no prompt with train
                key = (r["instruction"], r["input"])
                if key not in seen and len(records) < n:
                    seen.add(key)
                    records.append(r)
            with open(folder / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    folder = atomic_write_dir(CACHE / f"toy-tasks-{TOY_VERSION}", write)
    return {split: folder / f"{split}.jsonl" for split in sizes}


def train_bpe_tokenizer(texts, vocab_size: int, eos_token: str = EOS):
    """A byte-level BPE (GPT-2 style) trained on `texts`, with `eos_token` as EOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=eos_token)


def build_builtin_model(name: str) -> str:
    """Writes the built-in model folder once (config + random weights + tokenizer) and returns its path."""
    if name != "tiny-llama":
        raise ValueError(f"unknown built-in model {name!r}: the built-in one is 'tiny-llama'")

    def write(folder: Path):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from sft_hf.templates import get_template

        files = write_builtin_dataset("toy-tasks")
        template = get_template("alpaca")
        texts = []
        for path in files.values():
            for line in open(path):
                r = json.loads(line)
                texts.append(template.format_prompt(r) + r["output"])
        tokenizer = train_bpe_tokenizer(texts, vocab_size=384)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return str(atomic_write_dir(CACHE / f"tiny-llama-{TOY_VERSION}", write))
