"""What idle users leave in PostgreSQL: no row in any table once their work is done and
their windows passed. Turns keep none (an advisory lock); a mailbox's rows go with the take
that finds the queue empty; dedup marks and supersede records go with the engine's purge
once their window (or keep time) ends."""

from __future__ import annotations

import asyncio
import secrets

import psycopg
import pytest

import inturn
from inturn._backends.postgres import _plan

KEYS = 10_000
"""Distinct users taken once (the benchmark does 1,000,000; two round trips each, so
fewer than on Redis to keep the suite quick on a small machine)."""

PER_KEY_TABLES = ("dedup", "supersede", "mb_messages", "mb_roles", "mb_dead", "grants")
"""Every table of the schema but the migrations' bookkeeping."""


def _rows(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'inturn'"
            )
        ]
        assert sorted(tables) == sorted((*PER_KEY_TABLES, "migrations"))  # none forgotten
        return {t: conn.execute(f"SELECT count(*) FROM inturn.{t}").fetchone()[0] for t in tables}  # type: ignore[index]


async def test_idle_users_leave_no_row(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 users each take a turn; 500 of them also get a mailbox message (drained),
    a dedup mark and a supersede record, with short windows. Once idle and purged: 0 rows.
    The purge keeps pace: one batch per claim is due at once again while batches are full."""
    monkeypatch.setattr(_plan, "SUPERSEDE_KEEP", 0.2)
    gate = inturn.Gate.from_url(postgres_dsn, namespace=f"fp{secrets.token_hex(3)}")
    backend = gate.backend
    assert isinstance(backend, inturn.PostgresBackend)
    seen: list[str] = []

    async def handle(message: inturn.Message) -> None:
        seen.append(message.key)

    box = gate.mailbox("inbox", handler=handle, sweep_interval=None)
    fences: list[int] = []

    async def turn(key: str) -> None:
        async with gate.turn(key, timeout=60) as held:
            fences.append(held.fence)

    try:
        async with asyncio.timeout(240):
            for start in range(0, KEYS, 200):
                await asyncio.gather(*(turn(f"user-{i}") for i in range(start, start + 200)))
            for i in range(500):
                key = f"user-{i}"
                await box.submit(key, {"n": i})
                token = secrets.token_hex(8)
                claimed = await backend.claim(
                    key, "f", "m1", token, fence=None, lease=5, window=0.2
                )
                assert claimed.state == "new"
                await backend.finish(key, "f", "m1", token, None, window=0.2)
                await backend.supersede(key, "f", cancel_running=False)
            assert await box.drained(60)
            busy = _rows(postgres_dsn)
            assert busy["dedup"] == busy["supersede"] == 500
            assert busy["mb_messages"] == busy["mb_roles"] == 0  # gone with the last take
            await asyncio.sleep(0.3)  # the windows end
            await backend.purge()
        left = _rows(postgres_dsn)
        left.pop("migrations")
        assert left == dict.fromkeys(PER_KEY_TABLES, 0)
        assert len(seen) == 500
        assert len(fences) == KEYS
        assert await backend.footprint() == 0
    finally:
        await gate.aclose()


async def test_the_purge_catches_up_with_a_backlog(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's own purge keeps pace with any rate of new rows: after a full batch,
    the next call purges again (before: one batch per 30 s per process, and supersede rows
    only ever went with a dedup claim)."""
    monkeypatch.setattr(_plan, "PURGE_LIMIT", 100)
    gate = inturn.Gate.from_url(postgres_dsn, namespace=f"pb{secrets.token_hex(3)}")
    backend = gate.backend
    assert isinstance(backend, inturn.PostgresBackend)
    try:
        for i in range(_plan.PURGE_LIMIT * 2 + 50):
            await backend.supersede(f"u{i}", "f", cancel_running=False)
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute("UPDATE inturn.supersede SET expires_at = now() - interval '1 s'")
        backend._plan.next_purge = 0.0  # PURGE_INTERVAL passed
        for i in range(3):  # the first is due by the clock, the others by the backlog
            await backend.supersede(f"v{i}", "f", cancel_running=False)
        assert _rows(postgres_dsn)["supersede"] == 3
    finally:
        await gate.aclose()
