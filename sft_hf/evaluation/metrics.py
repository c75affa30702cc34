"""Reference metrics that work offline: exact match and ROUGE through the `evaluate` library.

`evaluate.load("rouge")` fetches a script from the Hub; these modules ship inside the package instead and are
loaded by path (`evaluate.load(<folder>)` imports `<folder>/<folder name>.py`), which needs no network.
"""
from __future__ import annotations

from pathlib import Path

import evaluate

from sft_hf.templates import reference_answer

MODULES = Path(__file__).resolve().parent / "evaluate_modules"


def load_metric(name: str) -> evaluate.EvaluationModule:
    """A metric shipped with sft_hf (exact_match, rouge), else whatever `evaluate.load` resolves (Hub, path)."""
    local = MODULES / name
    return evaluate.load(str(local) if (local / f"{name}.py").is_file() else name)


def reference_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """exact_match (whitespace collapsed), rouge1/rouge2/rougeL (F-measure, mean over examples)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return {"exact_match": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    scores = load_metric("exact_match").compute(predictions=predictions, references=references)
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
