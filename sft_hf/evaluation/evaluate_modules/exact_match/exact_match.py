"""Exact match as a local `evaluate` module: the share of predictions equal to their reference after collapsing
whitespace (the same rule as `sft_hf.evaluation.generation.exact_match`, which the training recipe reports)."""
import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions equal to the reference, whitespace collapsed.",
            citation="",
            inputs_description="predictions: list of str; references: list of str. Returns {'exact_match': float}.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        same = [" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references)]
        return {"exact_match": sum(same) / len(same) if same else 0.0}
