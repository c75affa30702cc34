"""The `datasets` map step: template + tokenize + EOS + completion masks + truncation, once, cached by `datasets`."""
from __future__ import annotations

import bisect
import itertools
import logging
import string
from dataclasses import dataclass

import jinja2
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value

from sft_hf.data import fork_friendly, map_num_proc
from sft_hf.templates import TRAINED_TURNS, ChatTemplate, Segment, Template, TemplateError, get_template

logger = logging.getLogger(__name__)


def _segments(record: dict, index: int, split: str, tokenizer, template: Template, trained_turns: str) -> list[Segment]:
    """The template's segments, or a TemplateError naming the split, the record and the field."""
    try:
        segments = template.segments(record, tokenizer, trained_turns)
    except TemplateError as e:
        raise TemplateError(f"[{split}] record {index}: {e}") from None
    except jinja2.TemplateError as e:  # e.g. a chat template's raise_exception("roles must alternate ...")
        raise TemplateError(f"[{split}] record {index}: the chat template refuses it: {e}") from None
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a record the data checks did not see
        raise TemplateError(f"[{split}] record {index}: template {template.name!r} cannot render it: {e!r}") from None
    for segment in segments:
        if not isinstance(segment.text, str):
            field = "output" if segment.reply else "prompt"
            raise TemplateError(f"[{split}] record {index}, field {field!r}: expected text, got "
                                f"{type(segment.text).__name__}")
    return segments


@dataclass
class Encoded:
    """One example as token ids, with the message (turn) each token belongs to and whether it is trained."""

    input_ids: list[int]
    completion_mask: list[int]  # 1: a reply token (or the final EOS) that completion_only_loss trains
    token_turns: list[int]  # index of the message each token belongs to
    roles: dict[int, str]  # message index -> role
    truncated: bool = False
    dropped_turns: int = 0  # leading messages truncation removed

    def row(self) -> dict:
        """The map step's row. `prompt_length`: tokens before the first trained one (the prompt, for one turn)."""
        mask = self.completion_mask
        turns = [{"role": self.roles[t], "length": sum(1 for _ in g)} for t, g in itertools.groupby(self.token_turns)]
        return {"input_ids": self.input_ids, "completion_mask": mask,
                "prompt_length": mask.index(1) if 1 in mask else len(mask), "length": len(self.input_ids),
                "truncated": self.truncated, "dropped_turns": self.dropped_turns, "turns": turns}


def _tokenize_runs(segment_lists: list[list[Segment]], tokenizer, add_special_tokens: bool):
    """Token ids of each record's segments, and how many of them each segment has.

    Segments are tokenized in runs: consecutive segments that are not replies (the prompt, role headers, user turns)
    as one text, exactly as generation tokenizes its prompt, and each reply apart; a token is assigned to the
    segment its first character is in. The first run gets the tokenizer's special tokens (BOS) when
    `add_special_tokens`.
    """
    runs = []  # [record, first segment, text, segment start offsets]
    for r, segments in enumerate(segment_lists):
        for k, segment in enumerate(segments):
            if runs and runs[-1][0] == r and not segment.reply and not segments[k - 1].reply:
                runs[-1][3].append(len(runs[-1][2]))
                runs[-1][2] += segment.text
            else:
                runs.append([r, k, segment.text, [0]])
    out = [([], [0] * len(segments)) for segments in segment_lists]
    firsts = [run[1] == 0 and add_special_tokens for run in runs]
    encoded = {}
    for special in (True, False):
        chosen = [j for j, first in enumerate(firsts) if first == special]
        if chosen:
            offsets = any(len(runs[j][3]) > 1 for j in chosen)  # only runs of several segments need them
            batch = tokenizer([runs[j][2] for j in chosen], add_special_tokens=special, return_offsets_mapping=offsets)
            for n, j in enumerate(chosen):
                encoded[j] = (batch["input_ids"][n], batch["offset_mapping"][n] if offsets else None)
    for j, (r, first, _, starts) in enumerate(runs):  # in order
        ids, offsets = encoded[j]
        out[r][0].extend(ids)
        if len(starts) == 1:
            out[r][1][first] += len(ids)
        else:
            for a, _ in offsets:
                out[r][1][first + max(0, bisect.bisect_right(starts, a) - 1)] += 1
    return out


