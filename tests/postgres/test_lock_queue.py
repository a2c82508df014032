"""What PostgreSQL's advisory-lock queue does, measured rather than assumed, and what
inturn's per-process lines make of it across processes (docs/postgres.md quotes these)."""

from __future__ import annotations

import asyncio
import secrets
import threading

import psycopg

import inturn
from inturn.testing import History

from .conftest import advisory_waiters, until

LOCK = 4242


def test_postgres_grants_in_the_order_sessions_queued(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """8 sessions queued one after another get the lock in that order; a try-lock never barges."""
    for _ in range(3):
        assert _one_round(postgres_dsn, admin) == list(range(8))


def _one_round(dsn: str, admin: psycopg.Connection) -> list[int]:
    """Queue 8 sessions behind a holder, one at a time (checked in pg_locks); the grant order."""
    holder = psycopg.connect(dsn, autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK])
    order: list[int] = []
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(8)]

    def wait(i: int) -> None:
        conns[i].execute("BEGIN")
        conns[i].execute("SELECT pg_advisory_xact_lock(%s)", [LOCK])
        order.append(i)
        conns[i].execute("COMMIT")

    threads = []
    for i in range(8):
        threads.append(threading.Thread(target=wait, args=(i,)))
        threads[-1].start()
        until(lambda n=i + 1: advisory_waiters(admin) == n)  # type: ignore[misc]
    with psycopg.connect(dsn, autocommit=True) as newcomer:
        holder.execute("COMMIT")  # hands the lock to session 0 in the same step
        row = newcomer.execute("SELECT pg_try_advisory_lock(%s)", [LOCK]).fetchone()
        assert row is not None
        if row[0]:  # only possible once all eight went through: then it must be last
            order.append(-1)
            newcomer.execute("SELECT pg_advisory_unlock(%s)", [LOCK])
    for t in threads:
        t.join(5)
    for c in [holder, *conns]:
        c.close()
    return [i for i in order if i >= 0] if order[-1] == -1 else order


async def test_heads_of_processes_alternate(postgres_dsn: str, admin: psycopg.Connection) -> None:
    """Across processes only heads queue in PostgreSQL: asks a1, a2, b1 are granted a1, b1, a2."""
    namespace = f"q{secrets.token_hex(4)}"
    # Separate backends keep separate local lines: as far as inturn knows, separate processes.
    holder_gate, gate_a, gate_b = (
        inturn.Gate.from_url(postgres_dsn, namespace=namespace) for _ in range(3)
    )
    history = History()

    async def run(gate: inturn.Gate, name: str) -> None:
        async with gate.turn("k", timeout=10) as turn:
            with history.span(turn, name):
                await asyncio.sleep(0.01)

    async with holder_gate.turn("k"):
        tasks = [asyncio.ensure_future(run(gate_a, "a1"))]
        await asyncio.to_thread(until, lambda: advisory_waiters(admin) == 1)
        tasks.append(asyncio.ensure_future(run(gate_a, "a2")))
        await asyncio.sleep(0.05)  # a2 waits in gate_a's local line, not in PostgreSQL
        assert advisory_waiters(admin) == 1
        tasks.append(asyncio.ensure_future(run(gate_b, "b1")))
        await asyncio.to_thread(until, lambda: advisory_waiters(admin) == 2)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    spans = sorted(history.spans, key=lambda s: s.start)
    assert [s.worker for s in spans] == ["a1", "b1", "a2"]
    assert [s.fence for s in spans] == sorted(s.fence for s in spans)
    for gate in (holder_gate, gate_a, gate_b):
        await gate.aclose()
