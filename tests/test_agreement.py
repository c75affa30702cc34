"""Judge–human agreement (sft_hf/evaluation/agreement.py): the pairwise judge's verdicts (pairwise_verdicts.json, as
recipes/evaluate.py writes it) joined with arena votes on the same prompts, models and answers, side-aware; the
confusion matrix, agreement with and without ties and Cohen's kappa worked out by hand below; the position and
length preferences of both; `sft-hf arena --agreement`."""
import json
from fractions import Fraction

import numpy as np
import pytest

from sft_hf.errors import DataError
from sft_hf.evaluation.agreement import compute_agreement, format_agreement
from sft_hf.evaluation.arena.votes import Vote, VoteStore, read_battles

# prompt i: the judge's combined verdict, then each vote as (the person's label, the judge's model shown on the left)
CASES = {
    0: ("model", [("model", True)]),
    1: ("model", [("model", False)]),
    2: ("model", [("tie", True)]),
    3: ("model", [("baseline", True)]),
    4: ("tie", [("tie", False)]),
    5: ("tie", [("model", False)]),
    6: ("baseline", [("baseline", True)]),
    7: ("baseline", [("baseline", False), ("tie (bothbad)", True)]),
    8: ("baseline", [("model", True)]),
    9: ("model", [("model", False)]),
}
# By hand. Rows the judge (model, tie, baseline), columns the people:
#   judge model:    prompts 0, 1, 9 model; 2 tie; 3 baseline    -> 3 1 1
#   judge tie:      5 model; 4 tie                               -> 1 1 0
#   judge baseline: 8 model; 7 (both bad) tie; 6, 7 baseline     -> 1 1 2
CONFUSION = [[3, 1, 1], [1, 1, 0], [1, 1, 2]]
AGREEMENT = Fraction(6, 11)  # the diagonal, 3 + 1 + 2, of 11 votes
WITHOUT_TIES = Fraction(5, 7)  # model/baseline rows and columns only: 3 + 2 of 3 + 1 + 1 + 2
# chance agreement from the margins: judge 5, 2, 4; people 5, 3, 3 (of 11): (25 + 6 + 12) / 121 = 43 / 121
KAPPA = (Fraction(66, 121) - Fraction(43, 121)) / (1 - Fraction(43, 121))  # = 23 / 78
# First position. The judge's single-order verdicts: a model win is (A, B) in its two orders, a baseline win (B, A),
# and on the two tie pairs it picked A both times: 5 + 3 + 4 = 12 A of 20. The people's decisive votes (8): the left
# answer won on prompts 0, 7 (the baseline on the left, it won) and 8: 3 of 8.
JUDGE_FIRST, PEOPLE_FIRST = Fraction(12, 20), Fraction(3, 8)
# Longer answer: the judge's model writes 20 extra characters on even prompts, 2 on odd ones, the baseline 10; on
# prompt 9 both are 12 long (left out). Judge, decisive: 0 yes, 1 no, 2 yes, 3 no, 6 no, 7 yes, 8 no: 3 of 7.
# People, decisive: 0 yes, 1 no, 3 yes, 5 no, 6 no, 7 yes, 8 yes: 4 of 7.
JUDGE_LONGER, PEOPLE_LONGER = Fraction(3, 7), Fraction(4, 7)
JUDGE_WIN_RATE = Fraction(5 * 2 + 2, 2 * 10)  # 5 wins, 2 ties of 10 pairs
PEOPLE_WIN_RATE = Fraction(5 * 2 + 3, 2 * 11)  # 5 wins, 3 ties (both bad included) of 11 votes


def model_answer(i):
    return f"T{i}" + ("x" * (20 if i % 2 == 0 else 2) if i != 9 else "x" * 10)


def baseline_answer(i):
    return f"B{i}" + "y" * 10


def orders(winner):
    verdicts = {"model": ("A", "B"), "baseline": ("B", "A"), "tie": ("A", "A"), None: (None, None)}[winner]
    return [{"order": name, "verdict": v} for name, v in zip(("model first", "baseline first"), verdicts)]


