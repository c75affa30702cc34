"""The arena in a real browser: Debian's chromium driven by Playwright against `sft-hf arena` in a subprocess.

Before the vote the model names are nowhere the browser can see: not in the page (HTML, text, field values) and
not in any byte it received (response bodies, websocket frames, open event streams). After the vote they are, the
vote is in SQLite once (a double click counts once), and the leaderboard tab shows the numbers
`sft-hf arena --leaderboard` prints. `ARENA_SCREENSHOT=path.png` also saves the page after the vote.
"""
import importlib.util
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest

from arena_helpers import CHROMIUM, ArenaServer, TrafficRecorder, launch_chromium, page_text, wait_for_battle, \
    wait_for_reveal, write_response_files

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None or importlib.util.find_spec("gradio") is None,
                       reason="playwright or gradio missing: pip install -e '.[test]'"),
]

NAMES = ("alpaca-7f3q", "vicuna-9k2w")  # in no response, label or page text
ROUNDS = "200"  # bootstrap resamples, for the page and the command line alike


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arena")
    specs = write_response_files(folder, NAMES)
    votes = folder / "votes.sqlite"
    server = ArenaServer(["--responses", *specs, "--votes", str(votes), "--seed", "0", "--bootstrap_rounds", ROUNDS],
                         folder / "server.log")
    yield server, votes
    server.stop()


def test_names_hidden_until_vote_then_stored_and_on_leaderboard(arena, tmp_path, capsys):
    from playwright.sync_api import sync_playwright

    from sft_hf.evaluation.arena.app import REPEATED_VOTE
    from sft_hf.evaluation.arena.cli import main as arena_main
    from sft_hf.evaluation.arena.votes import Vote, VoteStore

    server, votes = arena
    with sync_playwright() as playwright:
        context = launch_chromium(playwright, str(tmp_path / "profile"))
        page = context.new_page()
        traffic = TrafficRecorder(context, page)
        joins = []  # the event requests the page sends (Gradio's queue/join)
        page.on("request", lambda request: joins.append(request) if "/queue/join" in request.url else None)
        page.goto(server.url)
        left, right = wait_for_battle(page)

        # before the vote: the responses arrived (the recorder sees them), the names did not
        received, shown = traffic.received(), page_text(page)
        assert left in received and right in received and left in shown
        for name in NAMES:
            assert name not in shown, f"{name} is on the page before the vote"
            assert name not in received, f"{name} was sent to the browser before the vote"
        assert page.is_disabled("#vote-a") is False

        page.dblclick("#vote-a")  # a double click: one vote
        reveal = wait_for_reveal(page)
        left_model = NAMES[0] if left.startswith("First") else NAMES[1]
        right_model = NAMES[1] if left_model == NAMES[0] else NAMES[0]
        assert re.search(rf"Model A: {left_model}\s*·\s*Model B: {right_model}", reveal), reveal
        assert "A is better" in reveal
        assert all(name in traffic.received() for name in NAMES)
        assert page.is_disabled("#vote-a") and page.is_disabled("#vote-bothbad")
        if os.environ.get("ARENA_SCREENSHOT"):
            page.screenshot(path=os.environ["ARENA_SCREENSHOT"], full_page=True)

        # the vote's request sent again, as a flaky network or a replaying client would: still one vote
        vote_request = joins[-1]
        repeats = server.output().count(REPEATED_VOTE)  # the double click's second vote, if it reached the server
        replayed = page.request.post(vote_request.url, data=vote_request.post_data,
                                     headers={"Content-Type": "application/json"})
        assert replayed.ok and "event_id" in replayed.text()
        deadline = time.time() + 30  # the queue runs it: the server logs the repeat once it has been refused
        while server.output().count(REPEATED_VOTE) == repeats:
            assert time.time() < deadline, f"the replayed vote was never handled:\n{server.output()}"
            time.sleep(0.1)
        with sqlite3.connect(votes) as conn:
            rows = conn.execute("SELECT model_a, model_b, winner, response_a FROM votes").fetchall()
        assert rows == [(left_model, right_model, "model_a", left)]

        # more votes from another process while the server runs, so the ratings are determined
        store = VoteStore(votes)
        for k in range(12):
            winner = ["model_a", "model_b", "tie", "model_a"][k % 4]
            store.add(Vote(f"extra-{k}", NAMES[k % 2], NAMES[1 - k % 2], winner, "q", "ra", "rb"))

        page.reload()
        wait_for_battle(page)
        page.get_by_role("tab", name="Leaderboard").click()
        page.wait_for_function("() => document.querySelectorAll('#arena-leaderboard table tbody tr').length == 2",
                               timeout=30_000)
        table = page.evaluate("() => [...document.querySelectorAll('#arena-leaderboard table tbody tr')]"
                              ".map(r => [...r.querySelectorAll('td')].map(c => c.innerText.trim()))")
        page.wait_for_selector("#arena-winrates img", timeout=30_000)
        context.close()

    capsys.readouterr()
    assert arena_main(["--leaderboard", str(votes), "--bootstrap_rounds", ROUNDS]) == 0
    printed = capsys.readouterr().out
    assert "13 votes" in printed
    for rank, model, rating, interval, n, wins, losses, ties, bothbad in table:
        line = re.search(rf"^\s*{rank}\s+{re.escape(model)}\s+(\S+)\s+(\S+) to (\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)"
                         rf"\s+(\d+)$", printed, re.M)
        assert line, f"{model} not in:\n{printed}"
        assert [rating, interval, n, wins, losses, ties, bothbad] == \
            [line[1], f"{line[2]} to {line[3]}", *line.groups()[3:]]
    assert sum(int(row[4]) for row in table) == 2 * 13


