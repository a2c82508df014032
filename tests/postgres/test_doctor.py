"""statistics(), diagnose() and schema upgrades of the PostgreSQL engine, against a real server."""

from __future__ import annotations

import asyncio
import secrets
import time

import psycopg
import psycopg.conninfo
from psycopg import sql

from inturn._backends.postgres import PostgresBackend, _schema, _sql
from inturn._backends.postgres._sql import key_hash

from .conftest import advisory_waiters, until


def _create_schema(admin: psycopg.Connection, schema: str, up_to: int) -> None:
    """The schema as inturn left it at version ``up_to`` (its migrations, unchanged since)."""
    admin.execute(_sql.render(_schema.MIGRATE_BEGIN, schema=schema, lock=_schema.MIGRATION_LOCK))
    for version in range(1, up_to + 1):
        admin.execute(_sql.render(_schema.MIGRATIONS[version], schema=schema))
        admin.execute(_sql.render(_schema.MIGRATE_DONE, schema=schema, version=version))
    admin.execute("COMMIT")


async def test_migrate_upgrades_a_version_3_schema(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """A v3 schema (retry time as "nb" in the message JSON) migrates to v4: the time moves to
    its column, the old functions go, and take honours the moved time."""
    _create_schema(admin, "inturn", 3)
    namespace = f"m{secrets.token_hex(4)}"
    later = time.time() + 60
    admin.execute(
        "INSERT INTO inturn.mb_messages (namespace, mailbox, key, seq, body) VALUES"
        " (%(ns)s, 'box', 'u', -2, %(retried)s), (%(ns)s, 'box', 'u', -1, 'not json \"nb\"'),"
        " (%(ns)s, 'box', 'u', 1, '{\"n\": 2}')",
        {"ns": namespace, "retried": f'{{"n": 1, "nb": {later}}}'},
    )
    backend = PostgresBackend(conninfo=postgres_dsn, namespace=namespace)
    old = await backend.diagnose()
    [schema] = [f for f in old.findings if f.check == "schema"]
    assert schema.level == "error"
    assert "schema version 3" in schema.message
    assert "inturn migrate" in schema.message
    await backend.migrate()
    assert (await backend.diagnose()).ok
    versions = admin.execute("SELECT version FROM inturn.migrations ORDER BY 1").fetchall()
    assert versions == [(v,) for v in range(1, _schema.SCHEMA_VERSION + 1)]
    rows = admin.execute("SELECT seq, not_before FROM inturn.mb_messages ORDER BY seq").fetchall()
    assert rows == [(-2, later), (-1, 0.0), (1, 0.0)]
    functions = admin.execute(
        "SELECT proname, pronargs FROM pg_proc WHERE pronamespace = 'inturn'::regnamespace"
        " AND proname LIKE 'mb_%' ORDER BY 1"
    ).fetchall()
    assert functions == [("mb_resume", 6), ("mb_retry", 7), ("mb_submit", 11), ("mb_take", 9)]
    assert await backend.mb_resume("box", "u", "s", lease=5) == 1
    taken = await backend.mb_take("box", "u", "s", limit=5, lease=5, ack=False)
    assert 59 < taken.retry_in <= 60
    await backend.migrate()  # idempotent
    await backend.aclose()


async def test_statistics_name_busy_keys_boxes_and_dead_letters(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """A held key with a waiter of another process and one local waiter; a queue with one
    message in flight; dead letters. Each process reports what it can know."""
    namespace = f"st{secrets.token_hex(4)}"
    holder, other, outsider = (
        PostgresBackend(conninfo=postgres_dsn, namespace=namespace) for _ in range(3)
    )
    grant = await holder.join("k", "h", 5.0)
    assert grant is not None
    assert await other.join("k", "w1", 5.0) is None  # the head of `other`'s line
    head = asyncio.ensure_future(other.wait("k", "w1", 10))
    await asyncio.to_thread(until, lambda: advisory_waiters(admin) == 1)
    assert await other.join("k", "w2", 5.0) is None  # waits in `other`'s own line
    for text in ("a", "b"):
        await holder.mb_submit(
            "box", "u", text, max_pending=10, drop_oldest=False, token="d", lease=5
        )
    await holder.mb_take("box", "u", "d", limit=1, lease=5, ack=False)
    await holder.mb_dead("box", ["x", "y"])

    mine = await holder.statistics()
    assert mine.namespace == namespace
    [key] = mine.keys
    assert (key.key, key.holder, key.fence, key.waiting) == ("k", "h", grant.fence, 1)
    [box] = mine.boxes
    assert (box.mailbox, box.key, box.queued, box.in_flight, box.draining) == (
        "box",
        "u",
        1,
        1,
        True,
    )
    assert mine.dead_letters == {"box": 2}
    assert not mine.truncated
    [theirs] = (await other.statistics()).keys
    assert (theirs.key, theirs.holder, theirs.waiting) == ("k", None, 2)  # its head counts once
    [unnamed] = (await outsider.statistics()).keys
    assert unnamed.key == f"#{key_hash(namespace, 'k')}"  # no line here, no audit row
    assert unnamed.waiting == 1
    [named] = (await outsider.statistics("k")).keys
    assert named.key == "k"
    assert (await outsider.statistics("other")).keys == ()
    assert (await holder.statistics(limit=0)).truncated

    await holder.release("k", "h")
    assert await asyncio.wait_for(head, 5) is not None
    await other.release("k", "w1")
    assert await other.wait("k", "w2", 5) is not None
    await other.release("k", "w2")
    assert (await holder.statistics()).keys == ()
    for backend in (holder, other, outsider):
        await backend.aclose()


def test_diagnose_finds_the_schema_missing_then_current(postgres_dsn: str) -> None:
    """A fresh database: an error naming `inturn migrate`; after migrate, all ok."""
    backend = PostgresBackend(conninfo=postgres_dsn.replace("@", ":secret@", 1))
    sync = backend.sync_twin()
    before = sync.diagnose()
    assert not before.ok
    assert before.backend == "postgresql"
    assert before.topology == "standalone"
    assert "secret" not in before.server
    assert ":***@" in before.server
    assert before.version is not None
    assert before.facts["server_version"] == before.version
    assert "statement_timeout" in before.facts
    assert "idle_in_transaction_session_timeout" in before.facts
    [schema] = [f for f in before.findings if f.check == "schema"]
    assert schema.level == "error"
    assert "inturn migrate" in schema.message
    sync.migrate()
    after = sync.diagnose()
    assert after.ok, after.findings
    assert after.facts["schema_version"] == str(_schema.SCHEMA_VERSION)
    assert {f.check for f in after.findings} >= {"version", "schema", "rights"}
    sync.close()


async def test_diagnose_names_the_grant_a_role_lacks(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """A role that may not use the schema gets an error that names the GRANT to run; a short
    role-level statement_timeout is reported, not a warning (turns set their own)."""
    owner = PostgresBackend(conninfo=postgres_dsn)
    await owner.migrate()
    await owner.aclose()
    role = f"r_{secrets.token_hex(4)}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    admin.execute(
        sql.SQL("ALTER ROLE {} SET statement_timeout = '5s'").format(sql.Identifier(role))
    )
    try:
        conninfo = psycopg.conninfo.make_conninfo(postgres_dsn, user=role)
        found = await PostgresBackend(conninfo=conninfo).diagnose()
        assert not found.ok
        [rights] = [f for f in found.findings if f.check == "rights"]
        assert rights.level == "error"
        assert f"GRANT USAGE ON SCHEMA inturn TO {role}" in rights.message
        [timeout] = [f for f in found.findings if f.check == "statement_timeout"]
        assert timeout.level == "ok"
        assert "sets its own" in timeout.message
        assert found.facts["statement_timeout"] == "5s"
    finally:
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
