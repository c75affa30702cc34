"""Exact match and ROUGE through `evaluate`, offline, from the modules shipped in the package."""
import json
import os
import re
import subprocess
import sys

import pytest

from sft_hf.evaluation.metrics import evaluate_responses, reference_metrics

from conftest import SHARED_DATA


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_l_f(prediction, reference):
    """ROUGE-L F-measure with rouge_score's default tokenizer: lowercase, alphanumeric runs."""
    p, r = (re.findall(r"[a-z0-9]+", t.lower()) for t in (prediction, reference))
    hits = lcs(p, r)
    if not hits:
        return 0.0
    precision, recall = hits / len(p), hits / len(r)
    return 2 * precision * recall / (precision + recall)


def test_hand_computed_values():
    predictions = ["The cat sat on the mat.", "a b c d", "  Jane   Austen ", "nothing alike"]
    references = ["the cat lay on the mat", "d c b a", "Jane Austen", "Jane Austen"]
    metrics = reference_metrics(predictions, references)
    assert metrics["exact_match"] == 0.25  # whitespace collapses, case and punctuation count
    # LCS: 5 of 6 / 1 of 4 / 2 of 2 / 0 tokens.
    assert metrics["rougeL"] == pytest.approx((5 / 6 + 1 / 4 + 1 + 0) / 4)
    assert metrics["rouge1"] == pytest.approx((5 / 6 + 1 + 1 + 0) / 4)
    # bigrams: the-cat, on-the, the-mat of 5 / none of 3 / jane-austen / none.
    assert metrics["rouge2"] == pytest.approx((3 / 5 + 0 + 1 + 0) / 4)


def test_chapter_7_test_responses_match_an_independent_computation():
    records = json.loads((SHARED_DATA / "instruction-data-with-response.json").read_text())
    metrics = evaluate_responses(records)
    same = sum(r["model_response"].split() == r["output"].split() for r in records)
    assert metrics["exact_match"] == same / 110
    expected = sum(rouge_l_f(r["model_response"], r["output"]) for r in records) / 110
    assert metrics["rougeL"] == pytest.approx(expected, abs=1e-12)
    assert 0.3 < metrics["rougeL"] < 0.9  # the fine-tuned gpt2-medium answers are close to the references


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        reference_metrics(["a", "b"], ["a"])
    with pytest.raises(KeyError, match="model_response"):
        evaluate_responses([{"output": "x"}])


def test_loads_offline_with_an_empty_cache(tmp_path):
    """A fresh machine: no Hub, nothing in the modules cache; the shipped modules still load."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    code = ("from sft_hf.evaluation.metrics import reference_metrics; "
            "print(reference_metrics(['a b c'], ['a b d'])['rougeL'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(2 / 3)
