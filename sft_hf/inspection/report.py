"""`sft-hf report`: what a recipe's dataset looks like to the trainer, before spending compute on it.

Token lengths (histogram PNG), examples truncated or dropped at `max_length`, padding waste for the recipe's batch
size with random and with length-grouped batches, the fraction of tokens the loss trains on, turns per conversation
and trained tokens per role (system, user, assistant, tool), for a mixture the records and tokens of each source,
empty fields, exact duplicates and near duplicates (chapter 7's bonus approach: TF-IDF over character 1-3-grams,
cosine >= 0.9), all in a JSON summary. `--fail_on truncated_fraction=0.01,near_duplicates=0` exits 1 when a number exceeds its limit.

    sft-hf report --config recipes/default.yaml --out_dir outputs/report --fail_on dropped=0
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sft_hf.collator import IGNORE_INDEX
from sft_hf.errors import RecipeError
from sft_hf.tokenization import compute_stats, tokenize_dataset

NEAR_DUPLICATE_THRESHOLD = 0.9  # chapter 7's bonus script
TEXT_FIELDS = ("instruction", "input", "output")


# ---------------------------------------------------------------------------------------------------- duplicates

def record_text(record: dict) -> str:
    if record.get("messages"):
        return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in record["messages"])
    return "\n".join(record.get(f) or "" for f in TEXT_FIELDS)


def _normalize(text: str) -> str:
    """Chapter 7's preprocessing: lower case, punctuation removed."""
    return re.sub(r"[^\w\s]", "", text.lower())


def exact_duplicate_groups(texts: list[str], names: list[str]) -> list[list[str]]:
    """Groups (two or more) of records whose fields are identical, in first-seen order."""
    groups = defaultdict(list)
    for text, name in zip(texts, names):
        groups[text].append(name)
    return [g for g in groups.values() if len(g) > 1]


def near_duplicate_pairs(texts: list[str], threshold: float = NEAR_DUPLICATE_THRESHOLD, groups: list | None = None,
                         max_pairs: int = 1000) -> tuple[int, int, list[tuple[int, int, float]]]:
    """Pairs i < j with cosine >= threshold between TF-IDF vectors of character 1-3-grams; identical texts excluded.

    Returns the number of such pairs, how many of them join two different `groups` (e.g. splits), and up to
    `max_pairs` pairs, most similar first. The similarity matrix is computed in row blocks of ~5M entries.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(texts) < 2:
        return 0, 0, []
    tfidf = TfidfVectorizer(analyzer="char", ngram_range=(1, 3)).fit_transform([_normalize(t) for t in texts])
    codes = np.unique(np.asarray(texts, dtype=object), return_inverse=True)[1]  # equal code = identical text
    groups = np.asarray(groups if groups is not None else [0] * len(texts))
    count, across, kept = 0, 0, []
    block = max(16, 5_000_000 // len(texts))
    for start in tqdm(range(0, len(texts), block), desc="Near duplicates", disable=len(texts) <= 4 * block):
        cosine = (tfidf[start : start + block] @ tfidf.T).toarray()  # rows are L2-normalised: a dot product
        i, j = np.nonzero(cosine >= threshold - 1e-9)  # tolerance: rounding of an exact 0.9
        i = i + start
        keep = (j > i) & (codes[i] != codes[j])
        i, j, c = i[keep], j[keep], cosine[i[keep] - start, j[keep]]
        count += len(i)
        across += int(np.sum(groups[i] != groups[j]))
        if len(c) > max_pairs:  # keep only this block's most similar pairs: the listing is capped anyway
            top = np.argpartition(-c, max_pairs)[:max_pairs]
            i, j, c = i[top], j[top], c[top]
        kept += zip(i.tolist(), j.tolist(), c.tolist())
        if len(kept) > 2 * max_pairs:
            kept = sorted(kept, key=lambda p: (-p[2], p[0], p[1]))[:max_pairs]
    return count, across, sorted(kept, key=lambda p: (-p[2], p[0], p[1]))[:max_pairs]


# ---------------------------------------------------------------------------------------------------- batches

def _orders(lengths: list[int], batch_size: int, group_size: int, seed: int) -> dict[str, list[int]]:
    """Sample orders as the Trainer draws them: random, and `LengthGroupedSampler` for group_by_length."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    grouped = LengthGroupedSampler(group_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))
    return {"random": random_order, "group_by_length": list(grouped)}


