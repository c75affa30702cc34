"""Packing, as TRL means it (`packing: true`, `packing_strategy: bfd`): whole tokenized examples placed into rows of
at most `max_length` tokens by best-fit decreasing, so a batch of rows holds almost no filler.

Each row keeps `seq_lengths`, the lengths of the examples in it, in order: the collator turns them into position ids
that restart at every example (so `sdpa_varlen` or flash-attention attends within each example only) and into labels
that never ask an example's first token to be predicted from the previous example. Like TRL's `pack_dataset`, rows are
packed within each map batch of 1000 examples (the same rows as TRL's for the same input ids), and no example is cut:
`tokenize_dataset` has already truncated every example to `max_length`, keeping its response.
"""
from __future__ import annotations

import bisect
from collections import defaultdict, deque

from datasets import Dataset

PACKED_COLUMNS = ("input_ids", "completion_mask")  # concatenated per row
PER_EXAMPLE_COLUMNS = ("source",)  # one value per example of the row (a mixture's source): kept as a list


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`: longest first, each into the fullest bin that
    still has room (the first such bin opened, on ties), else into a new bin. Bins in the order they were opened."""
    bins: list[list[int]] = []
    by_space: dict[int, deque] = defaultdict(deque)  # room left → the bins with exactly that room, oldest first
    spaces: list[int] = []  # the distinct room values some bin has, sorted: the best fit is a bisect away
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: equal lengths keep their order
        length = lengths[index]
        if not 0 < length <= capacity:
            raise ValueError(f"example {index} has {length} tokens; packing needs 1 to {capacity}")
        at = bisect.bisect_left(spaces, length)
        if at < len(spaces):
            space = spaces[at]
            members = by_space[space].popleft()
            if not by_space[space]:
                del spaces[at]
        else:
            space, members = capacity, []
            bins.append(members)
        members.append(index)
        left = space - length
        if left > 0:
            if not by_space[left]:
                bisect.insort(spaces, left)
            by_space[left].append(members)
    return bins


def _pack_batch(batch: dict, max_length: int) -> dict:
    lengths = [len(ids) for ids in batch["input_ids"]]
    bins = best_fit_decreasing(lengths, max_length)
    packed = {column: [[token for i in members for token in batch[column][i]] for members in bins]
              for column in PACKED_COLUMNS if column in batch}
    packed.update({column: [[batch[column][i] for i in members] for members in bins]
                   for column in PER_EXAMPLE_COLUMNS if column in batch})
    packed["seq_lengths"] = [[lengths[i] for i in members] for members in bins]
    packed["length"] = [sum(row) for row in packed["seq_lengths"]]
    return packed


def pack_dataset(dataset: Dataset, max_length: int, verbose: bool = True) -> Dataset:
    """Rows of whole examples (`input_ids`, `completion_mask`, `seq_lengths`, `length`, and a mixture's `source` per
    example), at most `max_length` tokens each, from the rows of `tokenize_dataset`."""
    if max_length is None:
        raise ValueError("packing needs max_length: the length of the rows examples are packed into")
    packed = dataset.map(_pack_batch, batched=True, batch_size=1000, remove_columns=dataset.column_names,
                         fn_kwargs={"max_length": max_length}, desc=f"Packing into rows of {max_length} tokens")
    if verbose and len(packed):
        tokens = sum(packed["length"])
        print(f"[packing] {len(dataset)} examples → {len(packed)} rows of at most {max_length} tokens "
              f"({tokens / (len(packed) * max_length):.1%} full)")
    return packed
