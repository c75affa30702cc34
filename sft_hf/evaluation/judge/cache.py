"""The judge's on-disk cache: what was answered survives an interrupted run, which then asks only the rest."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path


class JudgeCache:
    """Append-only JSONL, one line per answered prompt: its key (judge identity + prompt + whether a structured
    answer was asked for; never any secret), index, reply, and the path the reply came by ("json" or "text")."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.replies: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        if self.path and self.path.is_file():
            good = []
            for line in self.path.read_text().splitlines():
                try:  # a run killed mid-write leaves a truncated last line: drop it, that item is asked again
                    item = json.loads(line)
                    self.replies[item["key"]] = (item["reply"], item.get("path", "text"))
                    good.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            self.path.write_text("".join(good))  # so the next append starts on a line of its own

    @staticmethod
    def key(identity: str, prompt: str, structured: bool = False) -> str:
        return hashlib.sha256(f"{identity}{'|structured' if structured else ''}\n{prompt}".encode()).hexdigest()

    def get(self, key: str) -> tuple[str, str] | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str, index: int, path: str = "text") -> None:
        with self._lock:
            self.replies[key] = (reply, path)
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps({"key": key, "index": index, "reply": reply, "path": path}) + "\n")
