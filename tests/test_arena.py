"""`sft-hf arena` without a browser: Bradley-Terry ratings and their intervals, the SQLite vote store under
concurrency, replays and SIGKILL, the JSONL export, the command line, joining response files, battles, and live
battles (a fake OpenAI-compatible server, tiny local models) through the page's own event handlers; and what a
careless user or a hostile voter would break: output paths over the votes file, foreign and damaged votes files,
per-voter limits, the anonymous rate limit, battles bound to their voter, a votes file that fails mid-run, the
leaderboard as a CPU sink, handlers and uploads over plain HTTP, password guessing, SIGTERM."""
import collections
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from contextlib import closing
from types import SimpleNamespace

import numpy as np
import pytest

from arena_helpers import EVAL_EXAMPLE_DATA, ROOT, ArenaServer, free_port, http, read_only, write_response_files
from eval_helpers import FakeJudgeServer, _chatty_model_dir
from sft_hf.errors import DataError, RecipeError
from sft_hf.evaluation.arena.battles import BattleDeck, ResponseColumn, load_response_columns
from sft_hf.evaluation.arena.ratings import Battles, compute_leaderboard, fit_bradley_terry, win_rate_matrix
from sft_hf.evaluation.arena.votes import WINNERS, Vote, VoteStore, export_jsonl, read_battles

SHARED_FIXTURES = (_chatty_model_dir,)  # registers the fixture chatty_model_dir (a tiny model that answers variously)


def battle(a, b, winner):
    return {"model_a": a, "model_b": b, "winner": winner}


def simulate(true: dict[str, float], n: int, rng: random.Random) -> list[dict]:
    """Decisive votes between random pairs, drawn from the Bradley-Terry model with ratings `true`."""
    out = []
    for _ in range(n):
        a, b = rng.sample(list(true), 2)
        p_a = 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
        out.append(battle(a, b, "model_a" if rng.random() < p_a else "model_b"))
    return out


def ratings_of(battles) -> dict[str, float]:
    table = Battles(battles)
    return dict(zip(table.models, fit_bradley_terry(table)))


# ---------------------------------------------------------------------------------------------- ratings

def test_bradley_terry_recovers_known_strengths():
    true = {"a": 1200.0, "b": 1100.0, "c": 1000.0, "d": 900.0, "e": 800.0}  # mean 1000, as the fit is anchored
    fitted = ratings_of(simulate(true, 6000, random.Random(0)))
    assert sorted(fitted, key=fitted.get, reverse=True) == list(true)
    assert abs(np.mean(list(fitted.values())) - 1000) < 1e-6
    for model in true:
        assert abs(fitted[model] - true[model]) < 20, (model, fitted[model])
    assert abs((fitted["a"] - fitted["e"]) - 400) < 25


def test_scale_ten_to_one_is_400_points_and_ties_are_half_wins():
    ten_to_one = [battle("x", "y", "model_a")] * 6 + [battle("y", "x", "model_b")] * 4 + [battle("y", "x", "model_a")]
    r = ratings_of(ten_to_one)
    assert r["x"] == pytest.approx(1200, abs=0.5) and r["y"] == pytest.approx(800, abs=0.5)
    # one win and two ties weigh as two wins and one loss: 2:1 odds, 400·log10(2) = 120.4 points
    with_ties = ratings_of([battle("x", "y", "model_a"), battle("x", "y", "tie"), battle("x", "y", "tie (bothbad)")])
    two_to_one = ratings_of([battle("x", "y", "model_a")] * 2 + [battle("x", "y", "model_b")])
    assert with_ties["x"] - with_ties["y"] == pytest.approx(400 * math.log10(2), abs=0.5)
    assert with_ties == pytest.approx(two_to_one, abs=0.5)


def test_matches_an_independent_bradley_terry_fit():
    """Zermelo's iteration (Hunter 2004's MM algorithm), ties as half a win, against the logistic regression."""
    rng = random.Random(1)
    battles = simulate({"a": 1150, "b": 1050, "c": 1000, "d": 800}, 800, rng)
    battles += [battle(*rng.sample("abcd", 2), rng.choice(["tie", "tie (bothbad)"])) for _ in range(150)]
    models = sorted("abcd")
    wins = {m: 0.0 for m in models}
    games = {(i, j): 0 for i in models for j in models}
    for b in battles:
        games[b["model_a"], b["model_b"]] += 1
        games[b["model_b"], b["model_a"]] += 1
        if b["winner"] in ("tie", "tie (bothbad)"):
            wins[b["model_a"]] += 0.5
            wins[b["model_b"]] += 0.5
        else:
            wins[b[b["winner"]]] += 1
    strength = {m: 1.0 for m in models}
    for _ in range(2000):
        strength = {i: wins[i] / sum(games[i, j] / (strength[i] + strength[j]) for j in models if j != i)
                    for i in models}
    logs = {m: 400 * math.log10(s) for m, s in strength.items()}
    mm = {m: v - np.mean(list(logs.values())) + 1000 for m, v in logs.items()}
    assert ratings_of(battles) == pytest.approx(mm, abs=0.5)


def test_bootstrap_intervals_cover_the_truth_and_match_the_standard_error():
    """Over 12 simulated arenas the 95 % intervals hold the true rating about 95 % of the time (36 intervals: 8 or
    more misses has a chance below 0.2 %), and are as wide as the asymptotic standard error (Fisher information of
    the Bradley-Terry likelihood) says."""
    true = {"a": 1100.0, "b": 1000.0, "c": 900.0}
    covered, width_ratios = [], []
    for seed in range(12):
        battles = simulate(true, 300, random.Random(100 + seed))
        board = compute_leaderboard(battles, rounds=100, seed=seed)
        table = Battles(battles)
        # covariance of the mean-zero ratings: pseudo-inverse of the Fisher information, in rating points
        index = {m: k for k, m in enumerate(table.models)}
        info = np.zeros((3, 3))
        c = math.log(10) / 400
        for b in battles:
            d = np.zeros(3)
            d[index[b["model_a"]]], d[index[b["model_b"]]] = c, -c
            p = 1 / (1 + 10 ** ((true[b["model_b"]] - true[b["model_a"]]) / 400))
            info += p * (1 - p) * np.outer(d, d)
        se = np.sqrt(np.diag(np.linalg.pinv(info)))
        for s in board.standings:
            covered.append(s.lower <= true[s.model] <= s.upper)
            width_ratios.append((s.upper - s.lower) / (2 * 1.96 * se[index[s.model]]))
        assert board.warning is None
    assert sum(covered) >= 29, sum(covered)
    assert 0.75 < np.mean(width_ratios) < 1.25, np.mean(width_ratios)


