"""The opt-in audit table: one row per grant, closed at release or as lost, and the docs' recipe."""

from __future__ import annotations

import asyncio
import secrets

import psycopg

import inturn

from .conftest import advisory_holders, advisory_waiters, until

WHO_HELD = """
SELECT holder, host, pid, fence, acquired_at, released_at, outcome
FROM inturn.grants
WHERE namespace = %(namespace)s AND key = %(key)s
  AND acquired_at <= %(at)s AND (released_at IS NULL OR released_at > %(at)s)
ORDER BY fence
"""
"""The recipe of docs/postgres.md: who held user X's turn at time T."""


async def test_each_grant_gets_a_row_closed_at_release(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """Rows carry key, fence, holder, host, pid, times and outcome 'released'."""
    namespace = f"a{secrets.token_hex(4)}"
    gate = inturn.Gate.from_url(f"{postgres_dsn}?audit=1", namespace=namespace)
    fences = []
    for _ in range(3):
        async with gate.turn("user:7") as turn:
            fences.append(turn.fence)
            at = admin.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
            rows = admin.execute(
                WHO_HELD, {"namespace": namespace, "key": "user:7", "at": at}
            ).fetchall()
            assert [r[3] for r in rows] == [turn.fence]
            assert rows[0][6] == "held"
    rows = admin.execute(
        "SELECT key, fence, outcome, released_at > acquired_at, pid FROM inturn.grants"
        " WHERE namespace = %s ORDER BY fence",
        [namespace],
    ).fetchall()
    import os

    assert rows == [("user:7", f, "released", True, os.getpid()) for f in fences]
    assert await gate.backend.footprint() == 0
    await gate.aclose()


async def test_a_killed_holders_row_is_closed_as_lost(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """The next grant of the key closes the row of a holder whose session died as 'lost'."""
    namespace = f"a{secrets.token_hex(4)}"
    url = f"{postgres_dsn}?audit=1"
    first = inturn.Gate.from_url(url, namespace=namespace, lease=5)
    second = inturn.Gate.from_url(url, namespace=namespace, lease=5)
    async with first.turn("k") as dead:
        request = second.turn("k", timeout=10)
        waiter = asyncio.ensure_future(request.__aenter__())
        await asyncio.to_thread(until, lambda: advisory_waiters(admin) == 1)
        [pid] = advisory_holders(admin)
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        alive = await asyncio.wait_for(waiter, 5)
    await request.__aexit__(None, None, None)
    outcomes = admin.execute(
        "SELECT fence, outcome FROM inturn.grants WHERE namespace = %s ORDER BY fence", [namespace]
    ).fetchall()
    assert outcomes == [(dead.fence, "lost"), (alive.fence, "released")]
    for gate in (first, second):
        await gate.aclose()
