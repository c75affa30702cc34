"""Mixtures: several sources in one run (`dataset_mixture` in a recipe), each with its share.

    dataset_mixture:
      seed: 0                                   # which records a fraction/count takes; the interleaving order
      sources:
        - {path: data/alpaca.jsonl, fraction: 0.5}
        - {path: HuggingFaceTB/smoltalk, config: everyday-conversations, count: 2000}
        - {path: data/domain.csv, column_mapping: {q: instruction, a: output}}

A share is one of `fraction` (that share of the source's train records), `count` (that many), neither (all of them),
all three taking each record at most once, in file order, and the sources concatenated (TRL's `dataset_mixture`);
or `weight` on every source: records are drawn from the sources with probabilities proportional to the weights
until every source has been drawn completely at least once, smaller ones repeating (LLaMA-Factory's
`interleave_over`, `datasets.interleave_datasets`). Each source is split on its own (its own validation/test splits,
else chapter 7's ratios) before its share is taken; the held-out splits are every source's, `max_eval_samples` each.

Records of any format (Alpaca, `prompt`/`completion`, chat `messages`, ShareGPT) mix under one template: every
source is converted to the template's own shape, `messages` for chat templates (`chatml`, `chat_template`), Alpaca
columns for the others (`alpaca`, `phi3`, `raw`, YAML). That is the conversion the template would make record by
record anyway (`record_messages`, `messages_to_alpaca`), so each record trains on the same tokens as it would alone,
and the mixed dataset has one schema. A `source` column (the source's index) follows every record through
tokenization, so the run log, `sft-hf report` and the model card count records and tokens per source.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields

import datasets
import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict

from sft_hf.data import fork_friendly, map_num_proc, read_source, split_source, template_fields
from sft_hf.errors import DataError, RecipeError, did_you_mean
from sft_hf.templates import Template, alpaca_to_messages, messages_to_alpaca

logger = logging.getLogger(__name__)

SOURCE_COLUMN = "source"  # the index of the source a record came from


@dataclass
class Source:
    """One entry of `dataset_mixture.sources`."""

    path: str  # a local file or folder, or a Hub dataset name (as dataset_name)
    config: str | None = None  # the Hub dataset's configuration (subset)
    split: str = "train"  # the split trained on
    validation_split: str | None = None  # held-out splits by name (default: the source's `validation` / `test`)
    test_split: str | None = None
    column_mapping: dict[str, str] | None = None
    fraction: float | None = None  # share of the train records taken, 0 < fraction <= 1
    count: int | None = None  # number of train records taken
    weight: float | None = None  # interleaving probability (relative); every source or none has one
    train_split_ratio: float | None = None  # this source's chapter 7 split (default: the recipe's)
    test_split_ratio: float | None = None

    @property
    def label(self) -> str:
        """How logs, reports and the model card name the source: path, [config], :split when not train."""
        return self.path + (f"[{self.config}]" if self.config else "") + (f":{self.split}" if self.split != "train"
                                                                          else "")

    @property
    def share(self) -> str:
        for key in ("fraction", "count", "weight"):
            if getattr(self, key) is not None:
                return f"{key} {getattr(self, key):g}"
        return "all"


@dataclass
class Mixture:
    sources: list[Source]
    seed: int = 0

    @property
    def interleaved(self) -> bool:
        return self.sources[0].weight is not None


SOURCE_KEYS = [f.name for f in fields(Source)]


def parse_mixture(value) -> Mixture:
    """A `dataset_mixture` value (a list of sources, or {sources: [...], seed: N}; YAML or its JSON text) checked
    into a Mixture; RecipeError naming the source and key otherwise."""
    where = "dataset_mixture"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{where} is not valid JSON ({e}): {value!r:.80}") from None
    seed = 0
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"sources", "seed"})
        if unknown:
            raise RecipeError(f"{where}: unknown key {unknown[0]!r}; a mixture has 'sources' and 'seed'")
        seed = value.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise RecipeError(f"{where}: seed must be an integer, got {seed!r}")
        value = value.get("sources")
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where}: expected a non-empty list of sources ({{path: ..., fraction | count | weight: "
                          f"...}}), got {value!r:.80}")
    sources = []
    for k, entry in enumerate(value):
        here = f"{where} source {k}"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise RecipeError(f"{here}: expected a mapping with a path, got {entry!r:.60}")
        for key in entry:
            if key not in SOURCE_KEYS:
                hint = did_you_mean(key, SOURCE_KEYS)
                raise RecipeError(f"{here}: unknown key {key!r}" + (f"; {hint}" if hint else ""))
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise RecipeError(f"{here}: needs a path (a local file or folder, or a Hub dataset name)")
        source = Source(**entry)
        here = f"{where} source {k} ({source.label})"
        given = [key for key in ("fraction", "count", "weight") if entry.get(key) is not None]
        if len(given) > 1:
            raise RecipeError(f"{here}: give one of fraction, count or weight, not {' and '.join(given)}")
        if source.fraction is not None and not (isinstance(source.fraction, (int, float)) and 0 < source.fraction <= 1):
            raise RecipeError(f"{here}: fraction must be a number in (0, 1], got {source.fraction!r}")
        if source.count is not None and (not isinstance(source.count, int) or isinstance(source.count, bool)
                                         or source.count < 1):
            raise RecipeError(f"{here}: count must be a whole number of records >= 1, got {source.count!r}")
        if source.weight is not None and not (isinstance(source.weight, (int, float)) and source.weight > 0):
            raise RecipeError(f"{here}: weight must be a number > 0, got {source.weight!r}")
        if source.column_mapping is not None and not isinstance(source.column_mapping, dict):
            raise RecipeError(f"{here}: column_mapping must be a mapping of field names, got "
                              f"{source.column_mapping!r:.60}")
        sources.append(source)
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        unweighted = next(s.label for s in sources if s.weight is None)
        raise RecipeError(f"{where}: weights interleave the sources, so every source needs one ({unweighted} has "
                          "none); or take shares with fraction / count")
    return Mixture(sources, seed)


@dataclass
class SourceSummary:
    """What a run took from one source; the tokens are filled in after tokenization and training."""

    label: str
    share: str
    available: int  # train records of the source (after its own split and any skipped bad records)
    taken: int = 0  # records of it in the mixed train split (with repeats, when weights over-sample it)
    validation: int = 0
    test: int = 0
    skipped: int = 0  # bad records dropped (skip_bad_records)
    tokens: int = 0  # tokens of its taken records after tokenization (one epoch)
    trained_tokens: int = 0  # of which trained (one epoch)
    examples_trained: int = 0  # examples of it the run trained on (all epochs, all processes)
    tokens_trained: int = 0  # tokens of it the loss trained on (all epochs, all processes)
    path: str = ""  # the source's path or Hub name (the model card lists Hub datasets)

    def line(self) -> str:
        if self.available:
            text = (f"{self.label} ({self.share}): {self.taken:,} of {self.available:,} train records"
                    + (f" (×{self.taken / self.available:.2f})" if self.taken > self.available else ""))
        else:  # a stream: what was read is what was trained
            text = f"{self.label} ({self.share}): streamed"
        text += f", {self.validation:,} validation, {self.test:,} test"
        if self.skipped:
            text += f", {self.skipped:,} bad records skipped"
        if self.tokens:
            text += f" | {self.tokens:,} tokens, {self.trained_tokens:,} trained per epoch"
        if self.examples_trained:
            text += f" | trained on {self.examples_trained:,} examples, {self.tokens_trained:,} tokens"
        return text


def record_shape(template: Template | None, schemas: list[str]) -> str:
    """"messages" or "alpaca": the shape the template renders natively (without a template: messages as soon as
    one source has conversations)."""
    if template is not None:
        return "messages" if template.multi_turn else "alpaca"
    return "messages" if "messages" in schemas else "alpaca"


def load_mixture(data_args, template: Template | None = None, num_proc: int | None = None) -> DatasetDict:
    """`train`, `validation` and `test` of the recipe's `dataset_mixture`; `.sources` lists a SourceSummary each."""
    mixture = parse_mixture(data_args.dataset_mixture)
    num_proc = getattr(data_args, "dataset_num_proc", None) if num_proc is None else num_proc
    loaded = []
    for source in mixture.sources:
        skipped: list[str] = []
        raw = read_source(source.path, source.config, source.column_mapping, template, data_args.skip_bad_records,
                          skipped, num_proc)
        raw = pick_splits(raw, source)
        train_ratio = source.train_split_ratio if source.train_split_ratio is not None else data_args.train_split_ratio
        test_ratio = source.test_split_ratio if source.test_split_ratio is not None else data_args.test_split_ratio
        splits = split_source(raw, source.label, train_ratio, test_ratio, data_args.shuffle_seed)
        loaded.append((source, splits, len(skipped)))
    shape = record_shape(template, ["messages" if "messages" in s["train"].column_names else "alpaca"
                                    for _, s, _ in loaded])
    columns = (["messages", "tools"] if shape == "messages"
               else ["instruction", "input", "output", *sorted(template_fields(template))])
    parts: dict[str, list[Dataset]] = {"train": [], "validation": [], "test": []}
    summaries = []
    for k, (source, splits, skipped) in enumerate(loaded):
        for name, ds in splits.items():
            ds = to_shape(ds, shape, source.label, num_proc)
            ds = ds.select_columns([c for c in columns if c in ds.column_names])  # what the template reads
            if name == "train":
                ds = take_share(ds, source, k, mixture.seed)
            elif data_args.max_eval_samples:
                ds = ds.select(range(min(data_args.max_eval_samples, len(ds))))
            parts[name].append(with_source(ds, k))
        summaries.append(SourceSummary(source.label, source.share, len(splits["train"]),
                                       validation=len(parts["validation"][-1]), test=len(parts["test"][-1]),
                                       skipped=skipped, path=source.path))
    features = merged_features([ds.features for split in parts.values() for ds in split])
    parts = {name: [conform(ds, features) for ds in split] for name, split in parts.items()}
    result = DatasetDict(validation=concatenate(parts["validation"]), test=concatenate(parts["test"]))
    if mixture.interleaved:
        weights = np.array([s.weight for s in mixture.sources], dtype=float)
        result["train"] = datasets.interleave_datasets(parts["train"], probabilities=(weights / weights.sum()).tolist(),
                                                       seed=mixture.seed, stopping_strategy="all_exhausted")
    else:
        result["train"] = concatenate(parts["train"])
    if data_args.max_train_samples and data_args.max_train_samples < len(result["train"]):  # a mixed sample
        result["train"] = random_rows(result["train"], data_args.max_train_samples, [mixture.seed, len(summaries)])
    for summary, taken in zip(summaries, source_counts(result["train"], len(summaries))):
        summary.taken = int(taken)
    result = DatasetDict({name: result[name] for name in ("train", "validation", "test")})
    result.sources = summaries
    result.skipped_records = []
    for summary in summaries:
        logger.info("mixture source %s", summary.line())
    return result