def test_bootstrap_is_seeded():
    battles = simulate({"a": 1050, "b": 950}, 100, random.Random(3))
    first, again = compute_leaderboard(battles, 50, seed=7), compute_leaderboard(battles, 50, seed=7)
    other = compute_leaderboard(battles, 50, seed=8)
    assert [(s.lower, s.upper) for s in first.standings] == [(s.lower, s.upper) for s in again.standings]
    assert [(s.lower, s.upper) for s in first.standings] != [(s.lower, s.upper) for s in other.standings]


def test_undetermined_ratings_are_flagged():
    board = compute_leaderboard([battle("x", "y", "model_a")] * 3 + [battle("y", "z", "tie")], rounds=20)
    assert board.warning and "won every vote: x" in board.warning and "lost every vote" not in board.warning
    few = compute_leaderboard([battle("x", "y", "model_a")] * 4 + [battle("x", "y", "model_b")], rounds=100)
    assert few.warning and "bootstrap resamples" in few.warning  # the fit exists; a third of the resamples not
    fine = compute_leaderboard([battle("x", "y", "model_a")] * 30 + [battle("x", "y", "model_b")] * 20, rounds=100)
    assert fine.warning is None


def test_counts_and_win_rate_matrix():
    battles = [battle("x", "y", "model_a"), battle("y", "x", "model_a"), battle("x", "y", "tie"),
               battle("x", "z", "tie (bothbad)"), battle("z", "y", "model_b")]
    board = {s.model: s for s in compute_leaderboard(battles, rounds=10).standings}
    x = board["x"]
    assert (x.votes, x.wins, x.losses, x.ties, x.bothbad) == (4, 1, 1, 1, 1)
    assert (board["y"].votes, board["y"].wins, board["y"].losses) == (4, 2, 1)
    fraction, decisive = win_rate_matrix(battles, ["x", "y", "z"])
    assert decisive.tolist() == [[0, 2, 0], [2, 0, 1], [0, 1, 0]]  # ties left out, as Chatbot Arena's plot
    assert fraction[0, 1] == 0.5 and fraction[1, 0] == 0.5
    assert fraction[1, 2] == 1.0 and fraction[2, 1] == 0.0 and math.isnan(fraction[0, 2]) and math.isnan(fraction[0, 0])


# ---------------------------------------------------------------------------------------------- votes

def make_vote(battle_id, winner="model_a", a="x", b="y"):
    return Vote(battle_id, a, b, winner, "Sort 3 1 2", "1 2 3", "3 2 1")


