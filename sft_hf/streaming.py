"""Streaming (`streaming: true`): records read as training consumes them, templated and tokenized on the fly.

Each source is a `datasets` stream (`load_dataset(..., streaming=True)`: local JSON lines, CSV, Parquet, or a Hub
dataset), split between the processes by `datasets.distributed.split_dataset_by_node` (whole shards when their number
divides by the processes, else every n-th record), so each process reads and tokenizes its own share. In each
process, records are checked and renamed as they are read, drawn from the sources (a mixture: by weight, or in
proportion to their counts), shuffled in blocks of `shuffle_buffer_size`, and tokenized in small batches by the same
`encode_records` as the map-style path, so the rows are the same. The stream never ends: after the last record the
sources start again, and `max_steps` decides the length of the run.

Resume is exact. The dataloader and Trainer read ahead, so what was trained is known only from the batches
themselves: each row carries its position (block, index in the block), the collator passes the last one on, and
`InstructionTrainer` keeps it. `DataStateCallback` gathers every process's position, with the state of its sources at
the start of that block (`IterableDataset.state_dict`, and the mixture's random generator), into the checkpoint's
trainer_state.json, which is written before the checkpoint is marked complete. A resumed process reopens its sources
at that state, reads the block again, shuffles it with the same seed and skips what was trained. (datasets' own
shuffle buffer loses its content on resume, hence the blocks.)
"""
from __future__ import annotations

import csv
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import Dataset, DatasetDict, IterableDataset
from datasets.distributed import split_dataset_by_node
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from sft_hf.data import (BUILTIN_PREFIX, FILE_BUILDERS, RecordLines, _check_schema, _resolve_mapping, _rename,
                         bad_records_error, located_problem, record_problem, scan_json_file, sharegpt_to_messages)
from sft_hf.errors import DataError, RecipeError
from sft_hf.mixture import SOURCE_COLUMN, Mixture, Source, SourceSummary, parse_mixture, record_shape
from sft_hf.templates import Template, alpaca_to_messages, messages_to_alpaca
from sft_hf.tokenization import encode_records

logger = logging.getLogger(__name__)

TOKENIZE_BATCH = 64  # records templated and tokenized together
UNSHUFFLED_BLOCK = 1024  # records per block (position bookkeeping) when shuffle_buffer_size is 0


def check_streaming_args(data_args, args) -> None:
    """One line before any work for what a stream cannot do."""
    if args.max_steps is None or args.max_steps <= 0:
        raise RecipeError("streaming: true needs max_steps (a stream has no length to count epochs in)")
    if args.dataloader_num_workers:
        raise RecipeError("streaming: true reads in the training process; set dataloader_num_workers 0 (its position "
                          "in the stream is what a resume continues from)")
    if data_args.max_train_samples:
        raise RecipeError("streaming: true takes no max_train_samples; max_steps decides how much is read")


# ---------------------------------------------------------------------------------------------------------------
# One source as a stream of checked records