def batch_stats(rows: list[dict], collator, batch_size: int, group_size: int, seed: int) -> dict[str, float]:
    """Run the collator over every batch of both orders: padding fraction of each, trained tokens (after the shift)."""
    lengths = [len(r["input_ids"]) for r in rows]
    out = {}
    for name, order in _orders(lengths, batch_size, group_size, seed).items():
        padding = positions = trained = real = 0
        for start in tqdm(range(0, len(order), batch_size), desc=f"Collating ({name})", leave=False,
                          disable=len(order) < 20_000):
            features = [rows[i] for i in order[start : start + batch_size]]
            batch = collator(features)
            mask = batch.get("attention_mask")
            positions += batch["input_ids"].numel()
            # padding-free rows: the filler up to pad_to_multiple_of is their padding
            n_real = int(mask.sum()) if mask is not None else sum(
                len(f["input_ids"][: collator.max_length]) for f in features)  # truncated as the collator does
            padding += batch["input_ids"].numel() - n_real
            real += n_real
            trained += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # what the loss sees after the shift
        out[f"padding_fraction_{name}"] = padding / max(positions, 1)
        out["tokens"], out["trained_tokens"] = real, trained
    out["trained_token_fraction"] = out["trained_tokens"] / max(out["tokens"], 1)
    return out


def tokens_by_role(rows, completion_only_loss: bool) -> dict[str, dict[str, int]]:
    """Tokens and trained tokens per role over the rows (trained: by the completion mask with completion_only_loss,
    else every token; a row's first token is never a target). Padding-free or padded, the collator trains the same."""
    out = defaultdict(lambda: {"tokens": 0, "trained": 0})
    for turns, mask in zip(rows["turns"], rows["completion_mask"]):
        position = 0
        for turn in turns:
            counts = out[turn["role"]]
            counts["tokens"] += turn["length"]
            trained = mask[position : position + turn["length"]] if completion_only_loss else [1] * turn["length"]
            counts["trained"] += sum(trained) - (position == 0 and bool(trained) and trained[0])
            position += turn["length"]
    return dict(out)


# ---------------------------------------------------------------------------------------------------- lengths

def _tokenize(ds, tokenizer, template, max_length, trained_turns="all"):
    try:
        return tokenize_dataset(ds, tokenizer, template, max_length, verbose=False, trained_turns=trained_turns)
    except ValueError as e:
        if "no example is left" in str(e):  # every record of the split is dropped
            return ds.select([])
        raise