def encode_segments(segment_lists: list[list[Segment]], tokenizer, template: Template, eos_token_id: int,
                    trained_turns: str = "all", indices=None, split: str = "data") -> list[Encoded]:
    """Token ids, completion masks and turns of rendered records; EOS appended unless the last reply ends with it."""
    tokenized = _tokenize_runs(segment_lists, tokenizer, add_special_tokens=not isinstance(template, ChatTemplate))
    out = []
    for segments, (ids, counts), index in zip(segment_lists, tokenized, indices or range(len(segment_lists))):
        # segments end with the last reply: what follows it is never read
        assert segments[-1].reply, "a template's segments end with the last reply"
        first = next((k for k, c in enumerate(counts) if c), None)
        if first is None or segments[first].reply:  # the first reply token needs a token to be predicted from
            raise TemplateError(f"[{split}] record {index}: template {template.name!r} renders an empty prompt")
        if not (ids[-1] == eos_token_id and counts[-1]):  # the stop token the model must learn to write
            ids = ids + [eos_token_id]
            counts[-1] += 1
        mask, turns = [], []
        for segment, count in zip(segments, counts):
            trained = segment.reply and (trained_turns == "all" or segment is segments[-1]
                                         or segment.turn == segments[-1].turn)
            mask += [int(trained)] * count
            turns += [segment.turn] * count
        out.append(Encoded(ids, mask, turns, {s.turn: s.role for s in segments}))
    return out


def drop_first_exchange(messages: list[dict]) -> tuple[list[dict], int] | None:
    """The conversation without its first exchange (messages up to the second user turn), system prompt kept, and
    how many messages that removed; None when only one exchange is left."""
    n_system = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    rest = messages[n_system:]
    cut = next((i for i, m in enumerate(rest) if i > 0 and m.get("role") == "user"), None)
    return None if cut is None else (messages[:n_system] + rest[cut:], cut)


def left_cut_positions(ids: list[int], budget: int, special_ids: set[int], max_lead: int) -> list[int]:
    """Positions of `ids` kept when it must shrink to `budget` tokens: its leading special tokens (BOS, a chat
    template's first marker; at most `max_lead` of them), then its last tokens. Training's truncation and
    generation's prompt crop share this rule, so the prompts they see begin alike."""
    lead = min(max_lead, next((i for i, t in enumerate(ids) if t not in special_ids), len(ids)))
    return list(range(lead)) + list(range(len(ids) - (budget - lead), len(ids)))


def cut_left(encoded: Encoded, max_length: int, special_ids: set[int]) -> Encoded | None:
    """Today's rule for one reply: keep the final reply + EOS (the trailing trained tokens) and the row's leading
    special tokens (BOS, a chat template's first marker), cut the tokens between them from the left. None when the
    reply alone does not fit."""
    ids, mask = encoded.input_ids, encoded.completion_mask
    start = len(mask) - next((i for i, m in enumerate(reversed(mask)) if not m), len(mask))  # the last reply
    budget = max_length - (len(ids) - start)  # tokens left for what comes before the reply
    if budget < 1:
        return None
    keep = left_cut_positions(ids[:start], budget, special_ids, max_lead=budget) + list(range(start, len(ids)))
    return Encoded([ids[i] for i in keep], [mask[i] for i in keep], [encoded.token_turns[i] for i in keep],
                   encoded.roles, True, encoded.dropped_turns)