def pick_splits(raw: DatasetDict, source: Source) -> DatasetDict:
    """The source's train split (`split`) and held-out splits (`validation_split`, `test_split`, else its own
    `validation` / `test`), named train / validation / test for split_source."""
    picked = {}
    for name, wanted in (("train", source.split), ("validation", source.validation_split or "validation"),
                         ("test", source.test_split or "test")):
        if wanted in raw:
            picked[name] = raw[wanted]
        elif wanted != name:  # named by the recipe: it must exist
            raise DataError(f"{source.label}: no split {wanted!r} (found {sorted(raw)})")
    return DatasetDict(picked)


def to_shape(ds: Dataset, shape: str, label: str, num_proc: int | None = None) -> Dataset:
    """The records as `messages` (Alpaca records → one user and one assistant turn, as chat templates render them)
    or as Alpaca columns (single-turn conversations → instruction/output, as single-turn templates render them)."""
    has_messages = "messages" in ds.column_names
    if (shape == "messages") == has_messages:
        return ds
    if not len(ds):  # (a map over no rows would leave no column at all)
        return Dataset.from_dict({c: [] for c in (["messages"] if shape == "messages" else ["instruction", "input",
                                                                                          "output"])})
    function = _alpaca_to_messages if shape == "messages" else _messages_to_alpaca
    keep = {"tools"} if shape == "messages" else set()  # chat sources' tool definitions stay with their records
    processes = map_num_proc(num_proc, len(ds))
    with fork_friendly(processes):
        return ds.map(function, batched=True, remove_columns=[c for c in ds.column_names if c not in keep],
                      fn_kwargs={"label": label}, num_proc=processes, desc=f"{label}: records → {shape}")


