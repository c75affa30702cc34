"""The pairwise judge: MT-bench's prompt, both orders and their combination, structured and text verdicts, cache and
resume, joining two response files, recipes/evaluate.py end to end, and the win-rate statistics."""
import difflib
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from sft_hf.errors import DataError, RecipeError, run_cli
from sft_hf.evaluation.judge import (
    ORDERS,
    PAIRWISE_PROMPT,
    VERDICT_SCHEMA,
    OllamaJudge,
    OpenAIJudge,
    Pair,
    ParsedVerdict,
    format_input,
    join_responses,
    judge_pairs,
    make_pair_prompt,
    pair_prompts,
    pairs_from_columns,
    parse_structured_verdict,
    parse_verdict,
    parse_verdict_reply,
    summarize_pairs,
)
from sft_hf.evaluation.win_rate import fit_length_controlled, standardized_length_term, summarize_outcomes, win_rate

from conftest import ROOT, SHARED_DATA
from eval_helpers import FakeJudgeServer, _chatty_model_dir, ctrl_c_on_request, pair_answers  # noqa: F401  (fixture)

EVAL_EXAMPLES = SHARED_DATA / "eval-example-data.json"
KEYS = ["model 1 response", "model 2 response"]

from sft_hf.evaluation import cli as evaluate_recipe  # noqa: E402  (recipes/evaluate.py runs it)


def numbered_pairs(n):
    """Pairs whose responses say which pair and side they are: a fake judge can tell the order from the prompt."""
    records = [{"instruction": f"Question {i}?", "input": "", "output": f"answer {i}"} for i in range(n)]
    return [Pair(r, f"model says {i}", f"baseline says {i}", i, i) for i, r in enumerate(records)]


def scripted_judge(script):
    """A reply function: script[i] = (reply with the model's response as A, reply with the baseline's as A)."""
    def reply(prompt):
        a, _ = pair_answers(prompt)
        i = int(a.split()[-1])
        return script[i][0 if a.startswith("model") else 1]
    return reply


_REFERENCE = re.compile(r"\[The Start of Reference Answer\]\n(.*?)\n\[The End of Reference Answer\]", re.S)


def closer_to_reference(a, b, reference):
    """A judge with no position bias: the answer more like the reference wins, equal ones tie."""
    ra, rb = (difflib.SequenceMatcher(None, x, reference).ratio() for x in (a, b))
    return "A" if ra > rb else "B" if rb > ra else "tie"


def reference_judge(structured):
    def reply(prompt):
        verdict = closer_to_reference(*pair_answers(prompt), _REFERENCE.search(prompt).group(1))
        return json.dumps({"winner": verdict}) if structured else f"Compared.\n\n[[{'C' if verdict == 'tie' else verdict}]]"
    return reply


def num_identical(records, model_key, baseline_key):
    return sum(r[model_key].strip() == r[baseline_key].strip() for r in records)


def expected_counts(records, model_key, baseline_key):
    verdicts = [closer_to_reference(r[model_key], r[baseline_key], r["output"]) for r in records]
    return verdicts.count("A"), verdicts.count("tie"), verdicts.count("B")


def structured(payload):
    return "response_format" in payload or "format" in payload


# ---------------------------------------------------------------------------------------------------------------
# Prompt and verdicts


def test_pair_prompt_is_mt_benchs_with_the_reference_when_the_record_has_one():
    entry = {"instruction": "Name a primary color.", "input": "", "output": "Red."}
    prompt = make_pair_prompt(entry, "Blue.", "Green.")
    assert prompt.startswith("Please act as an impartial judge and evaluate the quality of the responses provided by "
                             "two AI assistants to the user question displayed below. Your evaluation should consider "
                             "correctness and helpfulness. You will be given a reference answer")
    assert ('output your final verdict by strictly following this format: "[[A]]" if assistant A is better, "[[B]]" '
            'if assistant B is better, and "[[C]]" for a tie.\n\n[User Question]\n') in prompt
    assert prompt.endswith(
        "[User Question]\nBelow is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nName a primary color.\n\n[The Start of Reference Answer]\nRed.\n[The End of "
        "Reference Answer]\n\n[The Start of Assistant A's Answer]\nBlue.\n[The End of Assistant A's Answer]\n\n"
        "[The Start of Assistant B's Answer]\nGreen.\n[The End of Assistant B's Answer]")
    no_reference = make_pair_prompt({**entry, "output": ""}, "Blue.", "Green.")
    assert no_reference == PAIRWISE_PROMPT.format(question=format_input(entry), answer_a="Blue.", answer_b="Green.")
    assert "Reference" not in no_reference and "helpfulness, relevance, accuracy" in no_reference
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
                         {"role": "assistant", "content": "5"}]}
    assert ("[User Question]\nsystem: Be brief.\nuser: 2+3?\n\n[The Start of Reference Answer]\n5\n"
            in make_pair_prompt(chat, "5", "6"))
    model_first, baseline_first = pair_prompts(Pair(entry, "Blue.", "Green.", 0, 0))
    assert pair_answers(model_first) == ("Blue.", "Green.") and pair_answers(baseline_first) == ("Green.", "Blue.")
    assert ORDERS == ("model first", "baseline first")