def encode_records(records: list[dict], tokenizer, template: str | Template = "alpaca", max_length: int | None = None,
                   trained_turns: str = "all", indices=None, split: str = "data") -> list[Encoded | None]:
    """Template, tokenize, mask and truncate records: the map step's work, per record (None: dropped).

    Too long for `max_length`: a conversation loses whole exchanges from its start (the system prompt stays),
    re-rendered by its template; when one exchange is still too long, tokens before its reply are cut from the left,
    after the row's leading special tokens; when the reply + EOS alone do not fit, the example is dropped.
    """
    template = get_template(template)
    if trained_turns not in TRAINED_TURNS:
        raise TemplateError(f"trained_turns must be one of {list(TRAINED_TURNS)}, not {trained_turns!r}")
    indices = list(indices if indices is not None else range(len(records)))
    eos = tokenizer.eos_token_id

    def encode(record, index):
        return encode_segments([_segments(record, index, split, tokenizer, template, trained_turns)], tokenizer,
                               template, eos, trained_turns, [index], split)[0]

    segment_lists = [_segments(r, i, split, tokenizer, template, trained_turns) for r, i in zip(records, indices)]
    encoded = encode_segments(segment_lists, tokenizer, template, eos, trained_turns, indices, split)
    special_ids = set(tokenizer.all_special_ids)
    for k, (record, index) in enumerate(zip(records, indices)):
        if max_length is None or len(encoded[k].input_ids) <= max_length:
            continue
        messages, dropped = record.get("messages"), 0
        while len(encoded[k].input_ids) > max_length and messages and (shorter := drop_first_exchange(messages)):
            messages, n = shorter
            dropped += n
            encoded[k] = encode({**record, "messages": messages}, index)
        encoded[k].truncated, encoded[k].dropped_turns = True, dropped
        if len(encoded[k].input_ids) > max_length:
            encoded[k] = cut_left(encoded[k], max_length, special_ids)
    return encoded


def _tokenize_batch(batch: dict, indices: list[int], tokenizer, template: Template, max_length: int | None,
                    trained_turns: str = "all", split: str = "data") -> dict:
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    encoded = encode_records(records, tokenizer, template, max_length, trained_turns, indices, split)
    rows = [e.row() for e in encoded if e is not None]
    out = {key: [row[key] for row in rows] for key in ROW_COLUMNS}
    for key in CARRIED_COLUMNS:  # bookkeeping that follows each kept record (a mixture's source index)
        if key in batch:
            out[key] = [value for value, e in zip(batch[key], encoded) if e is not None]
    return out


ROW_COLUMNS = ("input_ids", "completion_mask", "prompt_length", "length", "truncated", "dropped_turns", "turns")
CARRIED_COLUMNS = ("source",)