def _alpaca_to_messages(batch: dict, label: str) -> dict:
    records = (dict(zip(batch, values)) for values in zip(*batch.values()))
    return {"messages": [alpaca_to_messages(r) for r in records]}


def _messages_to_alpaca(batch: dict, label: str) -> dict:
    rows = [messages_to_alpaca(m, label) for m in batch["messages"]]  # checked on load: single-turn ones only
    return {key: [row[key] for row in rows] for key in ("instruction", "input", "output")}


def take_share(train: Dataset, source: Source, index: int, seed: int) -> Dataset:
    """A fraction or count of the source's train records: a seeded random subset (rng from the mixture seed and
    the source's index), kept in file order. `fraction × records` is rounded half up."""
    n = len(train)
    if source.fraction is not None:
        wanted = int(source.fraction * n + 0.5)
    elif source.count is not None:
        wanted = source.count
        if wanted > n:
            raise DataError(f"{source.label}: count {wanted:,} is more than its {n:,} train records; take at most "
                            "that many, or give every source a weight to over-sample")
    else:
        return train
    return random_rows(train, wanted, [seed, index])


def random_rows(ds: Dataset, n: int, seed) -> Dataset:
    if n >= len(ds):
        return ds
    chosen = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return ds.select(chosen)


def with_source(ds: Dataset, index: int) -> Dataset:
    feature = datasets.Value("int16")
    if not len(ds):  # (datasets cannot add a column to an empty slice of concatenated tables)
        features = datasets.Features({**ds.features, SOURCE_COLUMN: feature})
        return Dataset.from_dict({name: [] for name in features}, features=features)
    return ds.add_column(SOURCE_COLUMN, pa.array(np.full(len(ds), index, dtype=np.int16)), feature=feature)