class SourceStream:
    """One source's train records for one process: opened, renamed, checked, converted to the run's shape."""

    def __init__(self, source: Source, index: int, template: Template | None, shape: str, skip_bad_records: bool,
                 rank: int, world_size: int, skip_first: int = 0):
        self.source, self.index, self.template, self.shape = source, index, template, shape
        self.skip_bad_records, self.skip_first = skip_bad_records, skip_first
        self.rank, self.world_size = rank, world_size
        raw = open_split(source, source.split)
        try:
            self.columns = stream_columns(raw)
        except Exception as e:  # noqa: BLE001 - Arrow cannot read the file's first chunk: name the bad lines
            raise unreadable(source, template, e) from e
        self.mapping = _resolve_mapping(self.columns, source.column_mapping, source.label)
        self.schema = _check_schema([self.mapping.get(c, c) for c in self.columns], source.label, template)
        # one file is one shard: each process then reads it all and keeps every world_size-th record
        self.by_examples = world_size > 1 and raw.n_shards % world_size != 0
        self.lines = (RecordLines(source.path, FILE_BUILDERS[Path(source.path).suffix.lower()])
                      if Path(source.path).is_file() and Path(source.path).suffix.lower() != ".parquet" else None)
        self.skipped = 0
        self.dataset: IterableDataset | None = None
        self.iterator = None
        self.read = 0  # records this process has read from its share (this pass)
        self.restart()

    def restart(self, state: dict | None = None) -> None:
        raw = open_split(self.source, self.source.split)
        if self.skip_first:  # the head of a single-split source is its held-out records
            raw = raw.skip(self.skip_first)
        self.dataset = split_dataset_by_node(raw, self.rank, self.world_size) if self.world_size > 1 else raw
        self.read = 0
        if state is not None:
            self.dataset.load_state_dict(state["dataset"])
            self.read = state["read"]
        self.iterator = iter(self.dataset)

    def state(self) -> dict:
        return {"dataset": self.dataset.state_dict(), "read": self.read}

    def record_index(self, local: int) -> int:
        """The record's index in the source (exact when the file is one shard; else within this process's shards)."""
        return self.skip_first + (local * self.world_size + self.rank if self.by_examples else local)

    def next(self) -> dict | None:
        """The next good record in the run's shape (with its source index), or None at the end of the source."""
        while True:
            try:
                record = next(self.iterator)
            except StopIteration:
                return None
            except Exception as e:  # noqa: BLE001 - Arrow cannot read the file: name the bad lines
                raise unreadable(self.source, self.template, e) from e
            local, self.read = self.read, self.read + 1
            renamed = _rename(record, self.mapping)
            problem = record_problem(renamed, self.schema, self.template)
            if problem is None:
                return to_shape(renamed, self.schema, self.shape, self.source.label) | {SOURCE_COLUMN: self.index}
            self.skipped += 1
            if not self.skip_bad_records:
                message = self.located(local, problem)
                logger.error("%s", message)  # on the process that met it (run_cli prints on the first one only)
                raise DataError(message)
            if self.skipped <= 20 or self.skipped % 10_000 == 0:  # (finding the line scans the file: not for each)
                logger.warning("skipping bad record %d of %s: %s", self.skipped, self.source.label,
                               self.located(local, problem))

    def located(self, local: int, problem: str) -> str:
        index = self.record_index(local)
        line = self.lines.of([index]).get(index) if self.lines else None  # a local file: one shard, exact index
        where = f" (process {self.rank})" if self.world_size > 1 and not self.by_examples else ""
        return located_problem(self.source.label + where, index, line, problem, self.mapping)



def unreadable(source: Source, template, error: Exception) -> DataError:
    """The error for a streamed file Arrow cannot read: a JSON file's bad lines (found by a scan), else the cause."""
    path = source.path
    if Path(path).is_file() and FILE_BUILDERS.get(Path(path).suffix.lower()) == "json":
        problems, _ = scan_json_file(path, source.column_mapping, template)
        if problems:
            return DataError(str(bad_records_error(path, problems)) + "\n  (a stream cannot skip a line Arrow "
                             "cannot read: fix it, or train without streaming, which skips it with skip_bad_records)")
    cause = error.__cause__ or error
    return DataError(f"{source.label}: could not be read: {type(cause).__name__}: {cause}")


def open_split(source: Source, split: str) -> IterableDataset:
    """A streamed split of a local file, folder, built-in or Hub dataset."""
    streams = open_streams(source)
    if split not in streams:
        raise DataError(f"{source.label}: no split {split!r} (found {sorted(streams)})")
    return streams[split]


