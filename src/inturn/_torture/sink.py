"""A fenced sink: one record per key in a SQLite file that several processes share.

``write(key, fence, worker)`` takes the database lock (``BEGIN IMMEDIATE``), accepts the write
only if ``fence`` is >= the highest fence stored for the key, and records every attempt
(key, fence, worker, accepted, time, message id). It is the downstream system that fencing
tokens protect: a holder that lost its turn and writes anyway is refused here.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Attempt", "FencedSink"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS record (key TEXT PRIMARY KEY, fence INTEGER NOT NULL, worker TEXT);
CREATE TABLE IF NOT EXISTS attempt (
    n INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, fence INTEGER NOT NULL,
    worker TEXT NOT NULL, accepted INTEGER NOT NULL, at REAL NOT NULL, msg TEXT,
    highest INTEGER
);
"""


@dataclass(frozen=True, slots=True)
class Attempt:
    n: int
    key: str
    fence: int
    worker: str
    accepted: bool
    at: float
    msg: str | None
    highest: int | None
    """The highest fence stored for the key when the attempt was judged."""


class FencedSink:
    """Open (and create) the sink at ``path``; one instance per process or thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def write(self, key: str, fence: int, worker: str, msg: str | None = None) -> bool:
        """Store ``fence`` for ``key`` unless a higher fence is stored; record the attempt."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT fence FROM record WHERE key = ?", (key,)).fetchone()
            highest = None if row is None else int(row[0])
            accepted = highest is None or fence >= highest
            if accepted:
                db.execute(
                    "INSERT INTO record (key, fence, worker) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET fence = excluded.fence, "
                    "worker = excluded.worker",
                    (key, fence, worker),
                )
            db.execute(
                "INSERT INTO attempt (key, fence, worker, accepted, at, msg, highest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, fence, worker, int(accepted), time.monotonic(), msg, highest),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return accepted

    def attempts(self) -> list[Attempt]:
        rows = self._db.execute(
            "SELECT n, key, fence, worker, accepted, at, msg, highest FROM attempt ORDER BY n"
        ).fetchall()
        return [
            Attempt(int(n), k, int(f), w, bool(a), float(t), m, None if h is None else int(h))
            for n, k, f, w, a, t, m, h in rows
        ]

    def close(self) -> None:
        self._db.close()