def test_twenty_voters_at_once_are_all_counted(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    start = threading.Barrier(20)
    results, errors = [], []

    def voter(k):
        try:
            start.wait()
            results.append(VoteStore(store.path).add(make_vote(f"battle-{k}", WINNERS[k % 4])))
        except Exception as e:  # noqa: BLE001 - counted below
            errors.append(e)

    threads = [threading.Thread(target=voter, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and all(inserted for inserted, _ in results)
    assert store.count() == 20
    assert sorted(v.battle_id for v in store.votes()) == sorted(f"battle-{k}" for k in range(20))
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_replayed_vote_counts_once(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    assert store.add(make_vote("b1", "model_b")) == (True, "model_b")
    assert store.add(make_vote("b1", "model_b")) == (False, "model_b")  # the same request again
    assert store.add(make_vote("b1", "tie")) == (False, "model_b")  # a second click on another button
    start = threading.Barrier(20)
    results = []

    def replay(k):
        start.wait()
        results.append(store.add(make_vote("b2", WINNERS[k % 4])))

    threads = [threading.Thread(target=replay, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(inserted for inserted, _ in results) == 1 and len({winner for _, winner in results}) == 1
    assert store.count() == 2


READER_SCRIPT = """
import sys
from sft_hf.evaluation.arena.votes import VoteStore
store = VoteStore(sys.argv[1], create=False)
print("reading", flush=True)
while True:
    store.votes()  # each read's connection, the last one to close, checkpoints and deletes the WAL if it can
"""


def test_votes_added_beside_an_open_connection_while_another_process_reads(tmp_path):
    """A process that holds a connection to the votes file (a notebook, a test) opens a VoteStore on it and votes
    while the arena's server reads. Checking the file with open()/close() dropped this process's SQLite locks, the
    reader deleted the WAL under it, and the 5th vote or so failed with "disk I/O error" (seen in CI)."""
    path = tmp_path / "votes.sqlite"
    VoteStore(path).add(make_vote("b0"))
    reader = subprocess.Popen([sys.executable, "-c", READER_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True,
                              cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert reader.stdout.readline() == "reading\n"
        held = []
        for k in range(60):
            held.append(sqlite3.connect(path))  # left open, as `with sqlite3.connect(...)` leaves it
            assert held[-1].execute("SELECT count(*) FROM votes").fetchone() == (k + 1,)
            assert VoteStore(path).add(make_vote(f"b{k + 1}", WINNERS[k % 4])) == (True, WINNERS[k % 4])
        assert reader.poll() is None, "the reading process died"
    finally:
        reader.kill()
        reader.wait()
        reader.stdout.close()
    for conn in held:
        conn.close()
    assert VoteStore(path).count() == 61
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


VOTER_SCRIPT = """
import sys
from sft_hf.evaluation.arena.votes import Vote, VoteStore
store = VoteStore(sys.argv[1])
for k in range(1_000_000):
    store.add(Vote(f"battle-{k}", "x", "y", "model_a", "q" * 500, "a" * 2000, "b" * 2000))
    print(f"battle-{k}", flush=True)  # acknowledged: the voter would now see the names
"""


def test_sigkill_while_voting_loses_no_acknowledged_vote(tmp_path):
    path = tmp_path / "votes.sqlite"
    for trial in range(3):
        voter = subprocess.Popen([sys.executable, "-c", VOTER_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True,
                                 cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
        acknowledged = []
        for line in voter.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) >= 40 + 7 * trial:  # killed at a different point of the loop each time
                break
        os.kill(voter.pid, signal.SIGKILL)
        voter.wait()
        voter.stdout.close()
        assert voter.returncode == -signal.SIGKILL
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {v.battle_id for v in VoteStore(path).votes()}
        assert set(acknowledged) <= stored  # every vote the voter was told about, after each kill
    assert len(stored) >= 40  # ids restart at battle-0: the replays of later runs were ignored, not added


def test_export_jsonl_in_chatbot_arena_form(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    store.add(Vote("b1", "base", "tuned", "model_b", "Sort", "3 1 2", "3 1 2", input="3 1 2", voter="alice"))
    store.add(Vote("b2", "tuned", "base", "tie (bothbad)", "Name a color", "blue", "sky", source="live"))
    assert export_jsonl(store, tmp_path / "votes.jsonl") == 2
    lines = [json.loads(line) for line in (tmp_path / "votes.jsonl").read_text().splitlines()]
    first = lines[0]
    assert {k: first[k] for k in ("question_id", "model_a", "model_b", "winner", "judge", "turn", "anony")} == \
        {"question_id": "b1", "model_a": "base", "model_b": "tuned", "winner": "model_b", "judge": "alice", "turn": 1,
         "anony": True}
    assert first["conversation_a"] == [{"role": "user", "content": "Sort\n\n3 1 2"},
                                       {"role": "assistant", "content": "3 1 2"}]
    assert first["conversation_b"][1] == {"role": "assistant", "content": "3 1 2"}
    assert isinstance(first["tstamp"], float) and first["tstamp"] > 1.7e9
    assert lines[1]["winner"] == "tie (bothbad)" and lines[1]["judge"] == "anonymous" and lines[1]["source"] == "live"
    assert read_battles(tmp_path / "votes.jsonl") == lines == read_battles(store.path)


def test_bad_votes_files_are_one_line_errors(tmp_path):
    with pytest.raises(RecipeError, match="no such votes file"):
        read_battles(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_text("not a database, just text " * 100)
    with pytest.raises(DataError, match="not a votes database"):
        read_battles(tmp_path / "junk.sqlite")
    (tmp_path / "bad.jsonl").write_text(json.dumps(battle("x", "y", "model_a")) + "\n"
                                        + json.dumps(battle("x", "y", "left")) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: record 1 \(line 2\), field 'winner': 'left'"):
        read_battles(tmp_path / "bad.jsonl")
    (tmp_path / "battles.json").write_text(json.dumps([battle("x", "y", "tie"), {"model_a": "x", "winner": "tie"}]))
    with pytest.raises(DataError, match=r"battles.json: record 1, field 'model_b': missing or not text"):
        read_battles(tmp_path / "battles.json")


# ---------------------------------------------------------------------------------------------- command line

def test_cli_leaderboard_and_export(tmp_path, capsys):
    from sft_hf.cli import main

    store = VoteStore(tmp_path / "votes.sqlite")
    votes = simulate({"tuned": 1100, "base": 950, "other": 950}, 120, random.Random(5))
    for k, b in enumerate(votes):
        store.add(Vote(f"b{k}", b["model_a"], b["model_b"], b["winner"], "q", "a", "b"))
    store.add(Vote("tie-1", "base", "tuned", "tie", "q", "a", "b"))
    assert main(["arena", "--leaderboard", str(store.path), "--bootstrap_rounds", "100",
                 "--plot", str(tmp_path / "w.png")]) == 0
    out = capsys.readouterr().out
    board = compute_leaderboard(read_battles(store.path), 100, 0)
    assert out.splitlines()[0] == f"Arena leaderboard: 121 votes from {store.path} (1 ties, 0 both bad)"
    assert "400 points = 10:1 odds, mean 1000" in out and "100 bootstrap resamples (seed 0)" in out
    for rank, s in enumerate(board.standings, 1):
        row = f"{rank:>4}  {s.model:<5}  {s.rating:>6.0f}  {f'{s.lower:.0f} to {s.upper:.0f}':>13}  {s.votes:>5}  " \
              f"{s.wins:>4}  {s.losses:>6}  {s.ties:>4}  {s.bothbad:>8}"
        assert row in out.splitlines(), (row, out)
    assert board.standings[0].model == "tuned"
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["arena", "--votes", str(store.path), "--export", str(tmp_path / "v.jsonl")]) == 0
    assert f"Exported 121 votes from {store.path}" in capsys.readouterr().out
    assert main(["arena", "--leaderboard", str(tmp_path / "v.jsonl"), "--bootstrap_rounds", "100"]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == out.splitlines()[2:-1]  # the same table from the export

    assert main(["arena", "--leaderboard", str(tmp_path / "none.sqlite")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'none.sqlite'}: no such votes file (written by `sft-hf arena --votes "
        f"{tmp_path / 'none.sqlite'}`)"]
    assert main(["arena", "--votes", str(tmp_path / "v.sqlite")]) == 2
    assert "nothing to compare" in capsys.readouterr().err


def test_cli_leaderboard_imports_neither_gradio_nor_torch(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    store.add(make_vote("b1"))
    code = ("import sys; from sft_hf.cli import main; "
            "code = main(['arena', '--leaderboard', sys.argv[1], '--bootstrap_rounds', '5']); "
            "assert not {'gradio', 'torch'} & set(sys.modules), 'gradio or torch imported'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, str(store.path)], capture_output=True, text=True,
                          cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Arena leaderboard: 1 votes" in done.stdout and "won every vote: x" in done.stdout


def test_login_comes_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    from sft_hf.evaluation.arena.cli import parse_args, read_auth

    defaults = parse_args(["--responses", "a=x.json", "b=y.json"])
    assert (defaults.host, defaults.share, read_auth(defaults)) == ("127.0.0.1", False, None)
    monkeypatch.setenv("ARENA_LOGIN", "alice:s3cret:with:colons")
    assert read_auth(parse_args(["--auth_env", "ARENA_LOGIN"])) == [("alice", "s3cret:with:colons")]
    logins = tmp_path / "logins"
    logins.write_text("# voters\nalice:one\nbob:two\n")
    logins.chmod(0o644)
    assert read_auth(parse_args(["--auth_file", str(logins)])) == [("alice", "one"), ("bob", "two")]
    assert "readable by other users" in capsys.readouterr().err
    logins.write_text("alice\n")
    with pytest.raises(RecipeError, match="line 1: expected user:password"):
        read_auth(parse_args(["--auth_file", str(logins)]))
    with pytest.raises(RecipeError, match="not set"):
        read_auth(parse_args(["--auth_env", "NO_SUCH_VARIABLE_HERE"]))


# ---------------------------------------------------------------------------------------------- response files

def test_join_by_instruction_and_input_and_named_columns(tmp_path):
    specs = write_response_files(tmp_path, ("first", "second"), n=5)  # the second file in reverse order
    prompts = load_response_columns([ResponseColumn.parse(s) for s in specs])
    assert len(prompts) == 5
    for p in prompts:
        i = p.instruction.split()[2]
        assert p.responses == {"first": f"First system's answer to prompt {i}.",
                               "second": f"Second system's answer to prompt {i}."}
    columns = [ResponseColumn.parse(f"{EVAL_EXAMPLE_DATA}:model 1 response"),
               ResponseColumn.parse(f"m2={EVAL_EXAMPLE_DATA}:model 2 response")]
    assert [c.name for c in columns] == ["model 1 response", "m2"]
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "test_responses.json").write_text("[]")
    assert ResponseColumn.parse(str(tmp_path / "tuned" / "test_responses.json")).name == "tuned"  # evaluate.py's
    chapter7 = load_response_columns(columns)
    records = json.loads(EVAL_EXAMPLE_DATA.read_text())
    assert len(chapter7) == len(records) == 100
    assert chapter7[0].responses == {"model 1 response": records[0]["model 1 response"],
                                     "m2": records[0]["model 2 response"]}


def test_unmatched_records_are_named(tmp_path):
    a, b = write_response_files(tmp_path, ("base", "tuned"), n=5)
    path = tmp_path / "responses_1.json"
    records = json.loads(path.read_text())
    records[1]["input"] = "The dog chased mouse 3."  # record 1 of tuned's file: a prompt base never saw
    path.write_text(json.dumps(records))
    with pytest.raises(DataError) as error:
        load_response_columns([ResponseColumn.parse(a), ResponseColumn.parse(b)])
    message = str(error.value)
    assert "1 record(s) of base=" in message and "record 3 ('Rewrite sentence 3 in the passive " \
        "voice.', input 'The cat chased mouse 3.')" in message
    assert "1 record(s) of tuned=" in message and "record 1 ('Rewrite sentence 3 in the passive " \
        "voice.', input 'The dog chased mouse 3.')" in message
    assert "\n" not in message
    records[1]["model_response"] = 7
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"responses_1.json: record 1, field 'model_response': missing or not text"):
        load_response_columns([ResponseColumn.parse(a), ResponseColumn.parse(b)])
    with pytest.raises(RecipeError, match="no such file"):
        ResponseColumn.parse(f"x={tmp_path}/nope.json:model_response")
    with pytest.raises(RecipeError, match="given twice"):
        load_response_columns([ResponseColumn.parse(a), ResponseColumn.parse(a)])


def test_deck_covers_every_prompt_and_pair_with_random_sides(tmp_path):
    columns = [ResponseColumn.parse(s) for s in write_response_files(tmp_path, ("p", "q"), n=6)]
    prompts = load_response_columns(columns)
    prompts = [type(p)(p.instruction, p.input, {**p.responses, "r": "third"}) for p in prompts]
    deck = BattleDeck(prompts, ["p", "q", "r"], random.Random(0))
    battles = [deck.draw() for _ in range(18)]  # 6 prompts × 3 pairs: one full pass
    assert len({(b.instruction, frozenset((b.model_a, b.model_b))) for b in battles}) == 18
    assert len({b.battle_id for b in battles}) == 18
    assert all(b.response_a == next(p for p in prompts if p.instruction == b.instruction).responses[b.model_a]
               for b in battles)
    lefts = [b.model_a for b in battles + [deck.draw() for _ in range(180)]]
    assert all(40 <= lefts.count(m) <= 92 for m in "pqr"), [lefts.count(m) for m in "pqr"]  # 66 expected
    again = BattleDeck(prompts, ["p", "q", "r"], random.Random(0))
    assert [(b.instruction, b.model_a, b.model_b) for b in battles] == \
        [(b.instruction, b.model_a, b.model_b) for b in (again.draw() for _ in range(18))]


# ---------------------------------------------------------------------------------------------- the page's handlers

def handler(demo, name):
    """The function an event of the page runs, by its name (as the browser would trigger it)."""
    return next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


def visible(fn, outputs) -> str:
    """What the browser receives from an event: every output but the server-side gr.State."""
    import gradio as gr

    return repr([value for block, value in zip(fn.outputs, outputs) if not isinstance(block, gr.State)])


def test_live_battle_with_openai_servers_through_the_page(tmp_path):
    pytest.importorskip("gradio")
    from sft_hf.evaluation.arena.app import Arena, build_app
    from sft_hf.evaluation.arena.battles import ServerModel

    with FakeJudgeServer(lambda prompt: f"Answer one: {prompt[::-1]}") as one, \
            FakeJudgeServer(lambda prompt: f"Answer two: {prompt.upper()}") as two:
        models = [ServerModel.parse(f"falcon-x1=model-one@{one.url}/v1", max_tokens=32),
                  ServerModel.parse(f"osprey-y2=model-two@{two.url}/v1", max_tokens=32)]
        arena = Arena(VoteStore(tmp_path / "votes.sqlite"), live_models=models, live_rng=random.Random(0),
                      bootstrap_rounds=20)
        demo = build_app(arena)
        assert all(d["api_visibility"] == "private" for d in demo.config["dependencies"])
        assert demo.get_api_info()["named_endpoints"] == {}
        ask = handler(demo, "ask_both")
        sides = set()
        for k in range(6):
            outputs = ask.fn(f"Name {k} colours")
            state, seen = outputs[0], visible(ask, outputs)
            assert "falcon-x1" not in seen and "osprey-y2" not in seen and "model-one" not in seen
            assert f"Name {k} colours" in seen
            expected = {"falcon-x1": f"Answer one: {f'Name {k} colours'[::-1]}",
                        "osprey-y2": f"Answer two: NAME {k} COLOURS"}
            assert (state.response_a, state.response_b) == (expected[state.model_a], expected[state.model_b])
            assert outputs[2:4] == [state.response_a, state.response_b]  # Model A's box holds model_a's answer
            sides.add(state.model_a)
            vote = handler(demo, "vote")  # the first vote button: A is better
            revealed = vote.fn(state, SimpleNamespace(username="carol"))[0]
            assert f"Model A: `{state.model_a}` · Model B: `{state.model_b}`" in revealed
        assert sides == {"falcon-x1", "osprey-y2"}  # both sides drawn
        assert one.requests[0]["payload"]["max_tokens"] == 32 and one.requests[0]["payload"]["temperature"] == 0
        stored = arena.store.votes()
        assert len(stored) == 6 and {v.source for v in stored} == {"live"} and {v.voter for v in stored} == {"carol"}
        assert all(v.winner == "model_a" for v in stored)
        board_text, png = handler(demo, "leaderboard").fn()
        assert "| 1 | `" in board_text and png.size[0] > 200  # the win-rate plot, a PIL image

    with FakeJudgeServer(lambda prompt: "fine", fail=lambda prompt, attempt: 500) as broken, \
            FakeJudgeServer(lambda prompt: "fine") as working:
        arena.live_models = [ServerModel.parse(f"falcon-x1=m@{broken.url}/v1"),
                             ServerModel.parse(f"osprey-y2=m@{working.url}/v1")]
        with pytest.warns(UserWarning) as warned:  # gr.Warning outside a page: a Python warning
            outputs = handler(demo, "ask_both").fn("Hello")
        message = str(warned[0].message)
        assert "1 of the two models failed" in message and "falcon" not in message and broken.url not in message
        assert all(o == {"__type__": "update"} for o in outputs)  # gr.skip(): the page keeps what it shows
    assert arena.store.count() == 6


def test_live_battle_with_local_models(tmp_path, tiny_model_dir, chatty_model_dir):
    pytest.importorskip("gradio")
    from sft_hf.evaluation.arena.app import Arena, build_app
    from sft_hf.evaluation.arena.battles import LocalModel
    from sft_hf.evaluation.generation import generate_responses
    from sft_hf.templates import get_template

    folders = {"lark": tiny_model_dir, "wren": chatty_model_dir}  # two tiny Llamas that answer differently
    models = [LocalModel(name, folder, max_new_tokens=6).load() for name, folder in folders.items()]
    arena = Arena(VoteStore(tmp_path / "votes.sqlite"), live_models=models, live_rng=random.Random(1))
    demo = build_app(arena)
    ask = handler(demo, "ask_both")
    prompt = "What is the largest number? 3 9 4"
    outputs = ask.fn(prompt)
    state = outputs[0]
    own = {m.name: generate_responses(m.model, m.tokenizer, [{"instruction": prompt, "input": ""}],
                                      get_template("alpaca"), 6, show_progress=False)[0] for m in models}
    assert (state.response_a, state.response_b) == (own[state.model_a], own[state.model_b])
    assert own["lark"] != own["wren"]  # two different models, or the sides could not be checked
    assert "lark" not in visible(ask, outputs) and "wren" not in visible(ask, outputs)
    with pytest.warns(UserWarning, match="Type an instruction"):
        ask.fn("   ")


# ---------------------------------------------------------------------------------------------- hardening: the file

def votes_with(path, n=5):
    store = VoteStore(path)
    for k in range(n):
        store.add(make_vote(f"b{k}", WINNERS[k % 4]))
    return store


def snapshot(path):
    """Everything that would show a file was touched: its bytes, its mtime, and the files next to it."""
    return path.read_bytes(), path.stat().st_mtime_ns, sorted(p.name for p in path.parent.iterdir())


def test_output_paths_that_would_destroy_an_input_are_refused(tmp_path, capsys):
    """--plot or --export onto the votes file (or any existing SQLite file, or the file being read) is one line,
    exit 2, and the file keeps every byte."""
    from sft_hf.cli import main

    votes, other = votes_with(tmp_path / "b.sqlite").path, votes_with(tmp_path / "other.sqlite").path
    export = tmp_path / "v.jsonl"
    assert main(["arena", "--votes", str(votes), "--export", str(export)]) == 0
    capsys.readouterr()
    before = {p: snapshot(p) for p in (votes, other, export)}
    for argv, flag, why in [
            (["--leaderboard", str(votes), "--plot", str(votes)], "--plot", "the file this command reads"),
            (["--votes", str(votes), "--export", str(votes)], "--export", "the file this command reads"),
            (["--leaderboard", str(votes), "--plot", str(other)], "--plot", "an existing SQLite database"),
            (["--votes", str(votes), "--export", str(other)], "--export", "an existing SQLite database"),
            (["--leaderboard", str(export), "--plot", str(export)], "--plot", "the file this command reads"),
            (["--leaderboard", str(votes), "--plot", str(tmp_path / "." / "b.sqlite")], "--plot", "reads")]:
        assert main(["arena", *argv, "--bootstrap_rounds", "5"]) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured
        assert captured.err.startswith(f"error: {flag} ") and why in captured.err, captured.err
    assert {p: snapshot(p) for p in (votes, other, export)} == before
    assert len(VoteStore(votes).votes()) == 5


def corrupt_an_overflow_page(path):
    """Points one overflow page of the file at a page that does not exist (what a bad disk sector does)."""
    page = 4096
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    start = next(p * page for p in range(1, len(data) // page) if data[p * page + 4:p * page + 40] == b"a" * 36)
    data[start:start + 4] = (999_999).to_bytes(4, "big")
    path.write_bytes(data)


def test_votes_file_is_checked_before_the_arena_starts(tmp_path, capsys, monkeypatch):
    """A file the arena cannot write, a damaged one, another program's database, a file that is not SQLite: the
    server never starts (one line, exit 2), and another program's database is not touched at all."""
    pytest.importorskip("gradio")
    from sft_hf.cli import main
    from sft_hf.evaluation.arena import app as app_module

    def no_serving(*args):
        raise AssertionError("the arena started serving")

    monkeypatch.setattr(app_module, "serve", no_serving)
    specs = write_response_files(tmp_path, ("base", "tuned"))

    def start(votes):
        code = main(["arena", "--responses", *specs, "--votes", str(votes)])
        captured = capsys.readouterr()
        assert "Votes:" not in captured.out, captured.out  # never got as far as serving
        return code, captured.err.strip()

    foreign = tmp_path / "app.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (name TEXT, email TEXT)")
        conn.execute("INSERT INTO users VALUES ('ann', 'ann@example.com')")
    conn.close()
    clash = tmp_path / "clash.sqlite"  # another program's table that happens to be called votes
    with sqlite3.connect(clash) as conn:
        conn.execute("CREATE TABLE votes (id INTEGER PRIMARY KEY, poll TEXT, choice TEXT)")
    conn.close()
    for path, message in [(foreign, "another program's database (tables: users)"),
                          (clash, "another program's database (tables: votes)")]:
        before = snapshot(path)
        code, err = start(path)
        assert code == 2 and err.count("\n") == 0 and message in err and "left untouched" in err, err
        assert snapshot(path) == before  # not a byte, not its mtime, no journal or WAL file next to it
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        conn.close()

    damaged = tmp_path / "damaged.sqlite"
    store = VoteStore(damaged)
    for k in range(4):
        store.add(Vote(f"b{k}", "x", "y", "model_a", "q", "a" * 9000, "b" * 9000))
    corrupt_an_overflow_page(damaged)
    code, err = start(damaged)
    assert code == 2 and err.count("\n") == 0 and "damaged database (PRAGMA quick_check: " in err, err
    assert "invalid page number 999999" in err and ".recover" in err

    text = tmp_path / "notes.sqlite"
    text.write_text("not a database")
    assert start(text) == (2, f"error: {text}: not a votes database (not an SQLite file at all)")

    locked = votes_with(tmp_path / "locked.sqlite").path
    with read_only(locked):
        code, err = start(locked)
    assert code == 2 and "cannot write" in err and str(locked) in err, err

    empty = tmp_path / "empty.sqlite"  # an empty file, and an SQLite file without tables: both become votes files
    empty.touch()
    sqlite3.connect(tmp_path / "blank.sqlite").close()
    for path in (empty, tmp_path / "blank.sqlite"):
        store = VoteStore(path)
        assert store.add(make_vote("b1")) == (True, "model_a") and store.count() == 1


def test_a_version_1_votes_file_is_upgraded_in_place(tmp_path, capsys):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the schema sft-hf wrote before the per-voter limits
        conn.executescript("""CREATE TABLE votes (battle_id TEXT PRIMARY KEY, model_a TEXT NOT NULL, model_b TEXT NOT
            NULL, winner TEXT NOT NULL, instruction TEXT NOT NULL, input TEXT NOT NULL DEFAULT '', response_a TEXT NOT
            NULL, response_b TEXT NOT NULL, source TEXT NOT NULL, voter TEXT, tstamp REAL NOT NULL);
            PRAGMA user_version = 1;""")
        conn.execute("INSERT INTO votes VALUES ('o1', 'x', 'y', 'tie', 'Sort 3 1 2', '', 'a', 'b', 'files', 'ann', 5)")
    conn.close()
    assert [v.winner for v in read_battles_votes(path)] == ["tie"]  # read as it is, not upgraded by reading
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()
    from sft_hf.evaluation.arena.votes import AlreadyVoted

    store = VoteStore(path)
    assert "upgraded from schema version 1 to 2" in capsys.readouterr().out
    assert [(v.battle_id, v.voter) for v in store.votes()] == [("o1", "ann")]
    with pytest.raises(AlreadyVoted):  # ann's old vote counts for the per-voter limit
        store.add(Vote("n1", "y", "x", "model_a", "Sort 3 1 2", "b", "a", voter="ann"))


def read_battles_votes(path):
    from sft_hf.evaluation.arena.votes import open_votes

    return open_votes(path).votes()


# ---------------------------------------------------------------------------------------------- hardening: voters

def request(login=None, session="tab-1", address="127.0.0.1"):
    """What gr.Request gives a handler: the login, the browser tab's session hash, the client's address."""
    return SimpleNamespace(username=login, session_hash=session, client=SimpleNamespace(host=address))


def deck_arena(tmp_path, n=4, models=("base", "tuned"), **kwargs):
    from sft_hf.evaluation.arena.app import Arena

    columns = [ResponseColumn.parse(s) for s in write_response_files(tmp_path, models, n=n)]
    deck = BattleDeck(load_response_columns(columns), list(models), random.Random(0))
    return Arena(VoteStore(tmp_path / "votes.sqlite"), deck=deck, bootstrap_rounds=20, **kwargs)


def test_one_vote_per_voter_per_prompt_and_pair(tmp_path):
    pytest.importorskip("gradio")
    from sft_hf.evaluation.arena.app import voter_of

    arena = deck_arena(tmp_path, n=2)
    ann = voter_of(request("ann"))
    first = arena.new_battle(ann)
    text, votable = arena.vote(first, "model_a", ann)
    assert "Your vote: **A is better**" in text and not votable
    again = arena.deck.draw()  # the same prompt and pair, drawn again (e.g. a second tab)
    while again.matchup != first.matchup:
        again = arena.deck.draw()
    again.served_to = ann.identity
    text, votable = arena.vote(again, "model_b", ann)
    assert "**Not counted:** you already voted on this instruction and these two models" in text
    bob = voter_of(request("bob", session="tab-2"))
    again.served_to = bob.identity
    assert "Your vote" in arena.vote(again, "model_b", bob)[0]  # another voter: counted
    assert [(v.voter, v.winner) for v in arena.store.votes()] == [("ann", "model_a"), ("bob", "model_b")]
    # the deck serves ann only what she has not voted on, then says she is done
    second = arena.new_battle(ann)
    assert second.matchup != first.matchup
    arena.vote(second, "tie", ann)
    assert arena.new_battle(ann) is None
    assert arena.refused == {"matchup": 1}
    # an anonymous tab is a voter of its own: the same rule, by its session
    tab = voter_of(request(None, session="tab-9"))
    battle = arena.new_battle(tab)
    assert "Your vote" in arena.vote(battle, "model_a", tab)[0]
    battle2 = arena.deck.draw()
    while battle2.matchup != battle.matchup:
        battle2 = arena.deck.draw()
    battle2.served_to = tab.identity
    assert "Not counted" in arena.vote(battle2, "model_a", tab)[0]
    assert arena.store.votes()[-1].session == tab.session and tab.session != "tab-9"  # a hash, not the secret


def test_anonymous_sessions_are_rate_limited(tmp_path):
    pytest.importorskip("gradio")
    from sft_hf.evaluation.arena.app import voter_of
    from sft_hf.evaluation.arena.guards import RateLimiter

    arena = deck_arena(tmp_path, n=20, anonymous_votes_per_minute=3)
    now = [1000.0]
    arena.limiter = RateLimiter(3, clock=lambda: now[0])

    def vote_as(voter, winner="model_a"):
        return arena.vote(arena.new_battle(voter), winner, voter)

    tab = voter_of(request(None, session="a", address="203.0.113.7"))
    for _ in range(3):
        assert "Your vote" in vote_as(tab)[0]
        now[0] += 1
    text, votable = vote_as(tab)  # the first of the three, 3 s ago, frees a slot in 57 s
    assert "**Not counted yet:** anonymous voters can vote 3 times a minute" in text and "in 57 s" in text
    assert votable  # the battle stays on the page: vote again later
    other_tab = voter_of(request(None, session="b", address="203.0.113.7"))  # a new tab from the same address
    assert "Not counted yet" in vote_as(other_tab)[0]
    logged_in = voter_of(request("ann", session="c", address="203.0.113.7"))
    for _ in range(5):  # a login is a voter the operator knows: no rate limit (one vote per matchup still)
        assert "Your vote" in vote_as(logged_in)[0]
    local = voter_of(request(None, session="d", address="127.0.0.1"))  # loopback tabs: each its own session limit
    assert "Your vote" in vote_as(local)[0]
    now[0] += 60
    assert "Your vote" in vote_as(tab)[0]
    assert arena.store.count() == 3 + 5 + 1 + 1 and arena.refused == {"rate": 2}
    text, _ = arena.leaderboard()
    assert "Limits: one vote per voter on each instruction and pair of models; anonymous voters at most 3 votes " \
           "a minute (per browser session; the sessions of one remote address share one budget)" in text
    assert "Votes refused since the server started: 2 over the anonymous rate limit." in text
    assert "10 votes from 3 voters (2 anonymous sessions); most from one voter: 5 (50%)" in text, text


def test_a_battle_counts_only_for_the_voter_it_was_shown_to(tmp_path):
    """Gradio keeps a tab's state under its session hash; whoever sends that hash reaches the battle. A vote on it
    from another login is refused."""
    pytest.importorskip("gradio")
    from sft_hf.evaluation.arena.app import voter_of

    arena = deck_arena(tmp_path)
    ann, bob = voter_of(request("ann", session="s1")), voter_of(request("bob", session="s1"))
    battle = arena.new_battle(ann)
    text, votable = arena.vote(battle, "model_b", bob)
    assert text.startswith("**Not counted:** this battle was shown to another voter") and not votable
    assert battle.model_a not in text and battle.model_b not in text  # and no reveal
    assert arena.store.count() == 0
    assert "Your vote: **B is better**" in arena.vote(battle, "model_b", ann)[0]
    assert [v.voter for v in arena.store.votes()] == ["ann"] and arena.refused == {"other_voter": 1}


def test_battle_sides_come_from_the_systems_randomness_unless_seeded():
    from sft_hf.evaluation.arena.battles import battle_rngs

    assert all(isinstance(rng, random.SystemRandom) for rng in battle_rngs(None))
    seeded = battle_rngs(3)
    assert not any(isinstance(rng, random.SystemRandom) for rng in seeded)
    assert [rng.random() for rng in seeded] == [random.Random(3).random(), random.Random(4).random()]
    pytest.importorskip("gradio")
    from sft_hf.evaluation.arena.app import Arena

    assert isinstance(Arena(None).live_rng, random.SystemRandom)


def test_a_vote_that_cannot_be_written_stops_the_page_in_words(tmp_path, caplog):
    pytest.importorskip("gradio")
    from sft_hf.evaluation.arena.app import build_app, voter_of

    arena = deck_arena(tmp_path)
    ann = voter_of(request("ann"))
    assert "Your vote" in arena.vote(arena.new_battle(ann), "model_a", ann)[0]
    battle = arena.new_battle(ann)
    with read_only(arena.store.path):
        text, votable = arena.vote(battle, "model_b", ann)
    assert text.startswith("**Your vote could not be saved, and this arena has stopped taking votes:**") and \
        "tell the person running the arena" in text and not votable
    assert "cannot be written (attempt to write a readonly database)" in caplog.text
    # from now on no vote is taken, even once the file could be written again: the operator restarts
    text, votable = arena.vote(arena.new_battle(ann), "tie", ann)
    assert "stopped taking votes" in text and not votable
    demo = build_app(arena)
    outputs = handler(demo, "start").fn(request("ann"))
    assert "stopped taking votes" in outputs[4] and all(o.interactive is False for o in outputs[5:])
    assert arena.store.count() == 1 and arena.refused == {"unwritten": 1}


def test_leaderboard_is_computed_once_per_vote_count(tmp_path, monkeypatch):
    """Ten refreshes at once: one computation, the other nine wait for it and get its result; a new vote, one more
    computation. (Chatbot Arena's 1000 bootstrap refits were 12 s a refresh; a script could queue them.)"""
    pytest.importorskip("gradio")
    import time

    from sft_hf.evaluation.arena import app as app_module
    from sft_hf.evaluation.arena.app import build_app

    arena = deck_arena(tmp_path)
    for k in range(6):
        arena.store.add(make_vote(f"v{k}", WINNERS[k % 3], "base", "tuned"))
    calls = []
    compute = app_module.compute_leaderboard

    def counted(*args, **kwargs):
        calls.append(args[0])
        time.sleep(0.3)  # long enough for the other refreshes to arrive while it runs
        return compute(*args, **kwargs)

    monkeypatch.setattr(app_module, "compute_leaderboard", counted)
    results = []
    threads = [threading.Thread(target=lambda: results.append(arena.leaderboard())) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 10 and len({text for text, _ in results}) == 1
    assert "6 votes" in results[0][0]
    arena.leaderboard()
    assert len(calls) == 1
    arena.store.add(make_vote("v-new", "model_a", "base", "tuned"))
    assert "7 votes" in arena.leaderboard()[0] and len(calls) == 2
    # on the page: the tab and the button share one slot, and a pending refresh ignores more clicks
    demo = build_app(arena)
    events = [f for f in demo.fns.values() if f.concurrency_id == "leaderboard"]
    assert len(events) == 2 and all(f.concurrency_limit == 1 and f.trigger_mode == "once" for f in events)


def test_live_prompts_longer_than_max_prompt_chars_are_refused_before_any_model(tmp_path):
    pytest.importorskip("gradio")
    from sft_hf.evaluation.arena.app import Arena, build_app
    from sft_hf.evaluation.arena.battles import ServerModel

    with FakeJudgeServer(lambda prompt: "one") as one, FakeJudgeServer(lambda prompt: "two") as two:
        models = [ServerModel.parse(f"m1=a@{one.url}/v1"), ServerModel.parse(f"m2=b@{two.url}/v1")]
        arena = Arena(VoteStore(tmp_path / "votes.sqlite"), live_models=models, max_prompt_chars=100)
        demo = build_app(arena)
        with pytest.warns(UserWarning, match="Your instruction has 10,000,000 characters; this arena takes at most "
                                             "100"):
            outputs = handler(demo, "ask_both").fn("x" * 10_000_000, request("ann"))
        assert all(o == {"__type__": "update"} for o in outputs)
        assert one.requests == [] and two.requests == []
        outputs = handler(demo, "ask_both").fn("y" * 100, request("ann"))
        assert outputs[0].instruction == "y" * 100 and outputs[0].served_to == "login:ann"
        arena.ask_limiter.limit = 2  # anonymous questions are rate-limited too: the models' time is shared
        tab = request(None, session="t1", address="198.51.100.4")
        for k in range(2):
            assert handler(demo, "ask_both").fn(f"Question {k}", tab)[0].instruction == f"Question {k}"
        with pytest.warns(UserWarning, match="Anonymous voters can ask 2 questions a minute; ask again in"):
            handler(demo, "ask_both").fn("Question 3", tab)
        assert len(one.requests) == len(two.requests) == 3
    question = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "arena-question")
    assert question.max_length == 100  # the page stops typing there too
    assert arena.store.count() == 0


def test_anonymous_voting_only_on_loopback_unless_allowed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gradio")
    from sft_hf.cli import main
    from sft_hf.evaluation.arena import app as app_module

    served = []
    monkeypatch.setattr(app_module, "serve", lambda arena, host, port, share, auth: served.append((host, auth)))
    specs = write_response_files(tmp_path, ("base", "tuned"))
    votes = str(tmp_path / "votes.sqlite")
    for where in (["--host", "0.0.0.0"], ["--share"]):
        assert main(["arena", "--responses", *specs, "--votes", votes, *where]) == 2
        err = capsys.readouterr().err
        assert "without a login: anyone who reaches it could vote" in err and "--allow_anonymous" in err, err
    assert served == [] and not (tmp_path / "votes.sqlite").exists()
    assert main(["arena", "--responses", *specs, "--votes", votes, "--host", "0.0.0.0", "--allow_anonymous"]) == 0
    assert "anonymous votes from anyone who reaches 0.0.0.0" in capsys.readouterr().err
    monkeypatch.setenv("ARENA_LOGIN", "ann:pw")
    assert main(["arena", "--responses", *specs, "--votes", votes, "--host", "0.0.0.0", "--auth_env",
                 "ARENA_LOGIN"]) == 0
    assert main(["arena", "--responses", *specs, "--votes", votes]) == 0  # loopback, anonymous: fine
    assert served == [("0.0.0.0", None), ("0.0.0.0", [("ann", "pw")]), ("127.0.0.1", None)]


def test_login_guard_locks_a_user_name_after_wrong_passwords():
    from sft_hf.evaluation.arena.guards import LoginGuard, LoginLocked

    now = [0.0]
    guard = LoginGuard([("ann", "right"), ("bob", "other")], clock=lambda: now[0])
    assert [guard.check("ann", "wrong") for _ in range(3)] == [False, False, False]  # three typos: free
    with pytest.raises(LoginLocked):  # then locked for 1 s, even for the right password
        guard.check("ann", "right")
    assert guard.check("bob", "other") is True  # other names are not affected
    now[0] += 1
    assert guard.check("ann", "wrong") is False
    now[0] += 1.5  # locked 2 s now: still locked
    with pytest.raises(LoginLocked):
        guard.check("ann", "right")
    now[0] += 0.5
    assert guard.check("ann", "right") is True and guard.failures == {}
    assert guard.check("nobody", "") is False and guard.check("ann", "righ") is False


# ---------------------------------------------------------------------------------------------- hardening: the server

@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    pytest.importorskip("gradio")
    folder = tmp_path_factory.mktemp("arena-http")
    specs = write_response_files(folder, ("falcon-x1", "osprey-y2"))
    server = ArenaServer(["--responses", *specs, "--votes", str(folder / "votes.sqlite"), "--auth_env",
                          "ARENA_LOGIN"], folder / "server.log", env={"ARENA_LOGIN": "ann:correct-horse"})
    yield server
    server.stop()


def test_handlers_and_uploads_are_unreachable_over_plain_http(live_server):
    """A script with a valid login, posting to the routes Gradio answers for any handler (private ones included)
    and to the upload route: 404 every time, no handler runs. The page itself still works (the browser test)."""
    import http.cookiejar

    url = live_server.url
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login = urllib.parse.urlencode({"username": "ann", "password": "correct-horse"}).encode()
    assert opener.open(urllib.request.Request(url + "login", data=login)).status == 200  # logged in: a cookie
    config = json.loads(opener.open(url + "config").read())
    fns = {d["api_name"]: d["id"] for d in config["dependencies"]}
    assert {"start", "vote", "leaderboard"} <= set(fns)

    def post(path, body, content_type="application/json"):
        request = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": content_type})
        try:
            with opener.open(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    calls = []
    for name in ("start", "vote", "leaderboard"):
        body = json.dumps({"data": [None], "fn_index": fns[name], "session_hash": "script"}).encode()
        for path in (f"gradio_api/run/{name}", f"gradio_api/api/{name}", f"gradio_api/call/{name}",
                     f"gradio_api/call/v2/{name}"):
            calls.append((path, *post(path, body)))
    upload = b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\n' + b"a" * 100_000 + \
        b"\r\n--x--\r\n"
    calls.append(("gradio_api/upload", *post("gradio_api/upload", upload, "multipart/form-data; boundary=x")))
    for path, status, body in calls:
        assert status == 404 and "answers its own page only" in body, (path, status, body[:300])
        assert "falcon-x1" not in body and "osprey-y2" not in body
    output = live_server.output()
    assert "vote " not in output and "Traceback" not in output


def test_wrong_passwords_in_a_burst_are_throttled(live_server):
    """30 wrong passwords as fast as a script sends them: 3 are checked, the rest refused unchecked (429), and for
    a while even the right one; never is a wrong password let in."""
    from concurrent.futures import ThreadPoolExecutor

    url = live_server.url + "login"

    def attempt(password):
        data = urllib.parse.urlencode({"username": "ann", "password": password}).encode()
        return http("POST", url, data, {"Content-Type": "application/x-www-form-urlencoded"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(attempt, [f"guess-{k}" for k in range(30)]))
    statuses = collections.Counter(status for status, _ in answers)
    assert statuses[200] == 0 and statuses[400] == 3 and statuses[429] == 27, statuses
    assert "Incorrect credentials" in next(body for status, body in answers if status == 400)
    assert "Too many wrong passwords for this user name: try again in" in \
        next(body for status, body in answers if status == 429)
    status, body = attempt("correct-horse")
    assert status == 429  # locked: the right password waits too
    assert live_server.output().count("login: wrong password for 'ann'") == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_ends_the_server_as_ctrl_c_does(tmp_path, signum):
    """While it serves, and while it is still starting (the signal right after the votes file is opened): the same
    end, exit 0 and the summary, for SIGTERM as for Ctrl-C."""
    pytest.importorskip("gradio")
    import time

    specs = write_response_files(tmp_path, ("base", "tuned"))
    votes = tmp_path / "votes.sqlite"
    server = ArenaServer(["--responses", *specs, "--votes", str(votes)], tmp_path / "server.log")
    VoteStore(votes).add(make_vote("b1"))  # a vote cast while it runs
    code = server.end(signum)
    output = server.log_path.read_text()
    assert code == 0, output
    assert f"Stopped. 1 votes in {votes}; `sft-hf arena --leaderboard {votes}` prints the ratings" in output
    assert "Traceback" not in output

    log = tmp_path / "starting.log"
    with open(log, "w") as out:
        starting = subprocess.Popen([sys.executable, "-m", "sft_hf", "arena", "--responses", *specs, "--votes",
                                     str(votes), "--port", str(free_port())], stdout=out, stderr=subprocess.STDOUT,
                                    cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
        while "Votes:" not in log.read_text():
            assert starting.poll() is None, log.read_text()
            time.sleep(0.01)
        starting.send_signal(signum)
        code = starting.wait(60)
    output = log.read_text()
    assert code == 0 and f"Stopped. 1 votes in {votes}" in output and "Traceback" not in output, output


def test_docs_arena_command_lines_use_existing_flags(capsys):
    from test_docs import all_commands

    from sft_hf.evaluation.arena.cli import parse_args

    seen, failures = 0, []
    for where, command in all_commands():
        at = [i for i, token in enumerate(command[:-1]) if token == "sft-hf" and command[i + 1] == "arena"]
        if not at or "..." in command:
            continue
        seen += 1
        try:
            parse_args(command[at[0] + 2:])
        except RecipeError as e:  # an unknown flag or a bad value
            failures.append(f"{where}: {e}")
    assert seen >= 10, seen
    assert not failures, "\n".join(failures)