def open_streams(source: Source) -> datasets.IterableDatasetDict:
    """Every split of a source, streamed."""
    path = source.path
    kwargs = {}
    if path.startswith(BUILTIN_PREFIX):
        from sft_hf.builtin import chapter7_chat, toy

        name = path[len(BUILTIN_PREFIX) :]
        files = chapter7_chat.write_chapter7_chat() if name == "chapter7-chat" else toy.write_builtin_dataset(name)
        args, kwargs = ("json",), {"data_files": {k: str(v) for k, v in files.items()}}
    elif Path(path).is_file():
        builder = FILE_BUILDERS.get(Path(path).suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type; use one of {sorted(FILE_BUILDERS)}")
        args, kwargs = (builder,), {"data_files": {"train": path}}
        if builder == "csv":  # every cell as text, as without streaming
            with open(path, encoding="utf-8-sig", newline="") as f:
                header = next(csv.reader(f), [])
            kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in header})
    elif not Path(path).exists() and (Path(path).suffix.lower() in FILE_BUILDERS or path.startswith((".", "/", "~"))):
        raise DataError(f"{path}: no such file or folder")
    else:
        args, kwargs = (path, source.config), {}
    try:
        return datasets.load_dataset(*args, streaming=True, **kwargs)
    except Exception as e:  # not found, offline, ...: one line that names the dataset
        raise DataError(f"{source.label}: could not be loaded: {type(e).__name__}: {e}") from e


def stream_columns(stream: IterableDataset) -> list[str]:
    if stream.column_names is not None:
        return list(stream.column_names)
    first = next(iter(stream), None)
    return list(first or [])


def to_shape(record: dict, schema: str, shape: str, label: str) -> dict:
    """A checked, renamed record as the run's shape: `messages` (+ `tools`) or instruction/input/output."""
    if schema == "conversations":
        record = {**record, "messages": sharegpt_to_messages(record["conversations"])}
    if "messages" in record and schema != "alpaca":
        if shape == "messages":
            return {"messages": record["messages"], "tools": record.get("tools")}
        return messages_to_alpaca(record["messages"], label)
    if shape == "messages":
        return {"messages": alpaca_to_messages(record), "tools": None}
    return {**record, "input": record.get("input") or ""}


# ---------------------------------------------------------------------------------------------------------------
# The sources drawn from, shuffled in blocks, tokenized: one process's rows


@dataclass
class StreamSpec:
    """Everything a process needs to build its rows; `start` is set from a checkpoint before training starts."""

    mixture: Mixture
    template: Template
    tokenizer: object
    max_length: int | None
    trained_turns: str
    shape: str
    block_size: int
    shuffle: bool
    seed: int
    skip_bad_records: bool
    skip_first: list[int]
    start: dict[int, dict] = field(default_factory=dict)  # rank → the state a resume starts from
    positions: dict[int, "BlockStates"] = field(default_factory=dict)  # rank → states of the blocks recently read


class BlockStates:
    """The source states at the start of the last few blocks a process read (the dataloader reads ahead a batch or
    two; a checkpoint needs the state of the block its last trained row came from)."""

    KEEP = 8

    def __init__(self):
        self.states: OrderedDict[int, dict] = OrderedDict()

    def add(self, block: int, state: dict) -> None:
        self.states[block] = state
        while len(self.states) > self.KEEP:
            self.states.popitem(last=False)

    def resume_state(self, position) -> dict | None:
        """What a resume needs after the row at `position` (block, index in the block) was trained."""
        if position is None:
            return None
        block, index = (int(v) for v in position)
        return {"block": block, "next": index + 1, "sources": self.states[block]}


class MixedDraws:
    """Which source each record comes from: by weight (sources that run out start again; LLaMA-Factory's
    interleave_over), or in proportion to what is left of their counts (each record once per pass), or the one
    source."""

    def __init__(self, streams: list[SourceStream], mixture: Mixture, seed, state: dict | None = None):
        self.streams, self.mixture = streams, mixture
        self.rng = np.random.default_rng(seed)
        self.left = [s.count for s in mixture.sources]  # counts still to take this pass (count mixtures)
        if state is not None:
            self.rng.bit_generator.state = state["rng"]
            self.left = state["left"]
            for stream, source_state in zip(streams, state["streams"]):
                stream.restart(source_state)

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "left": list(self.left),
                "streams": [s.state() for s in self.streams]}

    def next(self) -> dict:
        if len(self.streams) == 1:
            return self._from(0)
        if self.mixture.interleaved:
            weights = np.array([s.weight for s in self.mixture.sources], dtype=float)
            return self._from(int(self.rng.choice(len(weights), p=weights / weights.sum())))
        while True:
            if not any(self.left):  # every count taken (or every source ran out first): a new pass
                self.left = [s.count for s in self.mixture.sources]
                for stream in self.streams:
                    stream.restart()
            left = np.array(self.left, dtype=float)
            k = int(self.rng.choice(len(left), p=left / left.sum()))
            record = self.streams[k].next()
            if record is not None:
                self.left[k] -= 1
                return record
            self.left[k] = 0  # fewer records than its count: it gives what it has this pass

    def _from(self, k: int) -> dict:
        record = self.streams[k].next()
        if record is None:  # the source ran out: it starts again (a new pass; weights over-sample it)
            self.streams[k].restart()
            record = self.streams[k].next()
            if record is None:
                raise DataError(f"{self.streams[k].source.label}: no usable record to stream")
        return record


