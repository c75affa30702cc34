"""The arena's votes in SQLite, and their export in Chatbot Arena's battle form.

One row per battle, written in one transaction the moment the voter clicks, so a server killed mid-vote keeps
every vote it acknowledged. The battle id is the primary key: a replayed request (a double click, a resent
websocket message) inserts nothing the second time. A voter (a login name, or one anonymous browser session) votes
once per prompt and pair of models: a second vote on the same matchup is refused (AlreadyVoted), checked in the
same transaction as the insert, so two tabs voting at once cannot both get in. WAL journal and a busy timeout let
many voters write at once. The file's schema version (SQLite's user_version) is written when the file is created.

Before the arena writes anything, the file is checked (check_votes_file): an SQLite file that this user can write,
that passes `PRAGMA quick_check`, and that is empty or an arena's votes. Another program's database is refused
before a single byte of it is written (it is inspected through a read-only connection).
No gradio here: `sft-hf arena --leaderboard` never imports it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from contextlib import closing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sft_hf.errors import DataError, RecipeError
from sft_hf.evaluation.responses import read_records, require_text

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")  # Chatbot Arena's names for the four buttons
BUSY_TIMEOUT_MS = 30_000  # how long a writer waits for another's lock before giving up
SCHEMA_VERSION = 2  # 2: the anonymous session and the matchup (prompt + pair) of each vote, for per-voter limits
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database

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
    tstamp      REAL NOT NULL,              -- seconds since the epoch, when the vote was stored
    session     TEXT,                       -- an anonymous voter's browser session (a hash of Gradio's)
    matchup     TEXT                        -- matchup_key: the prompt and the pair of models, sides ignored
);
"""
INDEX = "CREATE INDEX IF NOT EXISTS votes_by_matchup ON votes (matchup)"  # the per-voter check's lookup
V1_COLUMNS = ("battle_id", "model_a", "model_b", "winner", "instruction", "input", "response_a", "response_b",
              "source", "voter", "tstamp")
COLUMNS = {1: V1_COLUMNS, 2: V1_COLUMNS + ("session", "matchup")}  # what each schema version's table holds


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
    voter: str | None = None  # the login name
    tstamp: float = 0.0
    session: str | None = None  # an anonymous voter's session (session_id), when there is no login

    @property
    def matchup(self) -> str:
        return matchup_key(self.instruction, self.input, self.model_a, self.model_b)


class AlreadyVoted(Exception):
    """This voter already voted on this prompt and pair of models (in another battle)."""


def matchup_key(instruction: str, input: str, model_a: str, model_b: str) -> str:
    """What a voter votes on once: the prompt and the pair of models, whichever side each was shown on."""
    text = json.dumps([instruction, input or "", sorted((model_a, model_b))], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def session_id(session_hash: str) -> str:
    """The id an anonymous session is stored under: a hash of Gradio's session hash, which itself must stay secret
    (whoever holds it can act as that browser tab)."""
    return hashlib.sha256(f"sft-hf arena session {session_hash}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- checking the file

def is_sqlite_file(path: str | Path) -> bool:
    """Only for a file this process holds no SQLite connection to: closing any descriptor of a file drops every POSIX
    lock the process holds on it, its connections' locks included (sqlite.org/howtocorrupt.html 2.2)."""
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def read_only_uri(path: Path) -> str:
    return path.resolve().as_uri() + "?mode=ro"


def inspect_votes_file(path: str | Path) -> int:
    """What an existing file holds, read through a read-only connection (nothing in it is written): 0 for an empty
    database (no tables), else the votes schema version. Anything else is a DataError saying what it is: not
    SQLite, damaged (PRAGMA quick_check), another program's database, a newer sft-hf's votes."""
    path = Path(path)
    if not path.stat().st_size:
        return 0
    # SQLite itself tells a file that is not SQLite, not is_sqlite_file: this process may hold connections to it
    try:
        with closing(sqlite3.connect(read_only_uri(path), uri=True, timeout=BUSY_TIMEOUT_MS / 1000)) as conn:
            problems = [line.strip() for row in conn.execute("PRAGMA quick_check(3)") for line in row[0].splitlines()
                        if line.strip() and not line.startswith("*** in database")]
            if problems != ["ok"]:
                raise DataError(f"{path}: damaged database (PRAGMA quick_check: {'; '.join(problems[:3])}); the "
                                f"arena will not write to it. Keep it (`sqlite3 {path} .recover` may save its votes) "
                                "and give --votes a new file")
            tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name "
                                                     "NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name")]
            if not tables:
                return 0
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(votes)"))
    except sqlite3.DatabaseError as e:  # damaged beyond reading its schema, or locked by another program
        if str(e) == "file is not a database":
            raise DataError(f"{path}: not a votes database (not an SQLite file at all)") from None
        raise DataError(f"{path}: damaged or unreadable database ({e}); the arena will not write to it. Keep it "
                        f"(`sqlite3 {path} .recover` may save its votes) and give --votes a new file") from None
    if tables == ["votes"] and version in COLUMNS and columns == COLUMNS[version]:
        return version
    if tables == ["votes"] and version > SCHEMA_VERSION:
        raise DataError(f"{path}: votes schema version {version}, but this sft-hf reads up to version "
                        f"{SCHEMA_VERSION} (a file from a newer sft-hf?)")
    shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
    raise DataError(f"{path}: another program's database (tables: {shown}), not an arena's votes; left untouched. "
                    "Give --votes a new file name")