def merged_features(all_features: list[datasets.Features]) -> datasets.Features:
    """One schema for every source's records: the union of their columns and of the keys of their messages
    (a source's `tool_calls` become null in another's), a null-typed column taking the other's type."""
    merged = {}
    for features in all_features:
        for name, feature in features.items():
            merged[name] = _merge(merged[name], feature, name) if name in merged else feature
    return datasets.Features(merged)


def _merge(a, b, where: str):
    if a == b:
        return a
    if isinstance(a, datasets.Value) and a.dtype == "null":
        return b
    if isinstance(b, datasets.Value) and b.dtype == "null":
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        return {key: _merge(a[key], b[key], f"{where}.{key}") if key in a and key in b else a.get(key, b.get(key))
                for key in dict.fromkeys([*a, *b])}
    if isinstance(a, datasets.List) and isinstance(b, datasets.List):
        return datasets.List(_merge(a.feature, b.feature, f"{where}[]"))
    if {getattr(a, "dtype", None), getattr(b, "dtype", None)} <= {"string", "large_string"}:
        return datasets.Value("large_string")
    raise DataError(f"dataset_mixture: field {where!r} is {a} in one source and {b} in another; map them onto one "
                    "type (column_mapping) or leave the field out")


def conform(ds: Dataset, features: datasets.Features) -> Dataset:
    """`ds` with every column of `features` (absent ones null), in their order and types."""
    for name, feature in features.items():
        if name not in ds.column_names:
            nulls = pa.nulls(len(ds), type=datasets.Features({name: feature}).arrow_schema.field(name).type)
            ds = ds.add_column(name, nulls, feature=feature)
    ds = ds.select_columns(list(features))
    return ds if ds.features == features else ds.cast(features)


def concatenate(parts: list[Dataset]) -> Dataset:
    parts = [p for p in parts if len(p)] or parts[:1]
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def source_counts(ds: Dataset, n_sources: int) -> np.ndarray:
    """Records per source in `ds` (through its index mapping), counted in Arrow."""
    counts = np.zeros(n_sources, dtype=np.int64)
    table = ds.with_format("arrow", columns=[SOURCE_COLUMN])
    for start in range(0, len(ds), 1 << 20):
        column = table[start : start + (1 << 20)].column(SOURCE_COLUMN).to_numpy()
        counts += np.bincount(column, minlength=n_sources)[:n_sources]
    return counts


def summarize_tokens(summaries: list[SourceSummary], tokenized_train: Dataset) -> None:
    """Fill each summary's tokens and trained tokens (one epoch) from the tokenized train split."""
    if SOURCE_COLUMN not in tokenized_train.column_names:
        return
    tokens, trained = tokens_by_source(tokenized_train, len(summaries))
    for summary, n, t in zip(summaries, tokens, trained):
        summary.tokens, summary.trained_tokens = int(n), int(t)


def tokens_by_source(tokenized: Dataset, n_sources: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and completion-masked tokens per source of tokenized rows, batch by batch in Arrow."""
    tokens, trained = np.zeros(n_sources, np.int64), np.zeros(n_sources, np.int64)
    table = tokenized.with_format("arrow", columns=[SOURCE_COLUMN, "length", "completion_mask"])
    for start in range(0, len(tokenized), 1 << 16):
        batch = table[start : start + (1 << 16)]
        sources = batch.column(SOURCE_COLUMN).to_numpy()
        tokens += np.bincount(sources, weights=batch.column("length").to_numpy(), minlength=n_sources).astype(np.int64)
        masks = batch.column("completion_mask").combine_chunks()
        per_row = row_sums(masks)
        trained += np.bincount(sources, weights=per_row, minlength=n_sources).astype(np.int64)
    return tokens, trained


def row_sums(lists: pa.ListArray) -> np.ndarray:
    """The sum of each list of a ListArray of integers (an empty list sums to 0)."""
    offsets = lists.offsets.to_numpy()
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    cumulative = np.concatenate([[0], np.cumsum(values)])
    return cumulative[offsets[1:] - offsets[0]] - cumulative[offsets[:-1] - offsets[0]]


def summary_table(summaries: list[SourceSummary]) -> list[dict]:
    """The summaries as plain dicts (report.json, all_results.json)."""
    return [dict(vars(s)) for s in summaries]
