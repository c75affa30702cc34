"""Helpers for the arena tests: small response files, `sft-hf arena` in a subprocess on a free loopback port, and
Debian's chromium driven by Playwright (never a downloaded browser).

Also a script: `python tests/arena_helpers.py docs/images/arena.png` serves chapter 7's two response columns,
votes once in the browser and saves a screenshot of the page with the names revealed (the README's picture).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EVAL_EXAMPLE_DATA = ROOT.parent / "shared" / "data" / "eval-example-data.json"  # chapter 7's two response columns


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_response_files(folder: Path, names: tuple[str, str], n: int = 4) -> list[str]:
    """Two models' saved responses to the same n prompts (in different orders, as the join must handle), as
    `name=file` specs. The texts never contain the model names, so a name on the page can only be a leak."""
    specs = []
    for k, name in enumerate(names):
        records = [{"instruction": f"Rewrite sentence {i} in the passive voice.", "input": f"The cat chased mouse {i}.",
                    "output": f"Mouse {i} was chased by the cat.",
                    "model_response": f"{'First' if k == 0 else 'Second'} system's answer to prompt {i}."}
                   for i in range(n)]
        path = folder / f"responses_{k}.json"
        path.write_text(json.dumps(records[:: 1 if k == 0 else -1], indent=1))
        specs.append(f"{name}={path}")
    return specs


@contextlib.contextmanager
def read_only(path: Path):
    """The file cannot be written by this process while inside: chmod for a user, `chattr +i` for root (whom
    permissions do not stop). Skips the test where neither works."""
    path = Path(path)
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o444)
        try:
            yield path
        finally:
            path.chmod(mode)
        return
    import pytest

    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: cannot make a file read-only")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def http(method: str, url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    """(status, body) of one plain HTTP request, as a script would send it (no browser, no Gradio client)."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


class ArenaServer:
    """`python -m sft_hf arena ARGS --port P` in a subprocess; ready once its page answers."""

    def __init__(self, args: list[str], log_path: Path, port: int | None = None, timeout: float = 90,
                 env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = Path(log_path)
        env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(ROOT),
                   TOKENIZERS_PARALLELISM="false", **(env or {}))
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "sft_hf", "arena", *args, "--port", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        deadline = time.time() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"sft-hf arena exited with code {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError:  # an answer (a login page's 401): the server is up
                return
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"sft-hf arena did not answer on {self.url} within {timeout:.0f} s:\n"
                                   f"{self.output()}")
            time.sleep(0.25)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def end(self, signum: int, timeout: float = 60) -> int:
        """Sends the signal and waits for the server to end; its exit code."""
        self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self.log.close()
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def launch_chromium(playwright, user_data_dir: str | None = None):
    """Debian's chromium, headless, in a fresh empty profile: nothing cached or remembered from another run."""
    return playwright.chromium.launch_persistent_context(
        user_data_dir or tempfile.mkdtemp(prefix="arena-chromium-"), executable_path=CHROMIUM, headless=True,
        args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})


class TrafficRecorder:
    """Every byte the page receives: finished response bodies (Playwright's response events), websocket frames,
    and the streams still open when asked (Gradio's heartbeat), read through the DevTools protocol as they
    arrive."""

    def __init__(self, context, page):
        self.responses, self.finished, self.frames, self.streamed = [], set(), [], {}
        page.on("response", lambda response: self.responses.append(response))
        page.on("requestfinished", lambda request: self.finished.add(id(request)))
        page.on("websocket", lambda ws: ws.on("framereceived", lambda frame: self.frames.append(frame)))
        self.cdp = context.new_cdp_session(page)
        self.cdp.send("Network.enable")
        self.cdp.on("Network.responseReceived", self._stream)
        self.cdp.on("Network.dataReceived", self._data)

    def _stream(self, event):
        if "event-stream" in event["response"].get("mimeType", ""):
            try:
                reply = self.cdp.send("Network.streamResourceContent", {"requestId": event["requestId"]})
                self.streamed.setdefault(event["requestId"], []).append(base64.b64decode(reply["bufferedData"]))
            except Exception:  # noqa: BLE001 - already finished: its body is read like any other response's
                pass

    def _data(self, event):
        if event["requestId"] in self.streamed and event.get("data"):
            self.streamed[event["requestId"]].append(base64.b64decode(event["data"]))

    def received(self) -> str:
        """Everything received so far, as text (bodies of finished responses, frames, open streams)."""
        parts = []
        for response in self.responses:
            if id(response.request) in self.finished:  # a stream still open is read through self.streamed
                parts.append(response.body().decode("utf-8", "replace"))
        parts += [frame if isinstance(frame, str) else frame.decode("utf-8", "replace") for frame in self.frames]
        parts += [b"".join(chunks).decode("utf-8", "replace") for chunks in self.streamed.values()]
        return "\n".join(parts)


def page_text(page) -> str:
    """The page's HTML, its visible text, and the values of every text field (not part of the HTML)."""
    values = page.evaluate("() => [...document.querySelectorAll('textarea, input')].map(e => e.value).join('\\n')")
    return "\n".join([page.content(), page.inner_text("body"), values])


def wait_for_battle(page, timeout: float = 30_000) -> tuple[str, str]:
    page.wait_for_function("() => document.querySelector('#arena-response-a textarea')?.value.length > 0 && "
                           "!document.querySelector('#vote-a').disabled", timeout=timeout)
    return (page.input_value("#arena-response-a textarea"), page.input_value("#arena-response-b textarea"))


def wait_for_reveal(page, timeout: float = 30_000) -> str:
    page.wait_for_function("() => document.querySelector('#arena-reveal')?.innerText.includes('Model A:')",
                           timeout=timeout)
    return page.inner_text("#arena-reveal")


def screenshot(path: Path) -> Path:
    """Serves chapter 7's two response columns, votes once, saves the page (names revealed) as a PNG."""
    from playwright.sync_api import sync_playwright

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"model {k}={EVAL_EXAMPLE_DATA}:model {k} response" for k in (1, 2)]
        server = ArenaServer(["--responses", *specs, "--votes", f"{tmp}/votes.sqlite", "--seed", "3"],
                             Path(tmp, "server.log"))
        try:
            with sync_playwright() as playwright:
                context = launch_chromium(playwright, f"{tmp}/profile")
                page = context.new_page()
                page.goto(server.url)
                wait_for_battle(page)
                page.click("#vote-a")
                wait_for_reveal(page)
                page.screenshot(path=str(path), full_page=True)
                context.close()
        finally:
            server.stop()
    return path


if __name__ == "__main__":
    print(f"Saved {screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / 'docs' / 'images' / 'arena.png'))}")