@pytest.mark.parametrize("reply, verdict, problem", [
    ("[[A]]", "A", None), ("Assistant B is more accurate.\n\nFinal verdict: [[B]]", "B", None), ("[[C]]", "tie", None),
    ("[[ A ]]", "A", None), ("A", "A", None), ("B.", "B", None), ("[B]", "B", None), ("tie", "tie", None),
    ("Tie.", "tie", None), ("[[A]] at first, but on reflection [[B]]", None, "ambiguous"),
    ("[[A]] and again [[A]]", "A", None), ("Assistant A is better.", None, "no verdict"), ("", None, "no verdict"),
    ("[[D]]", None, "no verdict"), ("AB", None, "no verdict"),
])
def test_parse_text_verdict(reply, verdict, problem):
    assert parse_verdict(reply) == ParsedVerdict(verdict, problem)


@pytest.mark.parametrize("reply, verdict, problem", [
    ('{"winner": "A"}', "A", None), ('{ "winner" : "tie" }', "tie", None), ('{"winner": "B"}', "B", None),
    ('{"winner": "C"}', None, "winner not A, B or tie"), ('{"winner": "a"}', None, "winner not A, B or tie"),
    ('{"winner": "A", "why": "shorter"}', None, 'not {"winner": ...}'), ('{"verdict": "A"}', None, 'not {"winner": ...}'),
    ('{"winner": "A"', None, "invalid JSON"),  # cut off by max_tokens: never read as the text "A"
])
def test_structured_verdicts_are_validated_against_the_schema(reply, verdict, problem):
    assert parse_structured_verdict(reply) == ParsedVerdict(verdict, problem)
    assert parse_verdict_reply(reply, "json") == (ParsedVerdict(verdict, problem), "json")
    # asked for JSON, answered in MT-bench's text format (a server that ignored the format): parsed as text
    assert parse_verdict_reply("[[B]]", "json") == (ParsedVerdict("B"), "text")
    assert parse_verdict_reply('{"winner": "A"}', "text") == (ParsedVerdict(None, "no verdict"), "text")


# ---------------------------------------------------------------------------------------------------------------
# Judging both orders


