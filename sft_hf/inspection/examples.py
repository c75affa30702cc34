"""`sft-hf inspect`: the first N examples exactly as the collator feeds them to the model, token by token.

Nothing here re-implements the pipeline: records go through the recipe's tokenizer, template, `encode_records` (the
work of `tokenize_dataset`'s map step) and `InstructionDataCollator` (or any collator passed in), and each token is
shown with its input id and label id, coloured by whether the loss trains on it. Each message of a conversation is
marked with its role and how many of its tokens are trained. Padding, EOS and truncation are marked. Output: the
terminal (rich) and a self-contained HTML file.

    sft-hf inspect --config recipes/default.yaml --n 3 --html outputs/inspect.html
"""
from __future__ import annotations

import html
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import Dataset

from sft_hf.collator import IGNORE_INDEX, recipe_collator
from sft_hf.errors import RecipeError
from sft_hf.templates import get_template
from sft_hf.tokenization import check_template_fits, encode_records


@dataclass
class TokenView:
    position: int
    token_id: int
    text: str
    label: int
    kind: str  # "trained", "masked" (label -100, or the row's first token: nothing predicts it) or "padding"
    eos: bool = False
    role: str = ""  # role of the message the token belongs to ("" for padding)
    turn: int = -1  # index of that message's span in the row


@dataclass
class ExampleView:
    split: str
    index: int  # record index in the split
    tokens: list[TokenView] = field(default_factory=list)
    full_length: int = 0  # prompt + response + EOS before any truncation
    prompt_length: int | None = None  # where the response starts in the row as fed
    cut_left: int = 0  # tokens `tokenize_dataset` removed to fit max_length (leading turns, then prompt tokens)
    dropped_turns: int = 0  # leading messages of a conversation removed to fit max_length
    cut_right: int = 0  # tokens the collator's max_length cut from the right
    dropped: bool = False  # the response alone is longer than max_length: the example is never trained

    @property
    def trained(self) -> int:
        return sum(t.kind == "trained" for t in self.tokens)

    @property
    def padding(self) -> int:
        return sum(t.kind == "padding" for t in self.tokens)


def build_views(records: Dataset, tokenizer, template, max_length: int | None, collator, batch_size: int,
                split: str = "train", trained_turns: str = "all") -> list[ExampleView]:
    """Tokenize `records` as training does, collate them in batches of `batch_size` in order, describe every token."""
    template = get_template(template)
    records = records.to_list() if isinstance(records, Dataset) else list(records)
    check_template_fits(template, tokenizer, max_length, list(records[0]) if records else [])
    full = encode_records(records, tokenizer, template, None, trained_turns, split=split)
    kept = encode_records(records, tokenizer, template, max_length, trained_turns, split=split)
    views = [ExampleView(split, i, full_length=len(f.input_ids)) for i, f in enumerate(full)]
    for view, k in zip(views, kept):
        view.dropped = k is None
        if k is not None:
            view.cut_left, view.dropped_turns = view.full_length - len(k.input_ids), k.dropped_turns

    kept_views = [v for v in views if not v.dropped]
    rows = [k.row() for k in kept if k is not None]  # the map step's rows, as the Trainer hands them to the collator
    eos_id = tokenizer.eos_token_id
    for start in range(0, len(rows), batch_size):
        features = rows[start : start + batch_size]
        batch = collator(features)
        segments = _segments(batch, len(features))
        for view, feature, (row, lo, hi) in zip(kept_views[start:], features, segments):
            ids = batch["input_ids"][row].tolist()
            labels = batch["labels"][row].tolist()
            mask = batch["attention_mask"][row].tolist() if "attention_mask" in batch else [1] * len(ids)
            n_real = sum(mask[lo:hi])
            view.cut_right = len(feature["input_ids"]) - n_real
            view.prompt_length = feature.get("prompt_length")
            first_real = mask[lo:hi].index(1) if n_real else 0  # 0 unless a collator pads on the left
            roles = [(k, t["role"]) for k, t in enumerate(feature["turns"]) for _ in range(t["length"])]
            texts = tokenizer.batch_decode([[t] for t in ids[lo:hi]], skip_special_tokens=False)
            real = 0
            for pos, (tid, label, m, text) in enumerate(zip(ids[lo:hi], labels[lo:hi], mask[lo:hi], texts)):
                if not m:
                    kind = "padding"
                elif label == IGNORE_INDEX or pos == first_real:  # the shift: nothing predicts a row's first token
                    kind = "masked"
                else:
                    kind = "trained"
                turn, role = roles[real] if m and real < len(roles) else (-1, "")
                real += bool(m)
                view.tokens.append(TokenView(pos, tid, text, label, kind, bool(m) and tid == eos_id, role, turn))
    return views


