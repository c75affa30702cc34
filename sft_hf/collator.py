"""Batching: pad to the longest row, build labels, mask what must not be trained.

Labels are built from each row's own length, not by comparing token ids with the pad id. That is what keeps the
row's EOS a training target when pad == eos (chapter 7 masks "every end-of-text but the first" for the same reason;
masking by id is the classic "the model never stops" bug).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sft_hf.precision import settle_precision
from sft_hf.speed.varlen_attention import NAME as VARLEN_ATTENTION

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and every HF loss) skips
# Bookkeeping a batch carries besides the model's inputs; InstructionTrainer.training_step takes it out.
SOURCE_COUNTS = "source_counts"  # (num_sources, 2): examples and trained tokens of each mixture source
STREAM_POSITION = "stream_position"  # the last row's position in a stream, which a resume continues after


@dataclass
class InstructionDataCollator:
    """A Hugging Face data collator for rows made by `tokenize_dataset` (or any rows with `input_ids`).

    Returns `input_ids`, `attention_mask` and `labels` (right padding), or with `padding_free=True` one row per batch
    with `position_ids` restarting at 0 for each example and no padding at all (attention stays within an example).
    Rows packed by `sft_hf.packing` (with `seq_lengths`) are taken apart into their examples first.

    - `completion_only_loss`: train only the tokens the row's `completion_mask` marks (1 = trained): the responses,
      or each assistant reply of a conversation with its end-of-turn token; prompts, user/system/tool turns and role
      headers are masked.
    - `max_length`: truncate rows longer than this from the right (a safety net; `tokenize_dataset` already
      truncated the prompt and kept the response).
    - `pad_to_multiple_of`: round the padded length up (tensor-core friendly shapes on GPU). Padding-free rows get
      a filler example (pad ids, never trained, attending only to itself) to reach the multiple.
    Rows without `completion_mask` train every non-padding token.

    Bookkeeping for the trainer (never passed to the model): with `num_sources`, rows that carry a mixture's
    `source` add `source_counts`, the examples and trained tokens (targets after the causal shift) of each source;
    rows that carry a `stream_position` (streaming) add the last one's.
    """

    pad_token_id: int
    completion_only_loss: bool = False
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    padding_free: bool = False
    num_sources: int = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        examples = [example for row in features for example in _unpack(row)]
        rows, labels = [], []
        for f in examples:
            ids = list(f["input_ids"])[: self.max_length]
            target = list(ids)
            if self.completion_only_loss and f.get("completion_mask") is not None:
                target = [t if m else IGNORE_INDEX for t, m in zip(ids, f["completion_mask"])]
            rows.append(ids)
            labels.append(target)
        batch = self._flatten(rows, labels) if self.padding_free else self._pad(rows, labels)
        if self.num_sources and examples[0].get("source") is not None:
            counts = torch.zeros((self.num_sources, 2), dtype=torch.long)
            for f, target in zip(examples, labels):
                counts[f["source"], 0] += 1
                counts[f["source"], 1] += sum(t != IGNORE_INDEX for t in target[1:])  # the first is never a target
            batch[SOURCE_COUNTS] = counts
        if features[-1].get(STREAM_POSITION) is not None:
            batch[STREAM_POSITION] = torch.tensor(features[-1][STREAM_POSITION], dtype=torch.long)
        return batch

    def _pad(self, rows: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        longest = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), longest), dtype=torch.long),
            "labels": torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long),
        }
        for i, (ids, target) in enumerate(zip(rows, labels)):
            batch["input_ids"][i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            batch["attention_mask"][i, : len(ids)] = 1
            batch["labels"][i, : len(ids)] = torch.tensor(target, dtype=torch.long)
        return batch

    def _flatten(self, rows: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        input_ids, position_ids, flat_labels = [], [], []
        for ids, target in zip(rows, labels):
            input_ids += ids
            position_ids += range(len(ids))
            # The first token of an example must not be predicted from the previous example's EOS.
            flat_labels += [IGNORE_INDEX] + target[1:]
        if self.pad_to_multiple_of and len(input_ids) % self.pad_to_multiple_of:
            # A filler example (never trained, attends only to itself): the row length takes few distinct values,
            # so shape-specialised kernels (oneDNN primitives, compiled graphs) are reused from step to step.
            filler = self.pad_to_multiple_of - len(input_ids) % self.pad_to_multiple_of
            input_ids += [self.pad_token_id] * filler
            position_ids += range(filler)
            flat_labels += [IGNORE_INDEX] * filler
        # No attention_mask: transformers derives a block-diagonal mask (or varlen kernel) from position_ids.
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            "labels": torch.tensor([flat_labels], dtype=torch.long),
        }


def _unpack(row: dict) -> list[dict]:
    """A packed row's examples (by its `seq_lengths`; a mixture's `source`, one per example), or the row itself."""
    if "seq_lengths" not in row:
        return [row]
    examples, start = [], 0
    for k, length in enumerate(row["seq_lengths"]):
        example = {key: row[key][start:start + length] for key in ("input_ids", "completion_mask") if key in row}
        if row.get("source") is not None:
            example["source"] = row["source"][k]
        examples.append(example)
        start += length
    return examples


def resolve_pad_token_id(tokenizer) -> int:
    """Pad with the tokenizer's pad token, else its EOS (safe here: labels are masked by length, not by id)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad token nor an eos token: set tokenizer.pad_token")


def has_varlen_attention(model) -> bool:
    """True when the model's attention runs each example of a padding-free row alone: flash-attention's
    variable-length kernel or `sdpa_varlen` (sft_hf/speed/varlen_attention.py). Plain sdpa/eager attend over the whole
    concatenated row (a block-diagonal mask), which makes padding-free rows slower than padded batches."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return "flash" in implementation or implementation == VARLEN_ATTENTION


def recipe_collator(tokenizer, args, model=None) -> InstructionDataCollator:
    """The collator a recipe's arguments ask for; sft_hf/train.py, `sft-hf inspect` and `sft-hf report` share it.

    `padding_free` unset: on when `model` runs a variable-length attention (flash-attention or sdpa_varlen, the
    default on full-attention models) or the rows are packed; without a model, off. Padding-free rows are rounded up
    to the precision plan's row multiple (sft_hf/precision.py) unless `pad_to_multiple_of` says otherwise.
    """
    padding_free = args.packing or (args.padding_free if args.padding_free is not None else has_varlen_attention(model))
    multiple = args.pad_to_multiple_of
    if multiple is None and padding_free:
        plan = args.precision_plan if model is None else settle_precision(args, model)
        multiple = plan.row_multiple
    return InstructionDataCollator(
        pad_token_id=tokenizer.pad_token_id,
        completion_only_loss=args.completion_only_loss,
        max_length=args.max_length,
        pad_to_multiple_of=multiple,
        padding_free=padding_free,
    )