def test_both_orders_are_combined_mt_bench_style_with_position_statistics():
    """Structured verdicts (OpenAI-compatible server): a verdict counts only when both orders give it; a pair whose
    orders disagree is a tie; a reply that is not schema-valid leaves its pair without a verdict, counted."""
    script = [
        ('{"winner": "A"}', '{"winner": "B"}'),  # the model wins in both orders
        ('{"winner": "B"}', '{"winner": "A"}'),  # the baseline wins in both
        ('{"winner": "A"}', '{"winner": "A"}'),  # the first position wins both times: inconsistent, a tie
        ('{"winner": "tie"}', '{"winner": "tie"}'),  # a tie both times: consistent
        ('{"winner": "A"}', '{"winner": "tie"}'),  # the model, then a tie: inconsistent, a tie
        ('{"winner": "A"}', '{"winner": "D"}'),  # not schema-valid: no verdict
    ]
    pairs = numbered_pairs(len(script))
    with FakeJudgeServer(scripted_judge(script)) as server:
        results = judge_pairs(pairs, OpenAIJudge(model="m", url=server.url + "/v1"), max_workers=3,
                              show_progress=False)
    assert [r["winner"] for r in results] == ["model", "baseline", "tie", "tie", "tie", None]
    assert [r["consistent"] for r in results] == [True, True, False, True, False, None]
    assert [[o["verdict"] for o in r["orders"]] for r in results] == [
        ["A", "B"], ["B", "A"], ["A", "A"], ["tie", "tie"], ["A", "tie"], ["A", None]]
    assert [[o["winner"] for o in r["orders"]] for r in results][:3] == [
        ["model", "model"], ["baseline", "baseline"], ["model", "baseline"]]
    assert results[5]["orders"][1] == {"order": "baseline first", "reply": '{"winner": "D"}', "verdict": None,
                                       "winner": None, "path": "json", "problem": "winner not A, B or tie"}
    assert len(server.requests) == 12
    assert all(r["payload"]["response_format"] == {"type": "json_object", "schema": VERDICT_SCHEMA}
               for r in server.requests)

    summary = summarize_pairs(results, pairs, bootstrap_samples=50)
    assert (summary["num_items"], summary["num_pairs"]) == (6, 5)
    assert (summary["wins"], summary["ties"], summary["losses"]) == (1, 3, 1)
    assert summary["win_rate"] == 0.5
    assert (summary["consistency"], summary["num_consistent"], summary["num_both_orders"]) == (0.6, 3, 5)
    # 11 single-order verdicts: the first position won 6, the second 2, 3 ties
    assert summary["num_single_verdicts"] == 11
    assert summary["first_position_rate"] == pytest.approx(6 / 11)
    assert summary["second_position_rate"] == pytest.approx(2 / 11)
    assert summary["single_order_tie_rate"] == pytest.approx(3 / 11)
    assert summary["verdict_paths"] == {"json": 11}
    assert summary["undecided"] == [{"index": 5, "problems": ["baseline first: winner not A, B or tie"]}]


def test_identical_responses_are_a_tie_without_asking():
    """As in AlpacaEval: nothing to judge, and asked, both orders would be one prompt (a server that answers it
    differently twice would invent a winner). Not counted in the position statistics."""
    pairs = numbered_pairs(3)
    pairs[1].baseline_response = pairs[1].model_response + "\n"  # the same, whitespace aside
    with FakeJudgeServer(scripted_judge([('{"winner": "A"}', '{"winner": "B"}')] * 3)) as server:
        results = judge_pairs(pairs, OpenAIJudge(model="m", url=server.url + "/v1"), show_progress=False)
    assert len(server.requests) == 4
    assert [(r["winner"], r["identical"], len(r["orders"])) for r in results] == [
        ("model", False, 2), ("tie", True, 0), ("model", False, 2)]
    summary = summarize_pairs(results, pairs, bootstrap_samples=0)
    assert (summary["wins"], summary["ties"], summary["win_rate"]) == (2, 1, 2.5 / 3)
    assert (summary["num_identical"], summary["num_both_orders"], summary["num_single_verdicts"]) == (1, 2, 4)


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_text_fallback_reads_mt_benchs_brackets_and_counts_what_it_cannot(backend):
    """A server that refuses structured output (400): both forms are tried once on the first item, then MT-bench's
    [[A]] / [[B]] / [[C]] text; replies without one verdict are kept and counted."""
    script = [
        ("Assistant A is right.\n\n[[A]]", "[[B]]"),  # the model, both orders
        ("[[C]]", "Final verdict: [[C]]"),  # a tie, both orders
        ("I prefer assistant A.", "[[A]]"),  # no brackets in the first: no verdict
        ("[[A]], or rather [[B]]", "B"),  # two verdicts: ambiguous; a bare "B" is read
    ]
    pairs = numbered_pairs(len(script))
    refuse = lambda payload: 400 if structured(payload) else None  # noqa: E731
    with FakeJudgeServer(scripted_judge(script), refuse=refuse) as server:
        judge = OllamaJudge(url=server.url) if backend == "ollama" else OpenAIJudge(model="m", url=server.url + "/v1")
        results = judge_pairs(pairs, judge, max_workers=2, show_progress=False)
    assert [r["winner"] for r in results] == ["model", "tie", None, None]
    assert {o["path"] for r in results for o in r["orders"]} == {"text"}
    assert [[o["problem"] for o in r["orders"]] for r in results] == [
        [None, None], [None, None], ["no verdict", None], ["ambiguous", None]]
    assert results[2]["orders"][0]["reply"] == "I prefer assistant A."  # kept
    assert [structured(r["payload"]) for r in server.requests] == [True, True] + [False] * 8
    summary = summarize_pairs(results, pairs, bootstrap_samples=0)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["num_pairs"]) == (1, 1, 0, 2)
    assert summary["win_rate"] == 0.75 and summary["win_rate_ci"] is None
    assert summary["verdict_paths"] == {"text": 6}
    assert [u["problems"] for u in summary["undecided"]] == [["model first: no verdict"], ["model first: ambiguous"]]


