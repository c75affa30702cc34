"""What stands between a public arena and a voter who would skew it: the anonymous rate limit, the login throttle,
and the routes the page does not need shut.

    RateLimiter   at most N events a minute per key (an anonymous session, an address)
    LoginGuard    Gradio's auth check: constant-time compare, a user name locked for a doubling delay after each
                  wrong password, so a script tries a few passwords a minute, not thousands
    OnlyThePage   ASGI middleware: POST only where the page itself posts (its event queue, the login form); a
                  script calling a handler directly (/gradio_api/run, /api, /call) or uploading a file gets 404
    sigterm_as_ctrl_c  SIGTERM (kill, systemd, docker stop) ends the arena as Ctrl-C does, summary included

No gradio import: the guards are tested without a server.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import signal
import threading
import time

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RateLimiter:
    """At most `limit` events per `window` seconds for each key, over a sliding window. acquire() takes a slot on
    every key given, or none; release() gives the last ones back (a vote that turned out not to count)."""

    def __init__(self, limit: int, window: float = 60.0, clock=time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self.events: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.lock = threading.Lock()

    def acquire(self, *keys: str) -> float:
        """0 when allowed (a slot taken on each key), else the seconds until one is free."""
        with self.lock:
            now = self.clock()
            wait = 0.0
            for key in keys:
                times = self.events[key]
                while times and times[0] <= now - self.window:
                    times.popleft()
                if len(times) >= self.limit:
                    wait = max(wait, times[0] + self.window - now)
            if wait > 0:
                return wait
            for key in keys:
                self.events[key].append(now)
            return 0.0

    def release(self, *keys: str) -> None:
        with self.lock:
            for key in keys:
                if self.events[key]:
                    self.events[key].pop()


class LoginLocked(Exception):
    """A user name tried while it is locked after wrong passwords."""


class LoginGuard:
    """Gradio's `auth` check (`auth=LoginGuard(logins).login`, async): a login is checked against the
    user:password pairs in constant time. After `free` wrong passwords in a row (typos) that user name is locked:
    first_delay seconds, doubling with each further wrong password up to max_delay; a try while it is locked is
    refused without being checked (HTTP 429 saying how long to wait), so guessing gets a handful of tries a minute
    however fast or parallel the script. A right password clears the count. (A locked name locks its owner out
    too, for at most max_delay: the price of not letting a script guess.)"""

    def __init__(self, logins: list[tuple[str, str]], free: int = 3, first_delay: float = 1.0,
                 max_delay: float = 60.0, clock=time.monotonic):
        self.passwords = dict(logins)
        self.free, self.first_delay, self.max_delay, self.clock = free, first_delay, max_delay, clock
        self.failures: dict[str, int] = {}
        self.locked_until: dict[str, float] = {}
        self.checked = 0  # passwords compared, for the operator (and the tests)

    def check(self, username: str, password: str) -> bool:
        """True for a right password; False for a wrong one (the name is locked); LoginLocked while locked."""
        now = self.clock()
        if now < self.locked_until.get(username, 0.0):
            raise LoginLocked(self.locked_until[username] - now)
        self.checked += 1
        expected = self.passwords.get(username, "")
        right = username in self.passwords and hmac.compare_digest(password.encode(), expected.encode())
        if right:
            self.failures.pop(username, None)
            self.locked_until.pop(username, None)
            return True
        failures = self.failures[username] = self.failures.get(username, 0) + 1
        if failures >= self.free:
            delay = min(self.first_delay * 2 ** (failures - self.free), self.max_delay)
            self.locked_until[username] = now + delay
            print(f"login: wrong password for {username!r} ({failures} in a row): locked for {delay:.0f} s",
                  flush=True)
        return False

    async def login(self, username: str, password: str) -> bool:
        """What Gradio's auth= takes. (A coroutine function: Gradio awaits only what inspect.iscoroutinefunction
        says it must, and an object with an async __call__ would return an unawaited coroutine, which is true.)"""
        from fastapi import HTTPException

        try:
            return self.check(username, password)
        except LoginLocked as locked:
            await asyncio.sleep(0)
            raise HTTPException(status_code=429, detail=f"Too many wrong passwords for this user name: try again "
                                                        f"in {max(1, round(locked.args[0]))} s.") from None


# What the page itself POSTs: its events go through the queue; the login form. (Everything else Gradio answers to
# a POST runs a handler outside the queue, takes a file, or is for components this page does not have.)
PAGE_POSTS = ("/gradio_api/queue/join", "/login", "/login/")


class OnlyThePage:
    """ASGI middleware refusing every POST but the page's own (PAGE_POSTS) with 404: Gradio answers
    /gradio_api/run/<name>, /api/<name> and /call/<name> for any event handler, private ones included (its
    api_visibility only hides them from the API page and its Python client), and /gradio_api/upload takes files
    of any size. The page's events still run, through the queue, where the arena's limits apply."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS") \
                and scope["path"] not in PAGE_POSTS:
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body",
                        "body": b'{"detail": "Not found: this arena answers its own page only"}'})
            return
        await self.app(scope, receive, send)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """Inside, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does: whatever Ctrl-C would print or
    keep, SIGTERM does too."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
