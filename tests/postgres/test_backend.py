"""Configuration, the schema, key hashing and connection use of the PostgreSQL backend."""

from __future__ import annotations

import asyncio
import secrets
import threading

import psycopg
import pytest

import inturn
from inturn._backends.postgres import PostgresBackend, _schema
from inturn._backends.postgres._sql import key_hash
from inturn._backends.postgres._urls import parse_url as _parse_url
from inturn.testing import History, check_history


def test_key_hash_is_stable_and_64_bit() -> None:
    """The lock id never changes between releases or processes, and spreads namespaces."""
    assert key_hash("default", "user:1") == key_hash("default", "user:1")
    assert key_hash("default", "user:1") == -3668464350072286376
    assert key_hash("a", "bc") != key_hash("ab", "c")
    for key in ("", "x" * 1024, "é", "\n"):
        assert -(2**63) <= key_hash("ns", key) < 2**63


def test_url_options_are_ours_the_rest_is_libpq() -> None:
    """audit, schema and max_connections are taken out of the URL; bad values are refused."""
    conninfo, options = _parse_url("postgresql://u@h:5/db?audit=1&schema=turns&sslmode=disable")
    assert options == {"audit": True, "schema": "turns"}
    assert conninfo == "postgresql://u@h:5/db?sslmode=disable"
    with pytest.raises(inturn.ConfigurationError):
        _parse_url("postgresql://h/db?audit=maybe")
    with pytest.raises(inturn.ConfigurationError):
        PostgresBackend(conninfo="postgresql://h/db", schema="Bad-Name")
    assert isinstance(inturn.Gate.from_url("postgres://h/db").backend, inturn.PostgresBackend)


def test_migrate_is_idempotent_and_safe_to_race(postgres_dsn: str) -> None:
    """Eight threads migrating one fresh database at once all succeed; the schema exists once."""
    errors: list[BaseException] = []

    def migrate() -> None:
        backend = PostgresBackend(conninfo=postgres_dsn, schema="audit_x")
        try:
            backend.sync_twin().migrate()
            backend.sync_twin().migrate()
        except BaseException as exc:
            errors.append(exc)
        finally:
            backend.sync_twin().close()

    threads = [threading.Thread(target=migrate) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute("SELECT version FROM audit_x.migrations").fetchall()
    assert sorted(rows) == [(v,) for v in range(1, _schema.SCHEMA_VERSION + 1)]


async def test_400_waiters_in_one_process_use_two_connections(postgres_dsn: str) -> None:
    """400 waiters of one key: served in order, while at most two sessions hold or wait."""
    namespace = f"many{secrets.token_hex(4)}"
    gate = inturn.Gate.from_url(postgres_dsn, namespace=namespace)
    history = History()

    async def one(i: int) -> None:
        async with gate.turn("hot", timeout=60) as turn:
            with history.span(turn, f"w{i}"):
                await asyncio.sleep(0)

    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        async with gate.turn("hot"):
            tasks = [asyncio.ensure_future(one(i)) for i in range(400)]
            await asyncio.sleep(0.3)
            sessions = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                [f"inturn:{namespace}"],
            ).fetchone()
            connections = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            ).fetchone()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    check_history(history.spans)
    assert len(history.spans) == 400
    assert sessions == (2,)  # the holder and the head of the line
    assert connections is not None
    assert connections[0] <= 4  # those two, and the pool's idle spare(s)
    assert await gate.backend.footprint() == 0
    await gate.aclose()


async def test_fences_survive_a_server_restart(postgres_dsn: str, postgres_server) -> None:  # type: ignore[no-untyped-def]
    """The fence sequence outlives a restart of PostgreSQL: later fences are larger."""
    gate = inturn.Gate.from_url(postgres_dsn, namespace=f"f{secrets.token_hex(4)}")
    async with gate.turn("k") as first:
        pass
    await gate.aclose()
    await asyncio.to_thread(postgres_server.restart)
    gate = inturn.Gate.from_url(postgres_dsn, namespace=f"f{secrets.token_hex(4)}")
    async with gate.turn("k") as second:
        pass
    assert second.fence > first.fence
    await gate.aclose()