def test_local_transformers_judge_ranks_the_three_verdicts(chatty_model_dir):
    """The hf backend, structured: HFJudge picks the likeliest of "A", "B", "tie" (VERDICT_SCHEMA's enum)."""
    from sft_hf.evaluation.judge import HFJudge

    pairs = numbered_pairs(2)
    judge = HFJudge(chatty_model_dir)
    results = judge_pairs(pairs, judge, judge_format="json", show_progress=False)
    prompts = [p for pair in pairs for p in pair_prompts(pair)]
    candidates = ["A", "B", "tie"]
    for prompt, order in zip(prompts, [o for r in results for o in r["orders"]]):
        logprobs = judge.score_candidates(judge.encode(prompt)["input_ids"], candidates)
        assert order["reply"] == json.dumps({"winner": candidates[int(logprobs.argmax())]})
        assert order["path"] == "json" and order["verdict"] in ("A", "B", "tie")


def test_an_interrupted_run_resumes_from_the_cache_asking_each_prompt_once(tmp_path):
    script = [('{"winner": "A"}', '{"winner": "B"}')] * 4
    pairs = numbered_pairs(4)
    cache = tmp_path / "pairwise_cache.jsonl"

    with FakeJudgeServer(scripted_judge(script)) as server:
        url = server.url + "/v1"
        with pytest.raises(KeyboardInterrupt):
            judge_pairs(pairs, ctrl_c_on_request(OpenAIJudge, 4)(model="m", url=url), cache, max_workers=1,
                        show_progress=False)
        # the interrupt stops the run; a request the worker had already taken may still be answered and cached
        assert 3 <= len(cache.read_text().splitlines()) <= 4
        resumed = judge_pairs(pairs, OpenAIJudge(model="m", url=url), cache, max_workers=1, show_progress=False)
        assert sorted(server.attempts.values()) == [1] * 8  # the rerun asked only those left, each prompt once
        again = judge_pairs(pairs, OpenAIJudge(model="m", url=url), cache, show_progress=False)
        assert len(server.requests) == 8  # everything from the cache
    assert [r["winner"] for r in resumed] == ["model"] * 4 and again == resumed
    assert len(cache.read_text().splitlines()) == 8


# ---------------------------------------------------------------------------------------------------------------
# Joining two response files


