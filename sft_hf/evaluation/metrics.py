"""Reference metrics that work offline: exact match, and ROUGE through the `evaluate` library.

`evaluate.load("rouge")` fetches a script from the Hub; the module ships inside the package instead and is loaded by
path (`evaluate.load(<folder>)` imports `<folder>/<folder name>.py`), which needs no network.
"""
from __future__ import annotations

from pathlib import Path

from sft_hf.templates import reference_answer

MODULES = Path(__file__).resolve().parent / "evaluate_modules"


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """The share of predictions equal to their reference, whitespace collapsed (what training reports too)."""
    if not references:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(references)


def load_metric(name: str):
    """A metric shipped with sft_hf (rouge), else whatever `evaluate.load` resolves (Hub, path)."""
    import evaluate  # imported here: training reports exact match without loading `evaluate`

    local = MODULES / name
    return evaluate.load(str(local) if (local / f"{name}.py").is_file() else name)


def reference_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """exact_match (whitespace collapsed), rouge1/rouge2/rougeL (F-measure, mean over examples)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return {"exact_match": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    scores = {"exact_match": exact_match(predictions, references)}
    rouge = load_metric("rouge").compute(predictions=predictions, references=references,
                                         rouge_types=["rouge1", "rouge2", "rougeL"])
    return {**scores, **{k: float(v) for k, v in rouge.items()}}


def evaluate_responses(records: list[dict], response_key: str = "model_response") -> dict[str, float]:
    """Metrics of one response column against the reference: `output` (chapter 7's response JSON) or, for a
    conversation (`messages`), its final assistant reply."""
    missing = [i for i, r in enumerate(records) if response_key not in r or not ("output" in r or r.get("messages"))]
    if missing:
        raise KeyError(f"records {missing[:5]} lack {response_key!r} or a reference ('output' or 'messages')")
    return reference_metrics([r[response_key] for r in records], [reference_answer(r) for r in records])