def plot_lengths(lengths: dict[str, list[int]], max_length: int | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    data = [v for v in lengths.values() if v]
    ax.hist(data, bins=50, stacked=True, label=[k for k, v in lengths.items() if v])
    if max_length:
        ax.axvline(max_length, color="red", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per example (prompt + response + EOS, before truncation)")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- report

def build_report(raw, tokenizer, template, args, collator, out_dir: Path, threshold: float = NEAR_DUPLICATE_THRESHOLD,
                 max_pairs: int = 1000, title: str = "") -> dict:
    """The JSON summary (top-level numbers are what `--fail_on` checks) and the histogram PNG in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {name: ds for name, ds in raw.items() if len(ds)}
    summary = {"max_length": args.max_length, "batch_size": args.per_device_train_batch_size,
               "completion_only_loss": args.completion_only_loss, "splits": {}}

    # Lengths, truncation, drops: tokenize_dataset with and without max_length.
    full_lengths, kept = {}, {}
    for name, ds in splits.items():
        full_lengths[name] = list(_tokenize(ds, tokenizer, template, None, args.trained_turns)["length"])
        kept[name] = _tokenize(ds, tokenizer, template, args.max_length, args.trained_turns)
        stats = compute_stats(kept[name], name, len(ds)) if len(kept[name]) else None
        lengths = np.asarray(full_lengths[name])
        summary["splits"][name] = {
            "examples": len(ds),
            "truncated": stats.truncated if stats else 0,
            "dropped": stats.dropped if stats else len(ds),
            "length_mean": round(float(lengths.mean()), 2),
            "length_p50": float(np.percentile(lengths, 50)),
            "length_p95": float(np.percentile(lengths, 95)),
            "length_max": int(lengths.max()),
            "dropped_turns": stats.dropped_turns if stats else 0,
        }
    per_split = summary["splits"].values()
    summary["examples"] = sum(s["examples"] for s in per_split)
    summary["truncated"] = sum(s["truncated"] for s in per_split)
    summary["dropped"] = sum(s["dropped"] for s in per_split)
    summary["truncated_fraction"] = summary["truncated"] / max(summary["examples"], 1)
    summary["dropped_fraction"] = summary["dropped"] / max(summary["examples"], 1)
    histogram = out_dir / "length_histogram.png"
    title += f"\n{summary['truncated']} truncated, {summary['dropped']} dropped of {summary['examples']} examples"
    plot_lengths(full_lengths, args.max_length, histogram, title)
    summary["length_histogram"] = str(histogram)

    # Padding and trained tokens: the collator over the training split, batched as the Trainer batches it.
    if "train" in kept and len(kept["train"]):
        group = args.per_device_train_batch_size * args.gradient_accumulation_steps  # as Trainer's sampler groups
        summary.update(batch_stats(kept["train"].to_list(), collator, args.per_device_train_batch_size, group,
                                   args.seed))
        summary["train_sampling_strategy"] = args.train_sampling_strategy
        summary["tokens_by_role"] = tokens_by_role(kept["train"], args.completion_only_loss)

    # A mixture: each source's records taken and, after truncation, its tokens and trained tokens (one epoch).
    sources = getattr(raw, "sources", None)
    if sources:
        from sft_hf.mixture import summarize_tokens

        if "train" in kept and len(kept["train"]):
            summarize_tokens(sources, kept["train"])
        summary["sources"] = [{"label": s.label, "share": s.share, "available": s.available, "taken": s.taken,
                               "validation": s.validation, "test": s.test, "skipped": s.skipped, "tokens": s.tokens,
                               "trained_tokens": s.trained_tokens} for s in sources]

    # Conversations: messages per conversation (before truncation), and leading turns truncation dropped.
    turns = [len(r["messages"]) for ds in splits.values() if "messages" in ds.column_names for r in ds]
    summary["conversations"] = len(turns)
    if turns:
        summary["turns_per_conversation_mean"] = round(float(np.mean(turns)), 3)
        summary["turns_per_conversation"] = {str(n): turns.count(n) for n in sorted(set(turns))}
    summary["dropped_turns"] = sum(s["dropped_turns"] for s in per_split)

    # Empty fields and duplicates, over every split (a test record copied into train is a leak).
    names = [f"{name}[{i}]" for name, ds in splits.items() for i in range(len(ds))]
    records = [r for ds in splits.values() for r in ds]
    for f in TEXT_FIELDS:
        summary[f"empty_{f}"] = sum(1 for r in records if f in r and not (r[f] or "").strip())
    summary["empty_messages"] = sum(
        1 for r in records if r.get("messages") and any(not (m["content"] or "").strip() for m in r["messages"]))
    texts = [record_text(r) for r in records]
    groups = exact_duplicate_groups(texts, names)
    summary["exact_duplicates"] = sum(len(g) - 1 for g in groups)
    summary["exact_duplicates_across_splits"] = sum(len({n.split("[")[0] for n in g}) > 1 for g in groups)
    summary["exact_duplicate_groups"] = groups
    split_of = [name.split("[")[0] for name in names]
    count, across, pairs = near_duplicate_pairs(texts, threshold, split_of, max_pairs=max_pairs)
    summary["near_duplicates"] = count
    summary["near_duplicates_across_splits"] = across
    summary["near_duplicate_threshold"] = threshold
    summary["near_duplicate_pairs"] = [
        {"a": names[i], "b": names[j], "cosine": round(c, 4), "a_text": texts[i][:200], "b_text": texts[j][:200]}
        for i, j, c in pairs
    ]
    return summary


def parse_fail_on(spec: str | None) -> dict[str, float]:
    limits = {}
    for item in filter(None, (spec or "").split(",")):
        key, sep, value = item.partition("=")
        try:
            limits[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--fail_on: expected name=number, got {item!r}")
    return limits


def check_limits(summary: dict, limits: dict[str, float]) -> list[str]:
    """One message per number above its limit; an unknown name is an error, not a silent pass."""
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    unknown = sorted(set(limits) - set(numbers))
    if unknown:
        raise ValueError(f"--fail_on: unknown {unknown}; choose from {sorted(numbers)}")
    return [f"{k} = {numbers[k]:.6g} > {limit:g}" for k, limit in limits.items() if numbers[k] > limit]


def print_summary(summary: dict, console=None, n_pairs: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Dataset report (max_length={summary['max_length']}, batch {summary['batch_size']})")
    for col in ("split", "examples", "truncated", "dropped", "mean len", "p95 len", "max len"):
        table.add_column(col, justify="right")
    for name, s in summary["splits"].items():
        table.add_row(name, str(s["examples"]), str(s["truncated"]), str(s["dropped"]), f"{s['length_mean']:.1f}",
                      f"{s['length_p95']:.0f}", str(s["length_max"]))
    console.print(table)
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("max_length", "batch_size"):
            console.print(f"  {key:<38} {value:.4f}" if isinstance(value, float) else f"  {key:<38} {value}")
    if "train_sampling_strategy" in summary:
        strategy = summary["train_sampling_strategy"]
        wasted = summary.get(f"padding_fraction_{strategy}")
        console.print(f"  the recipe samples {strategy!r}" + (f": {wasted:.1%} of batch positions are padding"
                                                            if wasted is not None else ""), markup=False)
    if summary.get("turns_per_conversation"):
        console.print("  messages per conversation: " + ", ".join(
            f"{n}: {count}" for n, count in summary["turns_per_conversation"].items()), markup=False)
    for source in summary.get("sources", []):
        console.print(f"  source {source['label']} ({source['share']}): {source['taken']:,} of {source['available']:,} "
                      f"train records, {source['validation']:,} validation, {source['test']:,} test; "
                      f"{source['tokens']:,} train tokens, {source['trained_tokens']:,} trained", markup=False)
    for role, counts in summary.get("tokens_by_role", {}).items():
        console.print(f"  train tokens of {role + ' turns':<22} {counts['tokens']:>9}, trained {counts['trained']}",
                      markup=False)
    for group in summary["exact_duplicate_groups"][:n_pairs]:
        console.print(f"  exact duplicates: {', '.join(group)}")
    for p in summary["near_duplicate_pairs"][:n_pairs]:
        console.print(f"  near duplicates {p['a']} ~ {p['b']} (cosine {p['cosine']:.3f}): "
                      f"{p['a_text'][:60]!r} ~ {p['b_text'][:60]!r}", markup=False)
    console.print(f"  histogram: {summary['length_histogram']}", markup=False)


@dataclass
class ReportArguments:
    _argument_group_name = "report"
    out_dir: str | None = field(
        default=None, metadata={"help": "Folder for report.json and the PNG (default <output_dir>/data_report)."})
    json: str | None = field(default=None, metadata={"help": "JSON summary path (default <out_dir>/report.json)."})
    fail_on: str | None = field(default=None, metadata={
        "help": "Exit 1 when a summary number exceeds its limit, e.g. truncated_fraction=0.01,dropped=0."})
    near_duplicate_threshold: float = field(default=NEAR_DUPLICATE_THRESHOLD, metadata={
        "help": "Similarity from which two records count as near-duplicates."})
    max_pairs: int = field(default=1000, metadata={"help": "Near-duplicate pairs listed in the JSON."})


def main(argv: list[str]) -> int:
    from sft_hf.collator import recipe_collator
    from sft_hf.inspection.examples import load_recipe_data
    from sft_hf.run.config import parse_recipe_and_values, recipe_command

    command = recipe_command(
        "sft-hf report", ReportArguments,
        summary="Dataset report for a recipe: lengths, truncation, padding, trained tokens, duplicates. Every other "
                "key (--config, --dataset_name, --template, --max_length, --per_device_train_batch_size, ...) is a "
                "recipe key, as in training.")
    own, model_args, data_args, args, _ = parse_recipe_and_values(argv, command=command)
    try:
        limits = parse_fail_on(own.fail_on)
    except ValueError as e:
        raise RecipeError(f"--fail_on: {e}") from None
    tokenizer, template, raw = load_recipe_data(model_args, data_args)
    out_dir = Path(own.out_dir or Path(args.output_dir) / "data_report")
    dataset = (f"a mixture of {len(raw.sources)} sources" if getattr(raw, "sources", None)
               else data_args.dataset_name)
    title = f"{dataset} · {template.name} · {model_args.model_name_or_path}"
    summary = build_report(raw, tokenizer, template, args, recipe_collator(tokenizer, args), out_dir,
                           own.near_duplicate_threshold, own.max_pairs, title)
    summary = {"dataset_name": dataset, "template": template.name,
               "model_name_or_path": model_args.model_name_or_path, **summary}
    json_path = Path(own.json or out_dir / "report.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    print(f"wrote {json_path}")
    try:
        breaches = check_limits(summary, limits)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    for message in breaches:
        print(f"FAIL: {message}", file=sys.stderr)
    return 1 if breaches else 0