def test_join_matches_by_instruction_and_input_whatever_the_order():
    model = [{"instruction": "Q0", "input": "", "output": "a", "model_response": "m0"},
             {"instruction": "Q1", "input": "", "output": "a", "model_response": "m1"},
             {"instruction": "Q1", "input": "", "output": "a", "model_response": "m1 again"},  # a repeated instruction
             {"instruction": "Q2", "input": "x", "output": "a", "model_response": "m2x"},
             {"instruction": "Q2", "input": "y", "output": "a", "model_response": "m2y"}]
    baseline = [{**model[k], "model_response": model[k]["model_response"].replace("m", "b")} for k in (4, 1, 3, 0, 2)]
    pairs = join_responses(model, baseline, "model_response", "model_response")
    assert [(p.model_response, p.baseline_response) for p in pairs] == [
        ("m0", "b0"), ("m1", "b1"), ("m1 again", "b1 again"), ("m2x", "b2x"), ("m2y", "b2y")]
    assert [(p.model_index, p.baseline_index) for p in pairs] == [(0, 3), (1, 1), (2, 4), (3, 2), (4, 0)]

    def chat(opening, question, reply):
        return {"messages": [{"role": "user", "content": opening}, {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": question}, {"role": "assistant", "content": "ref"}],
                "model_response": reply}

    # the same last question after different turns is a different conversation
    chats = join_responses([chat("Hi", "2+3?", "5"), chat("Hey", "2+3?", "five")],
                           [chat("Hey", "2+3?", "6"), chat("Hi", "2+3?", "six")], "model_response", "model_response")
    assert [(p.model_response, p.baseline_response) for p in chats] == [("5", "six"), ("five", "6")]


def test_join_error_names_the_files_and_the_records_that_do_not_match():
    model = [{"instruction": f"Q{i}", "input": "", "output": "a", "model_response": f"m{i}"} for i in range(6)]
    baseline = [r for r in reversed(model) if r["instruction"] not in ("Q2", "Q4")]
    baseline += [{"instruction": f"Extra question number {i} with a rather long text", "input": "", "output": "a",
                  "model_response": "b"} for i in range(4)]
    with pytest.raises(DataError) as error:
        join_responses(model, baseline, "model_response", "model_response", "run.json", "base.json")
    assert str(error.value) == (
        "run.json and base.json do not hold the same instructions (joined by instruction + input, or a "
        "conversation's turns): 2 record(s) of run.json not in base.json: record 2 ('Q2'), record 4 ('Q4'); "
        "4 record(s) of base.json not in run.json: record 4 ('Extra question number 0 with a rather lo…'), "
        "record 5 ('Extra question number 1 with a rather lo…'), record 6 ('Extra question number 2 with a rather lo…'), "
        "… (generate both from the same --dataset_name, --split and --shuffle_seed)")


def test_the_recipe_reports_a_join_error_in_one_line_with_exit_code_2(tmp_path, capsys):
    records = json.loads(EVAL_EXAMPLES.read_text())[:5]
    run, base = tmp_path / "run.json", tmp_path / "base.json"
    run.write_text(json.dumps([{**r, "model_response": r[KEYS[0]]} for r in records]))
    base.write_text(json.dumps([{**r, "model_response": r[KEYS[1]]} for r in records[1:]]))
    code = run_cli(evaluate_recipe.main, [
        "--responses", str(run), "--compare_with", str(base), "--metrics", "false", "--judge_backend", "ollama",
        "--judge_url", "http://127.0.0.1:9", "--output_dir", str(tmp_path / "out")])  # never asked: the join fails
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert error.startswith(f"error: {run} and {base} do not hold the same instructions")
    assert f"1 record(s) of {run} not in {base}: record 0 ('Calculate the hypotenuse" in error


@pytest.mark.parametrize("argv, message", [
    (["--pairwise_keys", "a", "b", "c"], "--pairwise_keys takes two values"),
    (["--pairwise_keys", "a", "b", "--compare_with", "x.json"], "not both"),
    (["--pairwise_keys", "a", "b", "--judge_backend", "ollama"], "--pairwise_keys names two fields of --responses"),
    (["--responses", "r.json", "--pairwise_keys", "a", "b"], "needs a judge: add --judge_backend"),
    (["--responses", "r.json", "--compare_with", "nowhere.json", "--judge_backend", "ollama"],
     "--compare_with nowhere.json: no such file"),
    (["--responses", "r.json", "--pairwise_names", "x", "y"], "go with --compare_with or --pairwise_keys"),
])
def test_pairwise_flags_that_do_not_fit_together(argv, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        evaluate_recipe.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# recipes/evaluate.py end to end


def test_two_columns_of_chapter_7s_eval_data_through_the_recipe(tmp_path, monkeypatch, capsys):
    """Chapter 7's model 1 vs model 2, each pair in both orders, an OpenAI-compatible judge with its key from the
    environment: counts as the judge's rule says, the files written, the key in none of them."""
    records = json.loads(EVAL_EXAMPLES.read_text())
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-pairwise-secret-1")
    out = tmp_path / "out"
    with FakeJudgeServer(reference_judge(structured=True)) as server:
        report = evaluate_recipe.main([
            "--responses", str(EVAL_EXAMPLES), "--pairwise_keys", *KEYS, "--metrics", "false",
            "--judge_backend", "openai", "--judge_url", server.url + "/v1", "--judge_model", "judge",
            "--judge_api_key_env", "MY_JUDGE_KEY", "--pairwise_bootstrap", "100", "--output_dir", str(out)])
    judged = 100 - num_identical(records, *KEYS)  # 44 pairs of chapter 7's data have the same response twice
    assert len(server.requests) == 2 * judged == 112
    assert {r["headers"]["Authorization"] for r in server.requests} == {"Bearer sk-pairwise-secret-1"}
    wins, ties, losses = expected_counts(records, *KEYS)
    summary = report["pairwise"]
    assert (summary["wins"], summary["ties"], summary["losses"]) == (wins, ties, losses)
    assert wins > losses  # chapter 7's judges preferred model 1 too
    assert summary["win_rate"] == pytest.approx((wins + ties / 2) / 100)
    assert summary["win_rate_ci"][0] < summary["win_rate"] < summary["win_rate_ci"][1]
    assert summary["consistency"] == 1.0  # a judge without position bias
    assert summary["first_position_rate"] == summary["second_position_rate"] == pytest.approx(
        (wins + losses) / (2 * judged))
    assert (summary["num_identical"], summary["num_both_orders"]) == (100 - judged, judged)
    assert summary["mean_length_model"] == pytest.approx(np.mean([len(r[KEYS[0]]) for r in records]))
    assert summary["mean_length_baseline"] == pytest.approx(np.mean([len(r[KEYS[1]]) for r in records]))
    assert (summary["model"], summary["baseline"], summary["verdict_paths"]) == (*KEYS, {"json": 2 * judged})

    saved = json.loads((out / "pairwise_summary.json").read_text())
    assert {k: v for k, v in saved.items() if k != "undecided"} == json.loads(json.dumps(summary))
    verdicts = json.loads((out / "pairwise_verdicts.json").read_text())
    assert len(verdicts["pairs"]) == 100 and verdicts["model"] == KEYS[0]
    first = verdicts["pairs"][0]
    assert first["instruction"] == records[0]["instruction"] and first["model_response"] == records[0][KEYS[0]]
    assert [o["order"] for o in first["orders"]] == list(ORDERS)
    assert verdicts["pairs"][3]["identical"] and verdicts["pairs"][3]["orders"] == []
    assert all(json.loads(o["reply"])["winner"] == o["verdict"] for p in verdicts["pairs"] for o in p["orders"])
    assert (out / "pairwise_win_rate.png").stat().st_size > 10_000
    for path in out.iterdir():
        assert b"sk-pairwise-secret" not in path.read_bytes(), path

    lines = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    low, high = summary["win_rate_ci"]
    assert lines["win rate of model 1 response"].split()[6:] == [
        f"{100 * summary['win_rate']:.1f}", "%", "95", "%", "CI", f"{100 * low:.1f}", "to", f"{100 * high:.1f}",
        "(100", "of", "100", "pairs", "with", "a", "verdict)"]
    assert f"{100 * summary['lc_win_rate']:.1f} %" in lines["length-controlled win rate"]
    assert lines["position consistency"].split()[2:7] == ["100.0", "%", str(judged), "of", str(judged)]
    assert lines["ties"].endswith("; 44 identical pairs, not asked")


def test_interrupted_recipe_run_says_where_the_answers_are_and_resumes(tmp_path, monkeypatch, capsys):
    records = json.loads(EVAL_EXAMPLES.read_text())[:3]
    responses = tmp_path / "eval.json"
    responses.write_text(json.dumps(records))
    out = tmp_path / "out"
    calls = []
    complete = OpenAIJudge.complete

    def ctrl_c_on_the_third(self, prompt, schema=None):
        calls.append(prompt)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return complete(self, prompt, schema)

    argv = ["--responses", str(responses), "--pairwise_keys", *KEYS, "--metrics", "false", "--judge_backend",
            "openai", "--judge_model", "judge", "--judge_concurrency", "1", "--pairwise_bootstrap", "20",
            "--output_dir", str(out)]
    with FakeJudgeServer(reference_judge(structured=True)) as server:
        with monkeypatch.context() as patch:
            patch.setattr(OpenAIJudge, "complete", ctrl_c_on_the_third)
            assert run_cli(evaluate_recipe.main, argv + ["--judge_url", server.url + "/v1"]) == 130
        assert f"answers so far are kept in {out / 'pairwise_cache.jsonl'}" in capsys.readouterr().err
        report = evaluate_recipe.main(argv + ["--judge_url", server.url + "/v1"])
        assert sorted(server.attempts.values()) == [1] * 6  # 2 answered, then the 4 left
    assert report["pairwise"]["num_pairs"] == 3


def test_compare_with_another_file_never_imports_torch(tmp_path):
    """The base model's test_responses.json against the fine-tune's, in another order: joined, judged (Ollama,
    MT-bench's text verdicts), printed; a command that runs no model starts without torch."""
    records = json.loads(EVAL_EXAMPLES.read_text())[:20]
    run, base = tmp_path / "finetuned.json", tmp_path / "base.json"
    run.write_text(json.dumps([{**r, "model_response": r[KEYS[0]]} for r in records]))
    shuffled = [{**r, "model_response": r[KEYS[1]]} for r in records]
    random.Random(0).shuffle(shuffled)
    base.write_text(json.dumps(shuffled))
    probe = (f"import runpy, sys\nsys.argv = [{str(ROOT / 'recipes' / 'evaluate.py')!r}, *sys.argv[1:]]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n    print('EXIT', e.code, 'torch' in sys.modules)\n")
    with FakeJudgeServer(reference_judge(structured=False)) as server:
        result = subprocess.run(
            [sys.executable, "-c", probe, "--responses", str(run), "--compare_with", str(base), "--metrics", "false",
             "--judge_backend", "ollama", "--judge_url", server.url, "--judge_format", "text",
             "--pairwise_bootstrap", "50", "--output_dir", str(tmp_path / "out")],
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "EXIT 0 False", result.stdout + result.stderr[-2000:]
    wins, ties, losses = expected_counts(records, *KEYS)
    row = next(line for line in result.stdout.splitlines() if line.startswith("pairs won"))
    assert row.split() == ["pairs", "won", str(wins), str(losses)]
    verdicts = 2 * (20 - num_identical(records, *KEYS))
    assert (f"'finetuned' vs 'base', 20 pairs: {verdicts // 2} judged in both orders ({verdicts} verdicts: text "
            f"{verdicts}), {20 - verdicts // 2} identical (ties)") in result.stdout
    summary = json.loads((tmp_path / "out" / "pairwise_summary.json").read_text())
    assert (summary["wins"], summary["ties"], summary["losses"]) == (wins, ties, losses)
    assert summary["judge_format"] == "text" and summary["consistency"] == 1.0


def test_compare_with_reports_reference_metrics_of_both_sides(tmp_path):
    from sft_hf.evaluation.metrics import reference_metrics

    records = json.loads(EVAL_EXAMPLES.read_text())[:6]
    run, base = tmp_path / "run.json", tmp_path / "base.json"
    run.write_text(json.dumps([{**r, "model_response": r[KEYS[0]]} for r in records]))
    base.write_text(json.dumps([{**r, "answer": r[KEYS[1]]} for r in reversed(records)]))
    with FakeJudgeServer(reference_judge(structured=True)) as server:
        report = evaluate_recipe.main([
            "--responses", str(run), "--compare_with", str(base), "--compare_key", "answer", "--pairwise_names",
            "tuned", "base model", "--judge_backend", "ollama", "--judge_url", server.url, "--max_samples", "4",
            "--pairwise_bootstrap", "0", "--output_dir", str(tmp_path / "out")])
    references = [r["output"] for r in records[:4]]
    assert report["metrics"] == {
        "tuned": reference_metrics([r[KEYS[0]] for r in records[:4]], references),
        "base model": reference_metrics([r[KEYS[1]] for r in records[:4]], references)}
    assert report["pairwise"]["num_items"] == 4 and report["pairwise"]["model"] == "tuned"
    assert len(server.requests) == 2 * (4 - num_identical(records[:4], *KEYS)) == 6


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def synthetic_verdicts(n, model_term, length_weight, seed, mean_extra_length=300):
    """Outcomes from a known logistic model of AlpacaEval 2's form: P(model wins) = sigmoid(model_term +
    length_weight * tanh(d / std(d))), the model's answers mostly longer. Each outcome is the mean of two draws, so
    ties (0.5) occur and E[outcome] is the model's probability, as soft labels mean it."""
    rng = np.random.default_rng(seed)
    model_lengths = rng.integers(50, 1500, n).astype(float)
    baseline_lengths = np.clip(model_lengths - rng.normal(mean_extra_length, 300, n), 1, None)
    p = 1 / (1 + np.exp(-(model_term + length_weight * standardized_length_term(model_lengths - baseline_lengths))))
    outcomes = ((rng.random(n) < p).astype(float) + (rng.random(n) < p).astype(float)) / 2
    return outcomes, model_lengths, baseline_lengths


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_length_controlled_rate_recovers_the_length_free_rate():
    outcomes, lengths_m, lengths_b = synthetic_verdicts(3000, model_term=0.4, length_weight=2.0, seed=1)
    fit = fit_length_controlled(outcomes, lengths_m - lengths_b)
    assert abs(fit.win_rate - sigmoid(0.4)) < 0.03  # 0.599
    assert win_rate(outcomes) - sigmoid(0.4) > 0.15  # the raw rate rewards the longer answers
    assert fit.length_coefficient == pytest.approx(2.0, abs=0.3)
    assert fit.model_coefficient == pytest.approx(0.4, abs=0.15)
    worse, *lengths = synthetic_verdicts(3000, model_term=-0.5, length_weight=2.0, seed=2)  # worse, but longer
    assert win_rate(worse) > 0.55 and abs(fit_length_controlled(worse, lengths[0] - lengths[1]).win_rate
                                          - sigmoid(-0.5)) < 0.03


def test_length_controlled_rate_is_one_half_when_length_explains_everything():
    outcomes, lengths_m, lengths_b = synthetic_verdicts(3000, model_term=0.0, length_weight=3.0, seed=3)
    assert win_rate(outcomes) > 0.7
    assert abs(fit_length_controlled(outcomes, lengths_m - lengths_b).win_rate - 0.5) < 0.03
    # the longer answer always wins (the model's in most pairs): separable data, kept finite by the regularisation
    rng = np.random.default_rng(4)
    difference = rng.normal(200, 300, 500)
    always_longer = (difference > 0).astype(float)
    assert win_rate(always_longer) > 0.7
    assert abs(fit_length_controlled(always_longer, difference).win_rate - 0.5) < 0.05


def test_without_a_length_effect_the_two_rates_agree():
    outcomes, lengths_m, lengths_b = synthetic_verdicts(3000, model_term=0.4, length_weight=0.0, seed=5)
    fit = fit_length_controlled(outcomes, lengths_m - lengths_b)
    assert abs(fit.win_rate - win_rate(outcomes)) < 0.015 and abs(fit.length_coefficient) < 0.2
    same_length = fit_length_controlled([1, 1, 0.5, 0], [0, 0, 0, 0])  # no length signal: the logistic mean
    assert same_length.win_rate == pytest.approx(0.625, abs=0.002) and same_length.length_coefficient == 0
    assert fit_length_controlled([0.5] * 4, [5, -5, 10, 3]).win_rate == pytest.approx(0.5)
    assert fit_length_controlled([1, 1, 1], [5, -5, 10]).win_rate == 1.0  # nothing to fit


def test_length_term_is_scaled_by_the_standard_deviation_not_centred():
    assert standardized_length_term([10, 20, 30]) == pytest.approx(np.tanh([1, 2, 3]))  # std (ddof=1) is 10
    assert list(standardized_length_term([7, 7, 7])) == [0, 0, 0] and list(standardized_length_term([4])) == [0]


def test_win_rate_counts_and_seeded_bootstrap_interval():
    outcomes = [1, 1, 0.5, 0, 1, 0.5, 0, 1, 1, 0]
    lengths = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    summary = summarize_outcomes(outcomes, lengths, lengths[::-1], bootstrap_samples=100, seed=7)
    assert (summary.num_pairs, summary.wins, summary.ties, summary.losses) == (10, 5, 2, 3)
    assert summary.win_rate == 0.6 and summary.mean_length_model == summary.mean_length_baseline == 55
    low, high = summary.win_rate_ci
    assert 0.25 < low < 0.6 < high < 0.95  # ~ 0.6 ± 2 standard errors (0.14)
    assert summary.lc_win_rate_ci[0] <= summary.lc_win_rate <= summary.lc_win_rate_ci[1]
    again = summarize_outcomes(outcomes, lengths, lengths[::-1], bootstrap_samples=100, seed=7)
    assert again == summary
    assert summarize_outcomes(outcomes, lengths, lengths[::-1], bootstrap_samples=100, seed=8).win_rate_ci != (low, high)
    empty = summarize_outcomes([], [], [])
    assert (empty.num_pairs, empty.win_rate, empty.lc_win_rate) == (0, None, None)
    with pytest.raises(ValueError, match="1 \\(win\\), 0.5 \\(tie\\) or 0"):
        summarize_outcomes([0.7], [1], [1])


def test_pairs_from_columns_keep_the_record_and_its_index():
    records = json.loads(EVAL_EXAMPLES.read_text())[:2]
    pairs = pairs_from_columns(records, *KEYS)
    assert [(p.model_response, p.baseline_response, p.model_index) for p in pairs] == [
        (r[KEYS[0]], r[KEYS[1]], i) for i, r in enumerate(records)]