def process_rows(rank: int, spec: StreamSpec, world_size: int):
    """One process's training rows, forever: blocks of records, each shuffled with its own seed, tokenized."""
    streams = [SourceStream(source, k, spec.template, spec.shape, spec.skip_bad_records, rank, world_size,
                            spec.skip_first[k]) for k, source in enumerate(spec.mixture.sources)]
    start = spec.start.get(rank)
    draws = MixedDraws(streams, spec.mixture, [spec.seed, rank, 1 << 20], start["sources"] if start else None)
    block, skip = (start["block"], start["next"]) if start else (0, 0)
    states = spec.positions.setdefault(rank, BlockStates())
    while True:
        states.add(block, draws.state())
        records = [draws.next() for _ in range(spec.block_size)]
        order = (np.random.default_rng([spec.seed, rank, block]).permutation(len(records)) if spec.shuffle
                 else np.arange(len(records)))
        for first in range(skip, len(records), TOKENIZE_BATCH):
            chosen = order[first : first + TOKENIZE_BATCH]
            batch = [records[i] for i in chosen]
            encoded = encode_records(batch, spec.tokenizer, spec.template, spec.max_length, spec.trained_turns,
                                     split="train")
            for j, (record, e) in enumerate(zip(batch, encoded), start=first):
                if e is not None:  # None: the reply alone is longer than max_length
                    yield {"input_ids": e.input_ids, "completion_mask": e.completion_mask,
                           SOURCE_COLUMN: record[SOURCE_COLUMN], "stream_position": [block, j]}
        block, skip = block + 1, 0


def _generate(ranks: list[int], spec: StreamSpec, world_size: int):
    for rank in ranks:  # one rank per process once accelerate has sharded the dataset
        yield from process_rows(rank, spec, world_size)


def training_stream(spec: StreamSpec, world_size: int) -> IterableDataset:
    """The training rows as a `datasets.IterableDataset` with one shard per process: with
    `accelerator_config.dispatch_batches` false, accelerate gives each process its own shard (its own rank)."""
    return IterableDataset.from_generator(_generate, gen_kwargs={"ranks": list(range(world_size)), "spec": spec,
                                                                "world_size": world_size})


# ---------------------------------------------------------------------------------------------------------------
# The run's streamed data: training rows and materialized held-out splits


def stream_mixture(data_args) -> Mixture:
    """The recipe's sources as a Mixture (one source without dataset_mixture); what a stream cannot do, refused."""
    if not data_args.dataset_mixture:
        return Mixture([Source(data_args.dataset_name, data_args.dataset_config,
                               column_mapping=data_args.column_mapping)])
    mixture = parse_mixture(data_args.dataset_mixture)
    if len(mixture.sources) > 1 and not mixture.interleaved and any(s.count is None for s in mixture.sources):
        unsized = next(s.label for s in mixture.sources if s.count is None)
        raise RecipeError(f"dataset_mixture with streaming: a stream's size is unknown, so every source takes a "
                          f"count, or every source a weight ({unsized} has neither)")
    if any(s.fraction is not None for s in mixture.sources):
        raise RecipeError("dataset_mixture with streaming: a fraction needs the source's size, which a stream "
                          "does not know; give a count or weights")
    return mixture


