"""The data a training run hands the Trainer: one source, a mixture, or a stream of either, and what the run says
about each source (records taken, tokens, what it trained on) in the log, the metrics and the model card.

sft_hf/train.py calls `prepare_training_data` before the model is loaded, `track_data` once the Trainer exists, and
`source_results` after training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict, IterableDataset

from sft_hf.data import load_recipe_splits
from sft_hf.errors import RecipeError
from sft_hf.mixture import SOURCE_COLUMN, SourceSummary, summarize_tokens, summary_table
from sft_hf.packing import pack_dataset
from sft_hf.run import peers
from sft_hf.tokenization import tokenize_dataset

logger = logging.getLogger("sft_hf")


@dataclass
class TrainingData:
    raw: DatasetDict  # records: the held-out splits (exact match, samples) and, map-style, train
    train: Dataset | IterableDataset  # tokenized rows
    validation: Dataset | None  # tokenized rows, or None
    sources: list[SourceSummary] | None = None  # a mixture's (or a stream's) sources
    stream: object | None = None  # the StreamSpec of a streamed run (positions, resume)
    restored: dict = field(default_factory=dict)  # the data state of the checkpoint this run resumes
    resume: str | None = None  # that checkpoint

    @property
    def num_sources(self) -> int:
        return len(self.sources) if self.sources else 0

    @property
    def is_chat(self) -> bool:
        """Conversations (`messages`), whose user and system turns completion_only_loss leaves untrained."""
        if self.stream is not None:
            return self.stream.shape == "messages"
        return "messages" in self.raw["train"].column_names


def prepare_training_data(data_args, args, tokenizer, template, resume: str | None = None) -> TrainingData:
    """Load, check, mix, tokenize and (with `packing`) pack: map-style, the main process first, the others reuse its
    datasets cache, waiting without the process group's timeout (sft_hf/run/peers.py). Or open the stream. `resume`:
    the checkpoint whose stream position and per-source counts carry on."""
    from sft_hf.streaming import DataStateCallback, load_streams, restore_positions

    restored = DataStateCallback.saved(resume)
    verbose = args.process_index == 0
    if data_args.streaming and args.packing:
        raise RecipeError("packing: true bin-packs the whole train split, which a stream never holds: drop packing "
                          "(streamed rows are padding-free already) or streaming")
    if data_args.streaming:
        train, raw, spec = load_streams(data_args, args, tokenizer, template)
        restore_positions(spec, restored)
        args.ignore_data_skip = True  # the stream itself continues after the last trained row
        args.accelerator_config.dispatch_batches = False  # each process reads its own shard of the stream
        with peers.main_process_first(args, desc="tokenize"):
            validation = _tokenize(raw["validation"], tokenizer, template, args, data_args, verbose, "validation")
        data = TrainingData(raw, train, validation, raw.sources, spec, restored, resume)
    else:
        with peers.main_process_first(args, desc="tokenize"):
            raw = load_recipe_splits(data_args, template)
            tokenized = tokenize_dataset(raw, tokenizer, template, args.max_length, data_args.dataset_num_proc,
                                         verbose=verbose, trained_turns=args.trained_turns)
            sources = getattr(raw, "sources", None)
            if sources:
                summarize_tokens(sources, tokenized["train"])
            train = tokenized["train"]
            if args.packing:  # TRL's packing: whole examples best-fit into rows of max_length
                train = pack_dataset(train, args.max_length, verbose=verbose)
        validation = tokenized["validation"] if len(tokenized["validation"]) else None
        data = TrainingData(raw, train, _without_source(validation), sources, None, restored, resume)
    if data.sources and verbose and data_args.dataset_mixture:
        for summary in data.sources:
            logger.info("source %s", summary.line())
    return data


def _tokenize(ds, tokenizer, template, args, data_args, verbose, split):
    if not len(ds):
        return None
    out = tokenize_dataset(ds, tokenizer, template, args.max_length, data_args.dataset_num_proc, verbose=verbose,
                           split=split, trained_turns=args.trained_turns)
    return _without_source(out)


def _without_source(ds):
    """Evaluation batches carry no bookkeeping (the model's forward would receive it)."""
    return ds.remove_columns(SOURCE_COLUMN) if ds is not None and SOURCE_COLUMN in ds.column_names else ds


def track_data(data: TrainingData, trainer) -> None:
    """Counts per source and the stream position go into every checkpoint (sft_hf/streaming.py)."""
    from sft_hf.streaming import DataStateCallback

    trainer.data_collator.num_sources = data.num_sources
    if data.sources or data.stream is not None:
        trainer.add_callback(DataStateCallback(trainer, data.stream, data.restored, data.resume))


def source_results(data: TrainingData, trainer, log: bool = True) -> list[dict] | None:
    """Each source with what the run took and trained from it (all processes, across resumes), for the metrics
    and the model card; logged."""
    from sft_hf.streaming import DataStateCallback

    if not data.sources:
        return None
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, DataStateCallback)), None)
    counts = callback.source_counts if callback is not None else None
    for k, summary in enumerate(data.sources):
        if counts is not None:
            summary.examples_trained, summary.tokens_trained = int(counts[k][0]), int(counts[k][1])
        if data.stream is not None:  # a stream's records are taken as they are trained
            summary.taken = summary.examples_trained
        if log and trainer.is_world_process_zero():
            logger.info("trained source %s", summary.line())
    return summary_table(data.sources)
