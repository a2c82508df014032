"""Helpers for the PostgreSQL tests: an admin connection and polling pg_locks (bounded)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest


@pytest.fixture
def admin(postgres_dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database, for looking at pg_locks."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        yield conn


def advisory_waiters(admin: psycopg.Connection) -> int:
    """How many sessions wait (not granted) for an advisory lock in this database."""
    row = admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchone()
    assert row is not None
    return int(row[0])


def advisory_holders(admin: psycopg.Connection) -> list[int]:
    """Backend pids that hold an advisory lock in this database."""
    rows = admin.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchall()
    return [int(r[0]) for r in rows]


def until(predicate: object, within: float = 5.0) -> None:
    """Poll ``predicate()`` every 5 ms until true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not true within {within}s"
        time.sleep(0.005)