def load_streams(data_args, args, tokenizer, template: Template) -> tuple[IterableDataset, DatasetDict, StreamSpec]:
    """The training stream, the held-out splits as records (validation, test) and the spec that resumes use."""
    check_streaming_args(data_args, args)
    mixture = stream_mixture(data_args)
    held_out, skip_first = {"validation": [], "test": []}, []
    schemas = []
    for k, source in enumerate(mixture.sources):
        splits, skip = held_out_records(source, k, template, data_args)
        for name in held_out:
            held_out[name].append(splits[name])
        skip_first.append(skip)
        schemas.append(splits["schema"])
    shape = record_shape(template, schemas)
    raw = DatasetDict({name: _records_dataset([to_shape(r, s, shape, src.label) | {SOURCE_COLUMN: r[SOURCE_COLUMN]}
                                               for parts, src in zip(held_out[name], mixture.sources)
                                               for r, s in parts])
                       for name in held_out})
    seed = args.data_seed if getattr(args, "data_seed", None) is not None else args.seed
    block = data_args.shuffle_buffer_size or UNSHUFFLED_BLOCK
    spec = StreamSpec(mixture, template, tokenizer, args.max_length, args.trained_turns, shape, block,
                      data_args.shuffle_buffer_size > 0, seed, data_args.skip_bad_records, skip_first)
    raw.sources = [SourceSummary(s.label, s.share if len(mixture.sources) > 1 else "all", 0, path=s.path,
                                 validation=sum(1 for _ in held_out["validation"][k]),
                                 test=sum(1 for _ in held_out["test"][k])) for k, s in enumerate(mixture.sources)]
    return training_stream(spec, args.world_size), raw, spec


def first_records(data_args, template: Template, n: int) -> DatasetDict:
    """The first `n` records a stream trains on (read in order, checked, in the run's shape) and its held-out
    splits: what `sft-hf inspect` shows of a streaming recipe, without reading the rest."""
    mixture = stream_mixture(data_args)
    held_out = [held_out_records(source, k, template, data_args) for k, source in enumerate(mixture.sources)]
    shape = record_shape(template, [splits["schema"] for splits, _ in held_out])
    streams = [SourceStream(source, k, template, shape, data_args.skip_bad_records, 0, 1, skip)
               for k, (source, (_, skip)) in enumerate(zip(mixture.sources, held_out))]
    draws = MixedDraws(streams, mixture, [0])
    train = [draws.next() for _ in range(n)]
    splits = {"train": train}
    for name in ("validation", "test"):
        splits[name] = [to_shape(r, schema, shape, src.label) | {SOURCE_COLUMN: r[SOURCE_COLUMN]}
                        for (parts, _), src in zip(held_out, mixture.sources) for r, schema in parts[name]][:n]
    return DatasetDict({name: _records_dataset(records) for name, records in splits.items()})


def held_out_records(source: Source, index: int, template, data_args) -> tuple[dict, int]:
    """A source's held-out records: its own validation/test splits (up to max_eval_samples each), else, for a
    source with one split, its first max_eval_samples records as test and the next as validation (the train
    stream then starts after them). Returns them and how many records the train stream skips."""
    limit = data_args.max_eval_samples
    probe = open_split(source, source.split)
    try:
        columns = stream_columns(probe)
    except Exception as e:  # noqa: BLE001 - Arrow cannot read the file's first chunk
        raise unreadable(source, template, e) from e
    mapping = _resolve_mapping(columns, source.column_mapping, source.label)
    schema = _check_schema([mapping.get(c, c) for c in columns], source.label, template)
    out, skip = {"schema": schema}, 0
    names = list(open_streams(source))
    wanted = {"validation": source.validation_split or "validation", "test": source.test_split or "test"}
    own = {name: split for name, split in wanted.items() if split in names and split != source.split}
    for name in ("validation", "test"):
        out[name] = []
    if own:
        for name, split in own.items():
            stream = open_split(source, split)
            records = stream.take(limit) if limit else stream
            out[name] = checked(records, source, index, mapping, schema, template, data_args)
    elif limit:
        head = checked(probe.take(2 * limit), source, index, mapping, schema, template, data_args)
        out["test"], out["validation"], skip = head[:limit], head[limit:], 2 * limit
    return out, skip