def check_writable(path: Path) -> None:
    """The file and its folder (WAL keeps two files next to it) can be written by this user."""
    folder = path.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RecipeError(f"--votes {path}: cannot write in folder {folder} (SQLite keeps its journal there); "
                          "choose a folder you can write")
    if path.exists() and not os.access(path, os.W_OK):
        raise RecipeError(f"--votes {path}: this user cannot write the file; votes would be lost. Fix its "
                          f"permissions (ls -l {path}) or choose another file")


# ---------------------------------------------------------------------------------------------- the store

class VoteStore:
    """The votes file. Every call opens its own connection: Gradio runs handlers on many threads, and a
    connection per call is cheap next to a human's click.

    VoteStore(path) is the arena's (it writes): the file is checked first (check_writable, inspect_votes_file),
    created when new or empty, upgraded from schema version 1 in place. VoteStore(path, create=False) only reads
    (--leaderboard, --export, --agreement): a missing file is an error, not a new database."""

    columns = COLUMNS[SCHEMA_VERSION]  # an older file read without upgrading has fewer

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise RecipeError(f"{self.path}: no such votes file (written by `sft-hf arena --votes {self.path}`)")
        if not self.path.parent.is_dir():
            raise RecipeError(f"--votes {self.path}: folder {self.path.parent} does not exist")
        if self.path.exists() and not self.path.is_file():
            raise RecipeError(f"--votes {self.path}: not a file")
        version = inspect_votes_file(self.path) if self.path.is_file() else 0
        if not create:
            if version == 0:
                raise DataError(f"{self.path}: an SQLite file without a votes table (not an arena's votes)")
            if version != SCHEMA_VERSION:  # an older file, read as it is: the columns it lacks are empty
                self.columns = COLUMNS[version]
            return
        check_writable(self.path)
        try:
            with closing(self._connect()) as conn:
                if version == 0:
                    self._create(conn)
                elif version < SCHEMA_VERSION:
                    self._upgrade(conn, version)
                conn.execute("BEGIN IMMEDIATE")  # a write lock and a page write: fails now, not at the first vote
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("ROLLBACK")
        except sqlite3.DatabaseError as e:  # a file this user cannot write, a full disk, a lock held too long
            raise RecipeError(f"--votes {self.path}: cannot write it ({e}); no vote would be kept") from None

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        """The table and its version in one transaction (a second process creating it at once waits, then finds
        it)."""
        conn.execute("PRAGMA journal_mode=WAL")  # kept in the file: readers never block the writer
        conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\n{INDEX};\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;")

    def _upgrade(self, conn: sqlite3.Connection, version: int) -> None:
        """Version 1 → 2: two columns added (the existing votes' matchups filled in), in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == version:  # not upgraded by another process
                conn.execute("ALTER TABLE votes ADD COLUMN session TEXT")
                conn.execute("ALTER TABLE votes ADD COLUMN matchup TEXT")
                rows = conn.execute("SELECT battle_id, instruction, input, model_a, model_b FROM votes").fetchall()
                conn.executemany("UPDATE votes SET matchup = ? WHERE battle_id = ?",
                                 [(matchup_key(*row[1:]), row[0]) for row in rows])
                conn.execute(INDEX)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        print(f"{self.path}: votes file upgraded from schema version {version} to {SCHEMA_VERSION}", flush=True)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit, so one INSERT is one transaction, committed before it returns
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=FULL")  # on disk before the voter is told it counted
        return conn

    def add(self, vote: Vote) -> tuple[bool, str]:
        """Stores the vote unless its battle already has one: (whether it was new, the winner stored for it).
        AlreadyVoted when its voter (login, else anonymous session) already voted on this prompt and pair of models
        in another battle. sqlite3 errors (a file that can no longer be written) reach the caller."""
        if vote.winner not in WINNERS:
            raise ValueError(f"winner {vote.winner!r}: use one of {', '.join(WINNERS)}")
        row = asdict(vote)
        row["tstamp"] = vote.tstamp or time.time()
        row["matchup"] = vote.matchup
        columns = ", ".join(row)
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")  # the checks and the insert see the same votes
            try:
                stored = conn.execute("SELECT winner FROM votes WHERE battle_id = ?", (vote.battle_id,)).fetchone()
                if stored is None and self._voted(conn, vote):
                    raise AlreadyVoted(vote.matchup)
                if stored is None:
                    conn.execute(f"INSERT INTO votes ({columns}) VALUES ({', '.join('?' * len(row))})",
                                 list(row.values()))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # an I/O error may have ended it already; its own error is the one to see
                    conn.execute("ROLLBACK")
                raise
        return (True, vote.winner) if stored is None else (False, stored[0])

    @staticmethod
    def _who(voter: str | None, session: str | None) -> tuple[str, tuple] | None:
        """The SQL condition for one voter's votes: a login, else an anonymous session; None for neither (votes
        added by a script: no per-voter limit)."""
        if voter is not None:
            return "voter = ?", (voter,)
        if session is not None:
            return "voter IS NULL AND session = ?", (session,)
        return None

    @classmethod
    def _voted(cls, conn: sqlite3.Connection, vote: Vote) -> bool:
        if (condition := cls._who(vote.voter, vote.session)) is None:
            return False
        who, args = condition
        return conn.execute(f"SELECT 1 FROM votes WHERE matchup = ? AND {who} LIMIT 1",
                            (vote.matchup, *args)).fetchone() is not None

    def matchups_of(self, voter: str | None, session: str | None) -> set[str]:
        """The matchups (matchup_key) this voter already voted on."""
        if (condition := self._who(voter, session)) is None:
            return set()
        who, args = condition
        with closing(self._connect()) as conn:
            return {row[0] for row in conn.execute(f"SELECT matchup FROM votes WHERE {who}", args)}

    def votes(self) -> list[Vote]:
        names = [f.name for f in fields(Vote)]
        selected = ", ".join(name if name in self.columns else f"NULL AS {name}" for name in names)
        with closing(self._connect()) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(f"SELECT {selected} FROM votes ORDER BY tstamp, battle_id").fetchall()
        return [Vote(**dict(row)) for row in rows]

    def count(self) -> int:
        with closing(self._connect()) as conn:
            return conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]

    def version(self) -> tuple[int, int]:
        """(how many votes, the last rowid): changes with every stored vote; what the leaderboard is cached by."""
        with closing(self._connect()) as conn:
            count, last = conn.execute("SELECT COUNT(*), MAX(rowid) FROM votes").fetchone()
        return count, last or 0


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
        "judge": vote.voter or (f"anonymous-{vote.session}" if vote.session else "anonymous"),
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
