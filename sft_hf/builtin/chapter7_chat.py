"""`builtin:chapter7-chat`: a small multi-turn chat dataset built offline from chapter 7's 1100 Alpaca records.

Records are taken in file order within chapter 7's own split (935 train, 110 test, 55 validation: no record crosses
splits) and chained into conversations of 2-4 exchanges (user: instruction + input, assistant: output); every third
conversation starts with a system prompt. The source file is `$SFT_HF_CHAPTER7_DATA`, else
`../shared/data/instruction-data.json` beside the checkout (or the working directory).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from sft_hf.errors import DataError
from sft_hf.run.cache import CACHE, atomic_write_dir

VERSION = "v1"
SYSTEM_PROMPT = "You are a helpful assistant. Answer each request directly."
SPLITS = {"train": (0, 935), "test": (935, 1045), "validation": (1045, 1100)}  # chapter 7's split, in file order


def chapter7_source() -> Path:
    candidates = [os.environ.get("SFT_HF_CHAPTER7_DATA"),
                  Path(__file__).resolve().parents[3] / "shared" / "data" / "instruction-data.json",
                  Path.cwd().parent / "shared" / "data" / "instruction-data.json"]
    for path in filter(None, candidates):
        if Path(path).is_file():
            return Path(path)
    raise DataError("builtin:chapter7-chat needs chapter 7's instruction-data.json: set SFT_HF_CHAPTER7_DATA to its "
                    f"path (looked in {[str(c) for c in candidates if c]})")


def chain_into_conversations(records: list[dict], seed: int = 0) -> list[dict]:
    """Consecutive records → conversations of 2-4 exchanges ({"messages": [...]}); a last single record joins the
    conversation before it."""
    rng, conversations, i = random.Random(seed), [], 0
    while i < len(records):
        n = rng.randint(2, 4)
        chunk = records[i : i + n] if len(records) - (i + n) != 1 else records[i : i + n + 1]
        i += len(chunk)
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if len(conversations) % 3 == 0 else []
        for r in chunk:
            user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        conversations.append({"messages": messages})
    return conversations


def write_chapter7_chat() -> dict[str, Path]:
    source = chapter7_source()
    data = source.read_bytes()
    records = json.loads(data)

    def write(folder: Path):
        for split, (a, b) in SPLITS.items():
            with open(folder / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps(c) + "\n" for c in chain_into_conversations(records[a:b]))

    folder = atomic_write_dir(CACHE / f"chapter7-chat-{VERSION}-{hashlib.sha256(data).hexdigest()[:12]}", write)
    return {split: folder / f"{split}.jsonl" for split in SPLITS}
