"""MMLU-format multiple choice through lm-evaluation-harness on a tiny local model, offline."""
import json

import pytest
import torch

pytest.importorskip("lm_eval")

from sft_hf.evaluation.multiple_choice import (  # noqa: E402
    MCDataError,
    format_mc_comparison,
    format_mc_results,
    read_mc_file,
    run_local_mc,
)

from conftest import ROOT  # noqa: E402

QUESTIONS = [
    ("astronomy", "What is the closest star to Earth?", ["The Sun", "Sirius", "Vega", "Polaris"], 0),
    ("astronomy", "Which planet is known as the red planet?", ["Venus", "Mars", "Jupiter", "Saturn"], 1),
    ("astronomy", "What does a light year measure?", ["Time", "Brightness", "Distance", "Mass"], 2),
    ("astronomy", "How many planets are in the solar system?", ["Seven", "Nine", "Ten", "Eight"], 3),
    ("elementary_mathematics", "What is 2 + 2?", ["3", "4", "5", "6"], 1),
    ("elementary_mathematics", "What is 10 / 2?", ["2", "4", "5", "8"], 2),
    ("elementary_mathematics", "What is 3 * 3?", ["9", "6", "12", "3"], 0),
]


def mmlu_context(subject, question, choices):
    """MMLU's zero-shot prompt in lm-eval."""
    letters = "".join(f"{letter}. {choice}\n" for letter, choice in zip("ABCD", choices))
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n" \
           f"{question}\n{letters}Answer:"


@torch.no_grad()
def loglikelihood(model, tokenizer, context, continuation):
    """Sum of log p(continuation tokens | context), split at the context's token boundary like lm-eval does."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n, len(whole)))


def test_accuracy_per_subject_matches_an_independent_computation(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task_file = tmp_path / "mmlu-mini.jsonl"
    task_file.write_text("".join(
        json.dumps({"subject": s, "question": q, "choices": c, "answer": a}) + "\n" for s, q, c, a in QUESTIONS))
    results = run_local_mc(tiny_model_dir, task_file, batch_size=4, device="cpu")

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    correct = {}
    for subject, question, choices, answer in QUESTIONS:
        context = mmlu_context(subject, question, choices)
        scores = [loglikelihood(model, tokenizer, context, f" {letter}") for letter in "ABCD"]
        correct.setdefault(subject, []).append(max(range(4), key=scores.__getitem__) == answer)
    expected = {s: sum(c) / len(c) for s, c in correct.items()}

    assert results["subjects"] == pytest.approx(expected)
    assert results["num_questions"] == 7
    assert results["overall"] == pytest.approx(sum(sum(c) for c in correct.values()) / 7)
    table = format_mc_results(results)
    assert "astronomy" in table and "elementary_mathematics" in table and "(7 questions)" in table

    # lm-eval's limit caps every subject: 2 + 2 questions asked, the first of each subject's file order
    limited = run_local_mc(tiny_model_dir, task_file, batch_size=4, device="cpu", limit=2)
    first_two = {s: c[:2] for s, c in correct.items()}
    assert limited["num_questions"] == 4 and "(4 questions)" in format_mc_results(limited)
    assert limited["subjects"] == pytest.approx({s: sum(c) / 2 for s, c in first_two.items()})


def test_few_shot_examples_come_from_the_dev_rows(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = ("astronomy", "What orbits the Earth?", ["The Moon", "Mars", "The Sun", "Venus"], 0)
    rows = [{"subject": s, "question": q, "choices": c, "answer": a} for s, q, c, a in QUESTIONS[:4]]
    rows.append({"subject": dev[0], "question": dev[1], "choices": dev[2], "answer": "A", "split": "dev"})
    task_file = tmp_path / "astro.json"
    task_file.write_text(json.dumps(rows))
    results = run_local_mc(tiny_model_dir, task_file, num_fewshot=1, batch_size=4, device="cpu")

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shot = mmlu_context(*dev[:3]) + " A\n\n"
    correct = []
    for subject, question, choices, answer in QUESTIONS[:4]:
        zero_shot = mmlu_context(subject, question, choices)
        context = shot + zero_shot[zero_shot.index("\n\n") + 2 :]  # the description once, then shot, then question
        scores = [loglikelihood(model, tokenizer, context, f" {letter}") for letter in "ABCD"]
        correct.append(max(range(4), key=scores.__getitem__) == answer)
    assert results["num_questions"] == 4
    assert results["subjects"] == {"astronomy": pytest.approx(sum(correct) / 4)}


def test_reads_mmlu_csv_columns_and_letters(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("question,A,B,C,D,answer,subject\nWhat is 2+2?,3,4,5,6,B,math\nPick one,x,y,,,A,\n")
    records = read_mc_file(path)
    assert records == [
        {"question": "What is 2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math", "split": "test"},
        {"question": "Pick one", "choices": ["x", "y"], "answer": 0, "subject": "all", "split": "test"},
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n"
                   + json.dumps({"question": "q", "choices": ["a", "b"], "answer": "C"}) + "\n")
    with pytest.raises(MCDataError, match=r"bad.jsonl: record 1, field 'answer'"):
        read_mc_file(bad)
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n\n{\"question\": \"q\" \"x\"}\n")
    with pytest.raises(MCDataError, match=r"bad.jsonl: line 3, column 18: malformed JSON: Expecting ',' delimiter$"):
        read_mc_file(bad)
    with pytest.raises(MCDataError, match=r"missing.json: no such file$"):
        read_mc_file(tmp_path / "missing.json")


def test_the_shipped_mmlu_mini_file():
    """recipes/data/mmlu-mini.jsonl: 4 subjects x 10 test questions (answers spread over A-D) plus 1 dev each."""
    import collections

    records = read_mc_file(ROOT / "recipes" / "data" / "mmlu-mini.jsonl")
    test = [r for r in records if r["split"] == "test"]
    assert collections.Counter(r["subject"] for r in test) == {
        "astronomy": 10, "elementary_mathematics": 10, "high_school_biology": 10, "high_school_geography": 10}
    assert collections.Counter(r["subject"] for r in records if r["split"] == "dev") == dict.fromkeys(
        ["astronomy", "elementary_mathematics", "high_school_biology", "high_school_geography"], 1)
    assert collections.Counter(r["answer"] for r in test) == {0: 12, 1: 12, 2: 8, 3: 8}
    assert len({r["question"] for r in records}) == 44 and all(len(r["choices"]) == 4 for r in records)


def test_before_and_after_table():
    before = {"subjects": {"astronomy": 0.3, "math": 0.5}, "overall": 0.4, "num_questions": 20}
    after = {"subjects": {"astronomy": 0.6}, "overall": 0.6, "num_questions": 10}
    assert format_mc_comparison({"before": before, "after": after}).splitlines() == [
        "subject      before    after",
        "astronomy    0.3000   0.6000",
        "math         0.5000        -",
        "overall      0.4000   0.6000",
    ]