def test_login_required_and_the_voter_recorded(tmp_path):
    """--auth_env: nothing but the login form without the password (not even the page's config), the password
    never on the server's command line, and each vote carries the voter's login name."""
    from playwright.sync_api import sync_playwright

    specs = write_response_files(tmp_path, NAMES, n=2)
    votes = tmp_path / "votes.sqlite"
    password = "correct-horse-battery"
    server = ArenaServer(["--responses", *specs, "--votes", str(votes), "--auth_env", "ARENA_LOGIN"],
                         tmp_path / "server.log", env={"ARENA_LOGIN": f"alice:{password}"})
    try:
        assert password not in Path(f"/proc/{server.process.pid}/cmdline").read_text()
        with sync_playwright() as playwright:
            context = launch_chromium(playwright, str(tmp_path / "profile"))
            page = context.new_page()
            config = page.request.get(server.url + "config")
            assert config.status == 401 and "Not authenticated" in config.text()
            page.goto(server.url)
            page.get_by_label("username").fill("alice")
            page.get_by_label("password").fill("wrong password")
            page.get_by_role("button", name="Login").click()
            page.get_by_text("Incorrect credentials").wait_for(timeout=15_000)
            assert page.locator("#arena-response-a").count() == 0
            page.get_by_label("username").fill("alice")  # the form clears it after a failed attempt
            page.get_by_label("password").fill(password)
            page.get_by_role("button", name="Login").click()
            wait_for_battle(page)
            page.click("#vote-tie")
            assert "Your vote: a tie" in wait_for_reveal(page)
            context.close()
        with sqlite3.connect(votes) as conn:
            assert conn.execute("SELECT winner, voter FROM votes").fetchall() == [("tie", "alice")]
    finally:
        server.stop()


def test_a_vote_that_cannot_be_written_is_told_and_stops_the_page(tmp_path):
    """The votes file turns read-only while the arena runs: the voter reads that the vote was not saved, the buttons
    go grey, and every page loaded afterwards says votes are stopped. Also: the page's only POSTs are its event queue
    (every other POST route is shut), and the leaderboard tab shows the style-controlled ratings beside the plain."""
    from playwright.sync_api import sync_playwright

    from arena_helpers import read_only
    from sft_hf.evaluation.arena.guards import PAGE_POSTS
    from sft_hf.evaluation.arena.votes import Vote, VoteStore

    specs = write_response_files(tmp_path, NAMES, n=3)
    votes = tmp_path / "votes.sqlite"
    server = ArenaServer(["--responses", *specs, "--votes", str(votes), "--style_control", "--bootstrap_rounds",
                          "50"], tmp_path / "server.log")
    try:
        with sync_playwright() as playwright:
            context = launch_chromium(playwright, str(tmp_path / "profile"))
            page = context.new_page()
            posts = []
            page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
            page.goto(server.url)
            wait_for_battle(page)
            page.click("#vote-a")
            assert "Your vote: A is better" in wait_for_reveal(page)

            store = VoteStore(votes)  # more votes, with answers of different lengths, for the style fit
            for k in range(16):
                store.add(Vote(f"extra-{k}", NAMES[k % 2], NAMES[1 - k % 2], ["model_a", "model_b"][k % 3 == 0],
                               "q", "long answer " * (1 + 5 * (k % 2)), "short"))
            page.get_by_role("tab", name="Leaderboard").click()
            page.wait_for_function("() => document.querySelectorAll('#arena-leaderboard table tbody tr').length == 2",
                                   timeout=30_000)
            header = page.inner_text("#arena-leaderboard table thead")
            assert "style-controlled" in header
            board = page.inner_text("#arena-leaderboard")
            assert "17 votes" in board and "Style coefficients" in board and "Limits: one vote per voter" in board

            page.get_by_role("tab", name="Vote").click()
            page.click("#arena-next")
            page.wait_for_function("() => document.querySelector('#arena-reveal')?.innerText.trim() === '' && "
                                   "!document.querySelector('#vote-b').disabled", timeout=30_000)
            with read_only(votes):
                page.click("#vote-b")
                page.wait_for_function("() => document.querySelector('#arena-reveal')?.innerText"
                                       ".includes('could not be saved')", timeout=30_000)
                text = page.inner_text("#arena-reveal")
                assert "this arena has stopped taking votes" in text and "tell the person running" in text
                assert all(page.is_disabled(f"#vote-{k}") for k in ("a", "b", "tie", "bothbad"))
                assert not any(name in text for name in NAMES)  # not counted, not revealed
            page.reload()
            page.wait_for_function("() => document.querySelector('#arena-reveal')?.innerText"
                                   ".includes('stopped taking votes')", timeout=30_000)
            assert page.is_disabled("#vote-a")
            context.close()
        assert "cannot be written (attempt to write a readonly database)" in server.output()
        assert posts and {re.sub(r"^https?://[^/]+", "", url).split("?")[0] for url in posts} <= set(PAGE_POSTS)
        with sqlite3.connect(votes) as conn:
            assert conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0] == 17
    finally:
        server.stop()