def checked(records, source, index, mapping, schema, template, data_args) -> list[tuple[dict, str]]:
    kept = []
    for i, record in enumerate(records):
        renamed = _rename(record, mapping)
        problem = record_problem(renamed, schema, template)
        if problem is None:
            kept.append(({**renamed, SOURCE_COLUMN: index}, schema))
        elif not data_args.skip_bad_records:
            raise DataError(located_problem(source.label, i, None, problem, mapping))
    return kept


def _records_dataset(records: list[dict]) -> Dataset:
    return Dataset.from_list(records) if records else Dataset.from_dict({"instruction": [], "output": []})


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint's data state: stream positions and trained counts per source


class DataStateCallback(TrainerCallback, ExportableState):
    """Saves, with every checkpoint (in trainer_state.json, before it is marked complete), where each process's
    stream is (`streams`, for an exact resume) and how many examples and tokens of each source were trained
    (`source_counts`), gathered from every process; `trainer` is the InstructionTrainer whose batches say both."""

    def __init__(self, trainer=None, spec: StreamSpec | None = None, restored: dict | None = None,
                 resumed_from: str | None = None):
        self.trainer, self.spec = trainer, spec
        self.restored = restored or {}  # what the checkpoint a run resumed from held
        self.streams, self.source_counts = self.restored.get("streams"), self.restored.get("source_counts")
        # A streamed resume skips no batches (ignore_data_skip), so Trainer restores the random state before the
        # dataloader starts, and starting it draws a seed: restored again before the first step, dropout then
        # continues exactly as in a run never interrupted.
        self.resync_rng_from = resumed_from if spec is not None else None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.resync_rng_from is not None:
            self.trainer._load_rng_state(self.resync_rng_from)
            self.resync_rng_from = None

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_training_stop or args.save_strategy == "best":
            self.collect(args)

    def on_train_end(self, args, state, control, **kwargs):
        self.collect(args)

    def collect(self, args) -> None:
        """Every process's part, gathered (all processes call this at the same steps)."""
        mine = {"rank": args.process_index, "stream": None, "counts": None}
        if self.spec is not None and self.trainer.stream_position is not None:
            mine["stream"] = self.spec.positions[args.process_index].resume_state(self.trainer.stream_position.tolist())
        if self.trainer.source_counts is not None:
            mine["counts"] = self.trainer.source_counts.cpu().tolist()
        parts = gather(mine, args.world_size)
        if self.spec is not None:
            self.streams = {str(p["rank"]): p["stream"] for p in parts}
        counts = [np.array(p["counts"]) for p in parts if p["counts"] is not None]
        if counts:
            total = sum(counts)
            if self.restored.get("source_counts") is not None:
                total = total + np.array(self.restored["source_counts"])
            self.source_counts = total.tolist()

    def state(self) -> dict:
        return {"args": {}, "attributes": {"streams": self.streams, "source_counts": self.source_counts}}

    @staticmethod
    def saved(checkpoint: str | Path | None) -> dict:
        """What a checkpoint's trainer_state.json holds for this callback ({} when nothing)."""
        path = Path(checkpoint or "", "trainer_state.json")
        if not checkpoint or not path.is_file():
            return {}
        stored = json.loads(path.read_text()).get("stateful_callbacks", {}).get(DataStateCallback.__name__, {})
        if isinstance(stored, list):
            stored = stored[-1] if stored else {}
        return stored.get("attributes", {}) or {}


def gather(value, world_size: int) -> list:
    if world_size <= 1:
        return [value]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def restore_positions(spec: StreamSpec, saved: dict) -> None:
    """Points each process's stream at the position its checkpoint saved (before training starts)."""
    for rank, state in (saved.get("streams") or {}).items():
        if state is not None:
            spec.start[int(rank)] = state

