"""The `datasets` map step: template + tokenize + EOS + truncation, once, cached by `datasets`."""
from __future__ import annotations

import logging
import string
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, DatasetDict

from sft_hf.templates import ChatTemplate, Template, TemplateError, get_template

logger = logging.getLogger(__name__)


def _render(record: dict, index: int, split: str, tokenizer, template: Template) -> tuple[str, str]:
    """The template's (prompt, response), or a TemplateError naming the split, the record and the field."""
    try:
        prompt, response = template.render(record, tokenizer)
    except TemplateError as e:
        raise TemplateError(f"[{split}] record {index}: {e}") from None
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a record the data checks did not see
        raise TemplateError(f"[{split}] record {index}: template {template.name!r} cannot render it: {e!r}") from None
    for field, text in (("prompt", prompt), ("output", response)):
        if not isinstance(text, str):
            raise TemplateError(f"[{split}] record {index}, field {field!r}: expected text, got {type(text).__name__}")
    return prompt, response


def _tokenize_batch(batch: dict, indices: list[int], tokenizer, template: Template, max_length: int | None,
                    eos_token_id: int, split: str = "data") -> dict:
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    rendered = [_render(r, i, split, tokenizer, template) for r, i in zip(records, indices)]
    prompts, responses = zip(*rendered) if records else ((), ())
    # A chat template writes its own BOS text; other templates let the tokenizer add its special tokens.
    prompt_ids = tokenizer(list(prompts), add_special_tokens=not isinstance(template, ChatTemplate))["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    out = {"input_ids": [], "prompt_length": [], "length": [], "truncated": []}
    for prompt, response, index in zip(prompt_ids, response_ids, indices):
        if not prompt:  # the first response token needs a token before it to be predicted from
            raise TemplateError(f"[{split}] record {index}: template {template.name!r} renders an empty prompt")
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
    split: str | None = None,
) -> Dataset | DatasetDict:
    """Template and tokenize every record, append EOS, record where the response starts.

    Output columns: `input_ids` (prompt + response + EOS), `prompt_length` (index of the first response token),
    `length`, `truncated`. Over-long examples lose prompt tokens from the left, never response tokens; examples whose
    response + EOS alone exceed `max_length` are dropped. Statistics are printed per split.
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {k: tokenize_dataset(v, tokenizer, template, max_length, num_proc, verbose, split=k)
             for k, v in dataset.items()}
        )
    template = get_template(template)
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise TemplateError(
            f"the tokenizer has no eos_token (pad_token: {tokenizer.pad_token!r}): every response must end with EOS "
            "for the model to learn to stop; set one, e.g. tokenizer.eos_token = '</s>'"
        )
    if len(dataset) == 0:
        return dataset
    n_in = len(dataset)
    split = split or (dataset.split and str(dataset.split)) or "data"  # split_dataset's parts all say "train"
    check_template_fits(template, tokenizer, max_length, dataset.column_names)
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        with_indices=True,
        num_proc=num_proc if num_proc and num_proc > 1 and n_in >= 1000 * num_proc else None,
        remove_columns=dataset.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, template=template, max_length=max_length, eos_token_id=eos_token_id,
                       split=split),
        desc=f"Tokenizing {split} with template {template.name!r}",
    )
    stats = compute_stats(tokenized, split, n_in)
    tokenized.info.description = str(stats)
    if verbose:
        print(stats)
    if len(tokenized) == 0:
        raise TemplateError(
            f"[{split}] no example is left after truncation to max_length={max_length}: every response + EOS is "
            f"longer (the shortest has {min_response_length(dataset, tokenizer, template)} tokens)"
        )
    return tokenized


def template_overhead(template: Template, tokenizer) -> int:
    """Tokens the template itself adds to every example: prompt and response text of an empty record, plus EOS."""
    empty = {field: "" for field in template.fields() | {"instruction", "input", "output"}}
    prompt, response = template.render(empty, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=not isinstance(template, ChatTemplate))["input_ids"]
    return len(prompt_ids) + len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1


def check_template_fits(template: Template, tokenizer, max_length: int | None, columns: list[str]) -> None:
    """Errors found once, before the map step: a field the data lacks, or a max_length the template cannot fit."""
    if "messages" not in columns:
        prompt_fields = {f for _, f, _, _ in string.Formatter().parse(template.prompt) if f}  # `input` is optional
        missing = sorted(prompt_fields - set(columns))
        if missing:
            raise TemplateError(f"template {template.name!r} uses field(s) {missing}, which the data lacks ({columns})")
    if isinstance(template, ChatTemplate) and not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'chat_template' needs a tokenizer that has a chat template")
    if max_length is not None:
        overhead = template_overhead(template, tokenizer)
        if max_length <= overhead:  # not even one response token would fit next to the template's own text
            raise TemplateError(
                f"max_length={max_length} is too small for template {template.name!r}: its own text and EOS take "
                f"{overhead} tokens, leaving no room for an instruction and a response; raise max_length"
            )


def min_response_length(dataset: Dataset, tokenizer, template: Template) -> int:
    rendered = (template.render(r, tokenizer)[1] for r in dataset.select(range(min(len(dataset), 1000))))
    return min(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in rendered)


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
