"""The pairwise judge against a real model server: llama.cpp (llama-cpp-python's server) with SmolLM2-135M-Instruct
on 127.0.0.1, chapter 7's model 1 vs model 2, both orders, structured. A 135 M judge is no good judge; these tests
check the plumbing: every verdict schema-valid, the cache answering a rerun. And the server fixture itself: a server
that crashes says so, with its exit code and signal, in the error or the failing test's report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from llama_server import MODEL_ALIAS, LlamaServer, serve

from sft_hf.evaluation.judge import VERDICT_SCHEMA, OpenAIJudge, judge_pairs, pairs_from_columns, summarize_pairs

EVAL_EXAMPLES = SHARED_DATA / "eval-example-data.json"
KEYS = ["model 1 response", "model 2 response"]
MAX_TOKENS = 16  # {"winner": "tie"} is about 7 tokens


@pytest.fixture(scope="module")
def llama_server(request, tmp_path_factory):
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed: pip install -e '.[test]'")
    yield from serve(request, tmp_path_factory.mktemp("llama-server-pairwise"))


def test_six_pairs_in_both_orders_every_verdict_schema_valid(llama_server, tmp_path):
    records = [r for r in json.loads(EVAL_EXAMPLES.read_text()) if r[KEYS[0]] != r[KEYS[1]]][:6]  # 6 to judge
    pairs = pairs_from_columns(records, *KEYS)
    judge = OpenAIJudge(model=MODEL_ALIAS, url=llama_server.url, max_tokens=MAX_TOKENS)
    cache = tmp_path / "cache.jsonl"
    results = judge_pairs(pairs, judge, cache, max_workers=1, show_progress=False)
    orders = [o for r in results for o in r["orders"]]
    assert len(orders) == 12
    for order in orders:  # constrained decoding: exactly {"winner": "A" | "B" | "tie"}, nothing else
        assert (order["path"], order["problem"]) == ("json", None), order
        assert json.loads(order["reply"]) == {"winner": order["verdict"]}
        assert order["verdict"] in VERDICT_SCHEMA["properties"]["winner"]["enum"]
    assert all(r["winner"] in ("model", "baseline", "tie") and r["consistent"] is not None for r in results)
    summary = summarize_pairs(results, pairs, bootstrap_samples=100)
    assert (summary["num_pairs"], summary["num_single_verdicts"], summary["verdict_paths"]) == (6, 12, {"json": 12})
    assert summary["wins"] + summary["ties"] + summary["losses"] == 6

    class AsksNothing(OpenAIJudge):
        def complete(self, prompt, schema=None):
            raise AssertionError("the cache should have answered")

    rerun = judge_pairs(pairs, AsksNothing(model=MODEL_ALIAS, url=llama_server.url, max_tokens=MAX_TOKENS), cache,
                        show_progress=False)
    assert rerun == results


# A stand-in for a llama.cpp that was built for another CPU: it answers /v1/models, then dies with SIGSEGV on a
# chat request (on every one, or only on one that says "crash").
CRASHING_SERVER = """
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply(b'{"data": []}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if sys.argv[2] == "always" or b"crash" in body:
            print("ggml: illegal instruction on this CPU, going down", flush=True)
            os.kill(os.getpid(), signal.SIGSEGV)
        message = {"role": "assistant", "content": "ok"}
        self.reply(json.dumps({"choices": [{"index": 0, "message": message}]}).encode())

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


class CrashingServer(LlamaServer):
    crash = "always"

    def command(self):
        return [sys.executable, "-c", CRASHING_SERVER, str(self.port), self.crash]


def test_a_server_that_crashes_on_its_first_chat_request_says_how_it_died(tmp_path):
    with pytest.raises(RuntimeError) as error:
        CrashingServer(tmp_path / "server.log").start()
    message = str(error.value)
    assert message.startswith("the first chat request failed (")
    assert "llama_cpp.server died with exit code -11 (SIGSEGV); a llama-cpp-python built for another CPU?" in message
    assert "CMAKE_ARGS='-DGGML_NATIVE=OFF'" in message and "illegal instruction on this CPU" in message  # the log


def test_a_failing_test_reports_that_the_server_died_and_how(tmp_path):
    """A server that crashes on a later request: the failing test's one-line summary says it died, with the signal."""
    test_file = tmp_path / "test_crash.py"
    test_file.write_text(f"""
import json, sys, urllib.request
sys.path.insert(0, {str(Path(__file__).parent)!r})
import pytest
from llama_server import serve
from test_pairwise_server import CrashingServer

class CrashesLater(CrashingServer):
    crash = "on request"

@pytest.fixture(scope="module")
def llama_server(request, tmp_path_factory):
    yield from serve(request, tmp_path_factory.mktemp("s"), server_class=CrashesLater)

def test_judge(llama_server):
    body = json.dumps({{"messages": [{{"role": "user", "content": "crash"}}]}}).encode()
    urllib.request.urlopen(urllib.request.Request(llama_server.url + "/chat/completions", body), timeout=10)
""")
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(test_file)],
                            cwd=tmp_path, env={**os.environ, "COLUMNS": "500"},  # the summary line, not cut short
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = next(line for line in result.stdout.splitlines() if line.startswith("FAILED"))
    assert summary.startswith("FAILED test_crash.py::test_judge - llama_cpp.server died with exit code -11 (SIGSEGV)")
    assert "- llama_cpp.server -" in result.stdout and "illegal instruction on this CPU" in result.stdout