def write_verdicts(path, extra=()):
    pairs = [{"index": i, "winner": winner, "orders": orders(winner), "instruction": f"Question {i}", "input": "",
              "model_response": model_answer(i), "baseline_response": baseline_answer(i)}
             for i, (winner, _) in CASES.items()]
    pairs += list(extra)
    path.write_text(json.dumps({"model": "tuned", "baseline": "base", "judge": "openai:judge", "pairs": pairs}))
    return path


def write_votes(path, extra=()):
    store = VoteStore(path)
    k = 0
    for i, (_, votes) in CASES.items():
        for label, model_on_left in votes:
            names, answers = ["tuned", "base"], [model_answer(i), baseline_answer(i)]
            if not model_on_left:
                names, answers = names[::-1], answers[::-1]
            if label.startswith("tie"):
                winner = label
            else:
                winner = "model_a" if (label == "model") == model_on_left else "model_b"
            store.add(Vote(f"v{k}", *names, winner, f"Question {i}", *answers, voter=f"person{k}"))
            k += 1
    for vote in extra:
        store.add(vote)
    return store


def test_agreement_kappa_and_preferences_match_the_hand_counts(tmp_path):
    verdicts = json.loads(write_verdicts(tmp_path / "v.json").read_text())
    report = compute_agreement(verdicts, read_battles(write_votes(tmp_path / "votes.sqlite").path), rounds=500)
    assert report["confusion"] == CONFUSION and report["votes"] == 11 and report["prompts"] == 10
    assert report["agreement"] == pytest.approx(float(AGREEMENT), abs=1e-12)
    assert report["agreement_without_ties"] == pytest.approx(float(WITHOUT_TIES), abs=1e-12)
    assert report["votes_without_ties"] == 7
    assert report["kappa"] == pytest.approx(float(KAPPA), abs=1e-12) and KAPPA == Fraction(23, 78)
    from sklearn.metrics import cohen_kappa_score  # an independent kappa from the label lists

    judge = [j for j, row in zip(("model", "tie", "baseline"), CONFUSION) for h, n in zip("mtb", row) for _ in range(n)]
    people = [h for row in CONFUSION for h, n in zip(("model", "tie", "baseline"), row) for _ in range(n)]
    assert cohen_kappa_score(judge, people) == pytest.approx(report["kappa"], abs=1e-12)
    for key, expected in [("judge_first_position", (JUDGE_FIRST, 20)), ("people_first_position", (PEOPLE_FIRST, 8)),
                          ("judge_longer_answer", (JUDGE_LONGER, 7)), ("people_longer_answer", (PEOPLE_LONGER, 7))]:
        assert report[key]["rate"] == pytest.approx(float(expected[0]), abs=1e-12) and report[key]["of"] == \
            expected[1], key
    assert report["judge_win_rate"] == pytest.approx(float(JUDGE_WIN_RATE))
    assert report["people_win_rate"] == pytest.approx(float(PEOPLE_WIN_RATE))
    for key in ("agreement", "agreement_without_ties", "kappa", "judge_win_rate", "people_win_rate",
                "people_sc_win_rate"):
        low, high = report[f"{key}_ci"]
        assert low <= report[key] <= high and low < high, key
    assert report["left_out"] == {"other models": 0, "prompt not judged": 0, "other answers": 0, "no verdict": 0}
    again = compute_agreement(verdicts, read_battles(tmp_path / "votes.sqlite"), rounds=500)
    assert again["kappa_ci"] == report["kappa_ci"]  # seeded