def turn_summaries(view: ExampleView) -> dict[int, tuple[str, int, int]]:
    """For each message span of the row: (role, tokens, trained tokens)."""
    out = {}
    for tok in view.tokens:
        if tok.turn >= 0:
            role, n, trained = out.get(tok.turn, (tok.role, 0, 0))
            out[tok.turn] = (role, n + 1, trained + (tok.kind == "trained"))
    return out


def _segments(batch: dict, n_features: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of each example in the batch: one row each, or consecutive spans of a padding-free row."""
    if "position_ids" in batch and batch["input_ids"].shape[0] == 1 and n_features > 1:
        positions = batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        return [(0, a, b) for a, b in zip(starts, starts[1:])]
    width = batch["input_ids"].shape[1]
    return [(i, 0, width) for i in range(n_features)]


# ---------------------------------------------------------------------------------------------------- rendering

def _header(view: ExampleView, max_length: int | None) -> str:
    name = f"{view.split}[{view.index}]"
    if view.dropped:
        return f"{name} · DROPPED: response + EOS alone exceed max_length={max_length} ({view.full_length} tokens)"
    real = len(view.tokens) - view.padding
    parts = [f"{name} · {real} tokens", f"{view.trained} trained", f"{view.padding} padding"]
    turns = turn_summaries(view)
    if len(turns) > 2:
        parts.append(f"{len(turns)} turns")
    if view.cut_left:
        dropped = f" ({view.dropped_turns} leading turns dropped)" if view.dropped_turns else ""
        parts.append(f"TRUNCATED: {view.cut_left} tokens cut from the left{dropped} (max_length={max_length})")
    if view.cut_right:
        parts.append(f"TRUNCATED by the collator: {view.cut_right} tokens cut from the right")
    return " · ".join(parts)


def render_terminal(views: list[ExampleView], console=None, show_labels: bool = True, max_length=None) -> None:
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    console.print(Text.assemble(
        "legend: ", ("trained", "black on green"), " ", ("masked", "grey62"), " ", ("[pad ×n]", "grey37"), " ",
        ("EOS", "bold underline"), " ", ("✂ truncated", "bold red"), "  grey = label -100, token(label id) otherwise",
    ))
    # two shades per kind, alternating token by token, so token boundaries stay visible
    styles = {"trained": ("black on green", "black on dark_sea_green2"), "masked": ("grey62", "grey46"),
              "padding": ("grey37", "grey37")}
    for view in views:
        console.rule(Text(_header(view, max_length), style="bold red" if view.dropped or view.cut_left else "bold"))
        if view.dropped:
            continue
        text = Text()
        if view.cut_left:
            text.append(f"✂[{view.cut_left} cut] ", style="bold red")
        pads, turn, turns = 0, -1, turn_summaries(view)
        for tok in view.tokens + [None]:
            if tok is not None and tok.kind == "padding":
                pads += 1
                continue
            if pads:
                text.append(f"[pad ×{pads}]", style=styles["padding"][0])
                pads = 0
            if tok is None:
                break
            if tok.turn != turn and tok.turn >= 0 and len(turns) > 1:  # a message starts: its role, trained tokens
                turn = tok.turn
                text.append(f"⟦{_turn_label(*turns[turn])}⟧", style="bold blue")
            style = styles[tok.kind][tok.position % 2] + (" bold underline" if tok.eos else "")
            text.append(tok.text.replace("\n", "↵"), style=style)
            if show_labels and tok.label != IGNORE_INDEX:  # grey already says -100
                text.append(f"({tok.label})", style="dim")
            if "\n" in tok.text:
                text.append("\n")
        if view.cut_right:
            text.append(f" ✂[{view.cut_right} cut]", style="bold red")
        console.print(text)


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.meta{font-size:.9em;color:#444} .meta code{background:#f3f3f3;padding:0 .3em}
.example{margin:1.2em 0;border-top:1px solid #ccc;padding-top:.5em}
.example h2{font-size:1em;margin:.3em 0} .example.dropped h2,.example.truncated h2{color:#b00}
.tokens{display:flex;flex-wrap:wrap;align-items:flex-start;gap:2px;font-family:ui-monospace,monospace;font-size:13px}
.tok{display:inline-flex;flex-direction:column;align-items:center;border:1px solid #ddd;border-radius:3px;padding:0 2px}
.tok .t{white-space:pre} .tok .l{font-size:10px;color:#555}
.tok.trained{background:#b7ebb7;border-color:#6c6} .tok.masked{background:#f4f4f4;color:#888}
.tok.padding{background:#e4e4e4;color:#aaa;border-style:dashed} .tok.eos{outline:2px solid #333;font-weight:bold}
.cut{background:#b00;color:#fff;border-radius:3px;padding:0 4px;font-family:sans-serif;font-size:12px;align-self:center}
.nl{flex-basis:100%;height:0}
.role{flex-basis:100%;font-family:sans-serif;font-size:12px;color:#1a4d8f;border-top:1px dotted #1a4d8f;margin-top:3px}
"""


def _turn_label(role: str, n: int, trained: int) -> str:
    return f"{role}: {trained}/{n} trained"


def _token_html(tok: TokenView) -> str:
    classes = " ".join(["tok", tok.kind] + (["eos"] if tok.eos else []))
    shown = html.escape(tok.text.replace("\n", "↵"))
    title = f"position {tok.position} · token id {tok.token_id} · label {tok.label} · {tok.kind}"
    span = (f'<span class="{classes}" data-pos="{tok.position}" data-id="{tok.token_id}" data-label="{tok.label}" '
            f'title="{html.escape(title)}"><span class="t">{shown}</span><span class="l">{tok.label}</span></span>')
    return span + ('<span class="nl"></span>' if "\n" in tok.text and tok.kind != "padding" else "")


def render_html(views: list[ExampleView], meta: dict[str, object] | None = None, max_length=None) -> str:
    """One self-contained page (inline CSS, no scripts): every token with its label id, hover for its ids."""
    meta_html = " · ".join(f"{html.escape(str(k))} <code>{html.escape(str(v))}</code>"
                           for k, v in (meta or {}).items())
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sft-hf inspect</title>",
        f"<style>{CSS}</style></head><body><h1>What the model is trained on</h1>",
        f"<p class='meta'>{meta_html}</p>",
        "<p class='meta'>Legend: <span class='tok trained'><span class='t'>trained</span></span> "
        "<span class='tok masked'><span class='t'>masked (label -100, or a row's first token)</span></span> "
        "<span class='tok padding'><span class='t'>padding</span></span> "
        "<span class='tok masked eos'><span class='t'>EOS</span></span> <span class='cut'>✂ truncated</span>; "
        "the small number under each token is its label id; a blue line starts each message (role: trained tokens "
        "of the message's tokens).</p>",
    ]
    for view in views:
        classes = "example" + (" dropped" if view.dropped else "") + (" truncated" if view.cut_left or view.cut_right
                                                                      else "")
        parts.append(
            f'<div class="{classes}" data-split="{view.split}" data-index="{view.index}" '
            f'data-dropped="{int(view.dropped)}" data-cut-left="{view.cut_left}" data-cut-right="{view.cut_right}" '
            f'data-trained="{view.trained}" data-padding="{view.padding}">'
            f"<h2>{html.escape(_header(view, max_length))}</h2><div class='tokens'>"
        )
        if view.cut_left:
            parts.append(f'<span class="cut" data-cut="left">✂ {view.cut_left} tokens cut</span>')
        turn, turns = -1, turn_summaries(view)
        for tok in view.tokens:
            if tok.turn != turn and tok.turn >= 0 and len(turns) > 1:  # a message starts: its role, trained tokens
                turn = tok.turn
                role, n, trained = turns[turn]
                parts.append(f'<span class="role" data-role="{html.escape(role)}" data-tokens="{n}" '
                             f'data-trained="{trained}">{html.escape(_turn_label(role, n, trained))}</span>')
            parts.append(_token_html(tok))
        if view.cut_right:
            parts.append(f'<span class="cut" data-cut="right">✂ {view.cut_right} tokens cut</span>')
        parts.append("</div></div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------- command

def load_recipe_data(model_args, data_args, first: int | None = None):
    """The recipe's tokenizer, template and raw splits, loaded the way training loads them; `first`: only that many
    records of each split are needed (a streaming recipe then reads only its head)."""
    from sft_hf.data import load_recipe_splits
    from sft_hf.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_args)
    template = get_template(data_args.template)
    if data_args.streaming and first is not None:  # the head of the stream, not all of it
        from sft_hf.streaming import first_records

        return tokenizer, template, first_records(data_args, template, first)
    return tokenizer, template, load_recipe_splits(data_args, template)


