"""ROUGE-1/2/L/Lsum as a local `evaluate` module, so `evaluate.load(<this folder>)` works with HF_HUB_OFFLINE=1.

The same computation as the Hub's `evaluate-metric/rouge` (Google's `rouge_score`, F-measure, bootstrap
aggregation off: the plain mean over examples).
"""
import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE F-measure between predictions and references, averaged over examples (rouge_score)."
_KWARGS = """
predictions: list of str; references: list of str;
rouge_types: default ["rouge1", "rouge2", "rougeL", "rougeLsum"]; use_stemmer: bool, default False.
Returns: a dict of the mean F-measure per rouge type.
"""


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False):
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer)
        totals = {t: 0.0 for t in rouge_types}
        for prediction, reference in zip(predictions, references):
            scores = scorer.score(reference, prediction)
            for t in rouge_types:
                totals[t] += scores[t].fmeasure
        n = max(len(predictions), 1)
        return {t: total / n for t, total in totals.items()}