def test_votes_that_do_not_match_a_verdict_are_left_out_and_counted(tmp_path):
    no_verdict = {"index": 10, "winner": None, "orders": orders(None), "instruction": "Question 10", "input": "",
                  "model_response": "T10", "baseline_response": "B10"}
    verdicts = json.loads(write_verdicts(tmp_path / "v.json", [no_verdict]).read_text())
    extra = [Vote("x1", "tuned", "other", "model_a", "Question 0", model_answer(0), "o"),  # another model
             Vote("x2", "base", "tuned", "model_a", "Question 99", "b", "t"),  # a prompt the judge never saw
             Vote("x3", "tuned", "base", "model_b", "Question 0", "a live answer", baseline_answer(0)),  # other text
             Vote("x4", "base", "tuned", "tie", "Question 10", "B10", "T10")]  # the judge gave no verdict
    store = write_votes(tmp_path / "votes.sqlite", extra)
    report = compute_agreement(verdicts, read_battles(store.path), rounds=0)
    assert report["left_out"] == {"other models": 1, "prompt not judged": 1, "other answers": 1, "no verdict": 1}
    assert report["confusion"] == CONFUSION and report["agreement_ci"] is None  # no bootstrap asked
    text = format_agreement(report)
    assert text.splitlines()[0] == ("Judge vs people: 'tuned' vs 'base', 11 votes on 10 prompts joined with the "
                                    "judge's verdicts (left out: 1 other models, 1 prompt not judged, 1 other answers, "
                                    "1 no verdict)")
    assert "agreement with ties      54.5 %" in text and "agreement without ties   71.4 %  (7 votes" in text
    assert "Cohen's kappa            0.295" in text
    with pytest.raises(DataError, match="no vote matches a verdict of the judge on 'tuned' vs 'base' \\(11 other "
                                        "models\\)"):
        renamed = [{**b, "model_a": b["model_a"].upper(), "model_b": b["model_b"].upper()}
                   for b in read_battles(write_votes(tmp_path / "fresh.sqlite").path)]
        compute_agreement(verdicts, renamed, rounds=0)


def test_cli_agreement_writes_its_report_and_plot(tmp_path, capsys):
    from sft_hf.cli import main

    verdicts = write_verdicts(tmp_path / "pairwise_verdicts.json")
    votes = write_votes(tmp_path / "votes.sqlite").path
    assert main(["arena", "--agreement", str(verdicts), "--votes", str(votes), "--bootstrap_rounds", "200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Judge vs people: 'tuned' vs 'base', 11 votes on 10 prompts")
    assert "first answer won (decisive)             60.0 % of 20           37.5 % of 8" in out
    assert "longer answer won (decisive)             42.9 % of 7           57.1 % of 7" in out
    saved = json.loads((tmp_path / "agreement.json").read_text())
    assert saved["confusion"] == CONFUSION and saved["kappa"] == pytest.approx(23 / 78)
    assert (tmp_path / "agreement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Wrote {tmp_path / 'agreement.json'} and {tmp_path / 'agreement.png'}" in out

    # the export works as the votes too, and the arena's names can differ from the judge's
    export = tmp_path / "votes.jsonl"
    assert main(["arena", "--votes", str(votes), "--export", str(export)]) == 0
    renamed = [{**json.loads(line), "model_a": json.loads(line)["model_a"] + "-v2",
                "model_b": json.loads(line)["model_b"] + "-v2"} for line in export.read_text().splitlines()]
    export.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    capsys.readouterr()
    assert main(["arena", "--agreement", str(verdicts), "--votes", str(export), "--judge_names", "tuned-v2",
                 "base-v2", "--bootstrap_rounds", "0", "--plot", str(tmp_path / "c.png")]) == 0
    assert "'tuned-v2' vs 'base-v2', 11 votes" in capsys.readouterr().out
    assert (tmp_path / "c.png").is_file()

    before = votes.read_bytes()
    assert main(["arena", "--agreement", str(verdicts), "--votes", str(votes), "--plot", str(votes)]) == 2
    assert "that is the file this command reads" in capsys.readouterr().err
    assert votes.read_bytes() == before
    assert np.array_equal(np.array(json.loads((tmp_path / "agreement.json").read_text())["confusion"]), CONFUSION)