def row_features(columns) -> Features:
    """The map step's Arrow types: token ids as int32 and the mask as int8, not Python's int64: the cache of millions
    of rows, and what reading it maps into memory, shrink to less than half (docs/data.md#large-files)."""
    features = Features({
        "input_ids": List(Value("int32")), "completion_mask": List(Value("int8")), "prompt_length": Value("int32"),
        "length": Value("int32"), "truncated": Value("bool"), "dropped_turns": Value("int32"),
        "turns": List({"role": Value("string"), "length": Value("int32")}),
    })
    if "source" in columns:
        features["source"] = Value("int16")
    return features


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
    trained_tokens: int  # reply tokens incl. EOS (what completion_only_loss trains)
    dropped_turns: int = 0  # messages truncation removed from the start of conversations

    def __str__(self) -> str:
        turns = f" ({self.dropped_turns} leading turns dropped)" if self.dropped_turns else ""
        return (
            f"[{self.split}] {self.examples_in} examples → kept {self.kept}, truncated {self.truncated}{turns}, "
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
    trained_turns: str = "all",
) -> Dataset | DatasetDict:
    """Template and tokenize every record, append EOS, mark the tokens the model learns to write.

    Output columns: `input_ids` (prompt + response + EOS; for a conversation every turn), `completion_mask` (1 on each
    trained reply's tokens: content, end-of-turn token and the final EOS; `trained_turns="last"`: the last reply
    only), `prompt_length` (tokens before the first trained one), `length`, `truncated`, `dropped_turns` and `turns`
    (role and token count of each message, in order). Over-long conversations lose whole exchanges from the start
    (system prompt kept); then prompt tokens are cut from the left, after the leading special tokens, never reply
    tokens; examples whose reply + EOS alone exceed `max_length` are dropped. Statistics are printed per split.
    A `source` column (a mixture's) follows each kept record. `num_proc`: processes for the map (default: every
    usable core, once there are 1,000 records per process).
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {k: tokenize_dataset(v, tokenizer, template, max_length, num_proc, verbose, split=k,
                                 trained_turns=trained_turns)
             for k, v in dataset.items()}
        )
    template = get_template(template)
    if tokenizer.eos_token_id is None:
        raise TemplateError(
            f"the tokenizer has no eos_token (pad_token: {tokenizer.pad_token!r}): every response must end with EOS "
            "for the model to learn to stop; set one, e.g. tokenizer.eos_token = '</s>'"
        )
    if len(dataset) == 0:
        return dataset
    n_in = len(dataset)
    split = split or (dataset.split and str(dataset.split)) or "data"  # split_dataset's parts all say "train"
    check_template_fits(template, tokenizer, max_length, dataset.column_names)
    processes = map_num_proc(num_proc, n_in)
    with fork_friendly(processes):
        tokenized = dataset.map(
            _tokenize_batch,
            batched=True,
            with_indices=True,
            num_proc=processes,
            remove_columns=dataset.column_names,
            features=row_features(dataset.column_names),
            fn_kwargs=dict(tokenizer=tokenizer, template=template, max_length=max_length,
                           trained_turns=trained_turns, split=split),
            desc=f"Tokenizing {split} with template {template.name!r}",
        )
    if len(tokenized) == 0:  # (checked first: a map that keeps no row has none of the new columns either)
        raise TemplateError(
            f"[{split}] no example is left after truncation to max_length={max_length}: every response + EOS is "
            f"longer (the shortest has {min_response_length(dataset, tokenizer, template)} tokens)"
        )
    stats = compute_stats(tokenized, split, n_in)
    tokenized.info.description = str(stats)
    if verbose:
        print(stats)
    return tokenized


def template_overhead(template: Template, tokenizer) -> int:
    """Tokens the template itself adds to every example: an empty record's prompt, response and EOS."""
    empty = {field: "" for field in template.fields() | {"instruction", "input", "output"}}
    return len(encode_records([empty], tokenizer, template, trained_turns="last", split="template check")[0].input_ids)


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
    """The split's statistics, chunk by chunk of the memory-mapped table: memory independent of the number of rows
    (a histogram of the lengths gives their exact percentile)."""
    if not len(tokenized):
        return TokenizeStats(split, n_in, 0, 0, n_in, 0.0, 0, 0.0, 0, 0, 0)
    table = tokenized.with_format("arrow", columns=["length", "truncated", "dropped_turns", "completion_mask"])[:]
    counts = np.zeros(1, dtype=np.int64)  # counts[k]: rows of length k
    for chunk in table.column("length").chunks:
        chunk_counts = np.bincount(chunk.to_numpy(zero_copy_only=False))
        counts = np.pad(counts, (0, max(0, len(chunk_counts) - len(counts))))
        counts[: len(chunk_counts)] += chunk_counts
    lengths = np.arange(len(counts))
    tokens = int((counts * lengths).sum())
    return TokenizeStats(
        split=split,
        examples_in=n_in,
        kept=len(tokenized),
        truncated=int(pc.sum(table.column("truncated")).as_py() or 0),
        dropped=n_in - len(tokenized),
        mean_length=tokens / int(counts.sum()),
        max_length=int(lengths[counts > 0][-1]),
        p95_length=percentile_of_counts(counts, 95),
        tokens=tokens,
        trained_tokens=int(pc.sum(pc.list_flatten(table.column("completion_mask"))).as_py() or 0),
        dropped_turns=int(pc.sum(table.column("dropped_turns")).as_py() or 0),
    )


def percentile_of_counts(counts: np.ndarray, q: float) -> float:
    """`np.percentile(values, q)` (linear interpolation) of the values whose histogram is `counts` (value k occurring
    counts[k] times), without the values."""
    cumulative = np.cumsum(counts)
    position = (cumulative[-1] - 1) * q / 100
    below, fraction = int(np.floor(position)), position - np.floor(position)
    low = int(np.searchsorted(cumulative, below, side="right"))  # the value at that rank of the sorted values
    high = int(np.searchsorted(cumulative, min(below + 1, cumulative[-1] - 1), side="right"))
    return float(low + fraction * (high - low))
