"""The `datasets` map step: template + tokenize + EOS + truncation, once, cached by `datasets`."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, DatasetDict

from sft_hf.templates import ChatTemplate, Template, get_template

logger = logging.getLogger(__name__)


def _tokenize_batch(batch: dict, tokenizer, template: Template, max_length: int | None, eos_token_id: int) -> dict:
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    prompts, responses = zip(*(template.render(r, tokenizer) for r in records)) if records else ((), ())
    # A chat template writes its own BOS text; other templates let the tokenizer add its special tokens.
    prompt_ids = tokenizer(list(prompts), add_special_tokens=not isinstance(template, ChatTemplate))["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    out = {"input_ids": [], "prompt_length": [], "length": [], "truncated": []}
    for prompt, response in zip(prompt_ids, response_ids):
        response = response + [eos_token_id]  # the stop token the model must learn to write
        truncated = max_length is not None and len(prompt) + len(response) > max_length
        if truncated:
            budget = max_length - len(response)  # tokens left for the prompt
            if budget < 1:
                continue  # the response alone does not fit: drop the example (counted by the caller)
            prompt = prompt[-budget:]  # keep the prompt's end: the input and the response header
        out["input_ids"].append(prompt + response)
        out["prompt_length"].append(len(prompt))
        out["length"].append(len(prompt) + len(response))
        out["truncated"].append(truncated)
    return out


@dataclass
class TokenizeStats:
    split: str
    examples_in: int
    kept: int
    truncated: int
    dropped: int
    mean_length: float
    max_length: int
    p95_length: float
    tokens: int
    trained_tokens: int  # response tokens incl. EOS (what completion_only_loss trains)

    def __str__(self) -> str:
        return (
            f"[{self.split}] {self.examples_in} examples → kept {self.kept}, truncated {self.truncated}, "
            f"dropped {self.dropped} (response longer than max_length) | tokens/example mean {self.mean_length:.1f}, "
            f"p95 {self.p95_length:.0f}, max {self.max_length} | {self.tokens} tokens, {self.trained_tokens} in responses"
        )


def tokenize_dataset(
    dataset: Dataset | DatasetDict,
    tokenizer,
    template: str | Template = "alpaca",
    max_length: int | None = 1024,
    num_proc: int | None = None,
    verbose: bool = True,
) -> Dataset | DatasetDict:
    """Template and tokenize every record, append EOS, record where the response starts.

    Output columns: `input_ids` (prompt + response + EOS), `prompt_length` (index of the first response token),
    `length`, `truncated`. Over-long examples lose prompt tokens from the left, never response tokens; examples whose
    response + EOS alone exceed `max_length` are dropped. Statistics are printed per split.
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {k: tokenize_dataset(v, tokenizer, template, max_length, num_proc, verbose) for k, v in dataset.items()}
        )
    template = get_template(template)
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set one (e.g. tokenizer.eos_token = '</s>')")
    if len(dataset) == 0:
        return dataset
    n_in = len(dataset)
    split = dataset.split and str(dataset.split) or "data"
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        num_proc=num_proc if num_proc and num_proc > 1 and n_in >= 1000 * num_proc else None,
        remove_columns=dataset.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, template=template, max_length=max_length, eos_token_id=eos_token_id),
        desc=f"Tokenizing {split} with template {template.name!r}",
    )
    stats = compute_stats(tokenized, split, n_in)
    tokenized.info.description = str(stats)
    if verbose:
        print(stats)
    if len(tokenized) == 0:
        raise ValueError(f"[{split}] no example is left after truncation to max_length={max_length}")
    return tokenized


def compute_stats(tokenized: Dataset, split: str, n_in: int) -> TokenizeStats:
    lengths = np.asarray(tokenized["length"], dtype=np.int64)
    prompt_lengths = np.asarray(tokenized["prompt_length"], dtype=np.int64)
    return TokenizeStats(
        split=split,
        examples_in=n_in,
        kept=len(tokenized),
        truncated=int(np.sum(tokenized["truncated"])) if len(tokenized) else 0,
        dropped=n_in - len(tokenized),
        mean_length=float(lengths.mean()) if len(lengths) else 0.0,
        max_length=int(lengths.max()) if len(lengths) else 0,
        p95_length=float(np.percentile(lengths, 95)) if len(lengths) else 0.0,
        tokens=int(lengths.sum()),
        trained_tokens=int((lengths - prompt_lengths).sum()),
    )
