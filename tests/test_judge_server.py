"""The judge against a real model server: llama.cpp (llama-cpp-python's server) with SmolLM2-135M-Instruct on
127.0.0.1, temperature 0. A 135 M judge is no good judge; these tests check the plumbing on a real server."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed: pip install -e '.[test]'")

from conftest import ROOT, SHARED_DATA  # noqa: E402
from llama_server import MODEL_ALIAS, CountingProxy, LlamaServer, serve  # noqa: E402

from sft_hf.evaluation.judge import (  # noqa: E402
    JudgeUnavailableError,
    OpenAIJudge,
    judge_responses,
    make_judge_prompt,
    parse_structured_score,
    summarize,
)

RESPONSES = SHARED_DATA / "instruction-data-with-response.json"
MAX_TOKENS = 16  # {"score": 85} is about 7 tokens; a judge that rambles is cut short


@pytest.fixture(scope="session")
def llama_server(request, tmp_path_factory):
    yield from serve(request, tmp_path_factory.mktemp("llama-server"))  # a failing test says if the server died


@pytest.fixture(scope="session")
def records():
    return json.loads(RESPONSES.read_text())[:12]


def make_judge(url, **kwargs):
    return OpenAIJudge(model=MODEL_ALIAS, url=url, max_tokens=MAX_TOKENS, **kwargs)


@pytest.fixture(scope="session")
def structured_run(llama_server, records):
    """The 12 items judged once, structured (auto), not streamed, one request at a time: the reference run."""
    return judge_responses(records, make_judge(llama_server.url), max_workers=1, show_progress=False)


def scores(results):
    return [r["score"] for r in results]


def test_structured_output_scores_every_item(structured_run):
    summary = summarize(structured_run)
    assert (summary["num_items"], summary["num_scores"], summary["score_paths"]) == (12, 12, {"json": 12})
    for result in structured_run:
        assert parse_structured_score(result["reply"]).score == result["score"]
        assert json.loads(result["reply"]) == {"score": result["score"]}


def test_streaming_gives_the_same_replies(llama_server, records, structured_run):
    streamed = judge_responses(records[:5], make_judge(llama_server.url, stream=True), max_workers=1,
                               show_progress=False)
    assert [r["reply"] for r in streamed] == [r["reply"] for r in structured_run[:5]]


def test_concurrency_4_gives_the_same_scores_as_1(llama_server, records, structured_run):
    parallel = judge_responses(records, make_judge(llama_server.url), max_workers=4, show_progress=False)
    assert scores(parallel) == scores(structured_run)


def test_retries_then_the_cache_answers_everything(llama_server, records, structured_run, tmp_path):
    cache = tmp_path / "cache.jsonl"
    first_attempt_fails = lambda prompt, attempt: 503 if attempt == 1 else None  # noqa: E731
    with CountingProxy(llama_server.url, fail=first_attempt_fails) as proxy:
        first = judge_responses(records[:4], make_judge(proxy.url), cache_path=cache, max_workers=2, retries=2,
                                backoff=0.01, show_progress=False)
        assert sorted(proxy.attempts.values()) == [2] * 4  # a 503, then the answer
        assert scores(first) == scores(structured_run[:4])
        asked = len(proxy.requests)
        again = judge_responses(records[:4], make_judge(proxy.url), cache_path=cache, show_progress=False)
        assert len(proxy.requests) == asked  # nothing asked twice
    assert again == first
    assert len(cache.read_text().splitlines()) == 4


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def cache_lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_sigint_mid_run_then_a_rerun_resumes_from_the_cache(llama_server, records, structured_run, tmp_path):
    """recipes/evaluate.py interrupted with SIGINT after 3 answers (the 4th request is held by the proxy, so the run is
    mid-way however fast the server is); run again, it asks only the items not cached."""
    out = tmp_path / "eval"
    cache = out / "judge_cache_model_response.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with CountingProxy(llama_server.url, hold_after=3) as proxy:
        command = [sys.executable, str(ROOT / "recipes" / "evaluate.py"), "--responses", str(RESPONSES),
                   "--max_samples", "10", "--metrics", "false", "--judge_backend", "openai", "--judge_url",
                   proxy.url, "--judge_model", MODEL_ALIAS, "--judge_max_tokens", str(MAX_TOKENS),
                   "--judge_concurrency", "1", "--output_dir", str(out)]
        # A shell without job control starts background jobs with SIGINT ignored, and children inherit that (Python
        # then never raises KeyboardInterrupt): give the run the terminal's default, as a user pressing Ctrl-C has.
        run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_for(lambda: len(cache_lines(cache)) >= 3 or run.poll() is not None, 300, "3 cached answers")
            run.send_signal(signal.SIGINT)
            output, _ = run.communicate(timeout=120)
        finally:
            run.kill()
        assert run.returncode == 130, output
        assert "interrupted" in output and str(cache) in output
        cached = {json.loads(line)["index"] for line in cache_lines(cache)}
        assert 3 <= len(cached) < 10
        asked_before = len(proxy.requests)
        proxy.hold_after = None  # the re-run is answered at once
        proxy.release.set()

        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        asked_again = proxy.prompts()[asked_before:]
    prompts = [make_judge_prompt(r) for r in records]
    assert sorted(asked_again) == sorted(prompts[i] for i in range(10) if i not in cached)  # each once, no others
    summary = json.loads((out / "judge_summary.json").read_text())["model_response"]
    assert summary["num_scores"] == 10 and summary["score_paths"] == {"json": 10}
    per_item = json.loads((out / "judge_scores_model_response.json").read_text())
    assert [p["judge_score"] for p in per_item] == scores(structured_run[:10])


def test_a_server_that_dies_mid_run_ends_with_a_clear_message_and_the_cache_intact(records, structured_run,
                                                                                     tmp_path):
    server = LlamaServer(tmp_path / "server.log").start()
    cache = tmp_path / "cache.jsonl"

    def kill_after_3_answers():
        wait_for(lambda: len(cache_lines(cache)) >= 3, 300, "3 cached answers")
        server.stop(kill=True)

    killer = threading.Thread(target=kill_after_3_answers, daemon=True)
    killer.start()
    try:
        with pytest.raises(JudgeUnavailableError) as stopped:
            judge_responses(records[:10], make_judge(server.url), cache_path=cache, max_workers=1, retries=2,
                            backoff=0.05, show_progress=False)
    finally:
        killer.join(timeout=310)
        server.stop(kill=True)
    message = str(stopped.value)
    match = re.search(r"stopped answering after (\d+) of 10 items .*kept in (\S+): run again to resume", message)
    assert match and match.group(2) == str(cache), message
    lines = [json.loads(line) for line in cache_lines(cache)]  # every line whole
    assert len(lines) == int(match.group(1)) >= 3
    for line in lines:
        assert json.loads(line["reply"])["score"] == structured_run[line["index"]]["score"]

    # The server back on the same port: the rerun asks only what the cache does not hold.
    server = LlamaServer(tmp_path / "server2.log", port=server.port).start()
    asked = []

    class Counting(OpenAIJudge):
        def complete(self, prompt, structured=False):
            asked.append(prompt)
            return super().complete(prompt, structured)

    try:
        resumed = judge_responses(records[:10], Counting(model=MODEL_ALIAS, url=server.url, max_tokens=MAX_TOKENS),
                                  cache_path=cache, max_workers=1, show_progress=False)
    finally:
        server.stop()
    assert len(asked) == 10 - len(lines)
    assert scores(resumed) == scores(structured_run[:10])