@dataclass
class InspectArguments:
    _argument_group_name = "inspect"
    n: int = field(default=5, metadata={"help": "How many examples to show."})
    split: str = field(default="train", metadata={"help": "train, validation or test."})
    html: str | None = field(default=None, metadata={"help": "HTML file to write (default <output_dir>/inspect.html)."})
    no_labels: bool = field(default=False, metadata={"help": "Terminal: hide the label id after each token."})


def main(argv: list[str]) -> int:
    from sft_hf.run.config import parse_recipe_and_values, recipe_command

    command = recipe_command(
        "sft-hf inspect", InspectArguments,
        summary="Show the first N examples token by token as the collator feeds them. Every other key (--config, "
                "--dataset_name, --template, --max_length, ...) is a recipe key, as in training.")
    own, model_args, data_args, args, _ = parse_recipe_and_values(argv, command=command)
    datasets.disable_progress_bars()  # a handful of records: the bars would only clutter the view
    tokenizer, template, raw = load_recipe_data(model_args, data_args, first=own.n)
    if own.split not in raw:
        raise RecipeError(f"--split must be one of {sorted(raw)}, not {own.split!r}")
    records = raw[own.split].select(range(min(own.n, len(raw[own.split]))))
    if len(records) == 0:
        print(f"the {own.split} split is empty", file=sys.stderr)
        return 1
    collator = recipe_collator(tokenizer, args)
    views = build_views(records, tokenizer, template, args.max_length, collator, args.per_device_train_batch_size,
                        own.split, args.trained_turns)
    render_terminal(views, show_labels=not own.no_labels, max_length=args.max_length)
    real = sum(len(v.tokens) - v.padding for v in views)
    print(f"{len(views)} examples: {sum(v.trained for v in views)} of {real} tokens trained, "
          f"{sum(v.padding for v in views)} padding, {sum(bool(v.cut_left or v.cut_right) for v in views)} truncated, "
          f"{sum(v.dropped for v in views)} dropped")
    meta = {
        "model": model_args.model_name_or_path, "dataset": data_args.dataset_name, "template": template.name,
        "max_length": args.max_length, "completion_only_loss": args.completion_only_loss,
        "trained_turns": args.trained_turns, "batch": f"{args.per_device_train_batch_size} rows, in dataset order (training shuffles)",
        "padding_free": collator.padding_free, "pad id": collator.pad_token_id, "eos id": tokenizer.eos_token_id,
    }
    out = Path(own.html or Path(args.output_dir) / "inspect.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(views, meta, args.max_length), encoding="utf-8")
    print(f"wrote {out}")
    return 0
