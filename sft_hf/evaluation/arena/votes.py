"""The arena's votes in SQLite, and their export in Chatbot Arena's battle form.

One row per battle, written in one transaction the moment the voter clicks, so a server killed mid-vote keeps
every vote it acknowledged. The battle id is the primary key: a replayed request (a double click, a resent
websocket message) inserts nothing the second time. WAL journal and a busy timeout let many voters write at once.
The file's schema version (SQLite's user_version) is written when the file is created and checked on every open.
No gradio here: `sft-hf arena --leaderboard` never imports it.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

from sft_hf.errors import DataError, RecipeError
from sft_hf.evaluation.responses import read_records, require_text

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")  # Chatbot Arena's names for the four buttons
BUSY_TIMEOUT_MS = 30_000  # how long a writer waits for another's lock before giving up
SCHEMA_VERSION = 1

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS votes (
    battle_id   TEXT PRIMARY KEY,           -- one vote per battle: a replayed vote is ignored
    model_a     TEXT NOT NULL,              -- the model shown on the left
    model_b     TEXT NOT NULL,              -- the model shown on the right
    winner      TEXT NOT NULL CHECK (winner IN ({", ".join(repr(w) for w in WINNERS)})),
    instruction TEXT NOT NULL,
    input       TEXT NOT NULL DEFAULT '',
    response_a  TEXT NOT NULL,
    response_b  TEXT NOT NULL,
    source      TEXT NOT NULL,              -- "files" (saved responses) or "live" (generated for this prompt)
    voter       TEXT,                       -- the login name when the arena asks for one
    tstamp      REAL NOT NULL               -- seconds since the epoch, when the vote was stored
);
"""


@dataclass
class Vote:
    battle_id: str
    model_a: str
    model_b: str
    winner: str
    instruction: str
    response_a: str
    response_b: str
    input: str = ""
    source: str = "files"
    voter: str | None = None
    tstamp: float = 0.0


class VoteStore:
    """The votes file. Every call opens its own connection: Gradio runs handlers on many threads, and a
    connection per call is cheap next to a human's click."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise RecipeError(f"{self.path}: no such votes file (written by `sft-hf arena --votes {self.path}`)")
        if not self.path.parent.is_dir():
            raise RecipeError(f"--votes {self.path}: folder {self.path.parent} does not exist")
        try:
            with closing(self._connect()) as conn:
                if has_votes_table(conn):
                    self._check_version(conn)
                elif create:
                    self._create(conn)
                else:
                    raise DataError(f"{self.path}: an SQLite file without a votes table (not an arena's votes)")
        except sqlite3.OperationalError as e:  # a folder or file this user cannot open (or write, to create)
            raise RecipeError(f"cannot open {self.path}: {e}") from None
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: not a votes database ({e})") from None

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        """The table and its version in one transaction (a second process creating it at once waits, then finds
        it); the only write an open makes."""
        conn.execute("PRAGMA journal_mode=WAL")  # kept in the file: readers never block the writer
        conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;")

    def _check_version(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise DataError(f"{self.path}: votes schema version {version}, but this sft-hf reads version "
                            f"{SCHEMA_VERSION} (a file from another sft-hf version?)")

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit, so one INSERT is one transaction, committed before it returns
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=FULL")  # on disk before the voter is told it counted
        return conn

    def add(self, vote: Vote) -> tuple[bool, str]:
        """Stores the vote unless its battle already has one: (whether it was new, the winner stored for it)."""
        if vote.winner not in WINNERS:
            raise ValueError(f"winner {vote.winner!r}: use one of {', '.join(WINNERS)}")
        row = asdict(vote)
        row["tstamp"] = vote.tstamp or time.time()
        columns = ", ".join(row)
        with closing(self._connect()) as conn:
            inserted = conn.execute(f"INSERT OR IGNORE INTO votes ({columns}) VALUES ({', '.join('?' * len(row))})",
                                    list(row.values())).rowcount == 1
            stored = conn.execute("SELECT winner FROM votes WHERE battle_id = ?", (vote.battle_id,)).fetchone()
        return inserted, stored[0]

    def votes(self) -> list[Vote]:
        with closing(self._connect()) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM votes ORDER BY tstamp, battle_id").fetchall()
        return [Vote(**dict(row)) for row in rows]

    def count(self) -> int:
        with closing(self._connect()) as conn:
            return conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]


def has_votes_table(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'votes'").fetchone() is not None


def open_votes(path: str | Path) -> VoteStore:
    """An existing votes file (for --leaderboard and --export: a typo must not create an empty database)."""
    return VoteStore(path, create=False)


def battle_record(vote: Vote) -> dict:
    """One line of Chatbot Arena's battle data (`clean_battle` / `chatbot_arena_conversations`): question_id,
    model_a, model_b, winner, judge, conversation_a/b, turn, anony, tstamp; plus this arena's instruction, input,
    source."""
    prompt = vote.instruction + (f"\n\n{vote.input}" if vote.input else "")
    return {
        "question_id": vote.battle_id,
        "model_a": vote.model_a,
        "model_b": vote.model_b,
        "winner": vote.winner,
        "judge": vote.voter or "anonymous",
        "conversation_a": [{"role": "user", "content": prompt}, {"role": "assistant", "content": vote.response_a}],
        "conversation_b": [{"role": "user", "content": prompt}, {"role": "assistant", "content": vote.response_b}],
        "turn": 1,
        "anony": True,  # the names were hidden until the vote
        "tstamp": vote.tstamp,
        "instruction": vote.instruction,
        "input": vote.input,
        "source": vote.source,
    }


def export_jsonl(store: VoteStore, path: str | Path) -> int:
    """Writes every vote as one JSON line; returns how many. Written to a temporary file first, then renamed."""
    path = Path(path)
    if not path.parent.is_dir():
        raise RecipeError(f"{path}: folder {path.parent} does not exist")
    records = [battle_record(v) for v in store.votes()]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    partial.replace(path)
    return len(records)


def read_battles(path: str | Path) -> list[dict]:
    """Battles (model_a, model_b, winner) from a votes database, a JSONL export, or a JSON list of battles (Chatbot
    Arena's own `clean_battle_*.json` files have this form)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        return [battle_record(v) for v in open_votes(path).votes()]
    located = read_records(path)
    for battle, where in located:
        require_text(battle, where, ("model_a", "model_b", "winner"))
        if battle["winner"] not in WINNERS:
            raise DataError(f"{where}, field 'winner': {battle['winner']!r} is not one of {', '.join(WINNERS)}")
        if battle["model_a"] == battle["model_b"]:
            raise DataError(f"{where}: model_a and model_b are both {battle['model_a']!r}")
    return [battle for battle, _ in located]
