"""The first errors a user meets: a server that is not there, or that refuses the login.

Each call fails within its deadline, at once rather than at the deadline, with
BackendUnavailable naming the driver's cause, and many waiting callers make a few
log lines, not one each.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
import redis

import inturn
from tests.errors.conftest import (
    ACL_PASSWORD,
    ACL_USER,
    PG_PASSWORD,
    PG_ROLE,
    REDIS_PASSWORD,
    Loud,
)
from tests.servers import HOST, PostgresServer, RedisServer

DEADLINE = 8.0
"""The callers' timeout: the failures below must come well before it."""
FAST = 4.0
"""Longest time-to-error accepted (at once on an idle machine; slack for a loaded one)."""
TASKS = 20
THREADS = 6
MAX_LOUD = 3
"""WARNING-or-worse records allowed for a whole crowd of failing callers."""


def crowd_async(url: str) -> list[tuple[BaseException | None, float]]:
    """TASKS tasks ask for one key's turn at once; each one's error and time to it."""

    async def main() -> list[tuple[BaseException | None, float]]:
        gate = inturn.Gate.from_url(url)

        async def one() -> tuple[BaseException | None, float]:
            began = time.monotonic()
            try:
                async with gate.turn("user-1", timeout=DEADLINE):
                    pass
            except Exception as exc:
                return exc, time.monotonic() - began
            return None, time.monotonic() - began

        try:
            return await asyncio.gather(*(one() for _ in range(TASKS)))
        finally:
            await gate.aclose()

    return asyncio.run(main())


def crowd_sync(url: str) -> list[tuple[BaseException | None, float]]:
    """THREADS threads ask for one key's turn at once (``turn_sync``)."""
    gate = inturn.Gate.from_url(url)
    results: list[tuple[BaseException | None, float]] = []

    def one() -> None:
        began = time.monotonic()
        try:
            with gate.turn_sync("user-1", timeout=DEADLINE):
                pass
        except Exception as exc:
            results.append((exc, time.monotonic() - began))
            return
        results.append((None, time.monotonic() - began))

    threads = [threading.Thread(target=one) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE + 10)
    gate.close()
    return results


CROWDS: dict[str, Callable[[str], list[tuple[BaseException | None, float]]]] = {
    "async": crowd_async,
    "sync": crowd_sync,
}


def check(
    results: list[tuple[BaseException | None, float]],
    loud: Loud,
    *causes: str,
    transient: bool | None = None,
) -> None:
    """Every caller failed fast with BackendUnavailable naming one of ``causes``, and the
    crowd logged at most MAX_LOUD WARNINGs."""
    assert results
    for exc, elapsed in results:
        assert isinstance(exc, inturn.BackendUnavailable), repr(exc)
        assert any(cause in str(exc) for cause in causes), str(exc)
        assert elapsed < FAST, f"{elapsed:.2f}s to fail: {exc}"
        if transient is not None:
            assert exc.transient is transient, str(exc)
    time.sleep(0.3)  # background cleanups end and log, if they do
    assert len(loud.records) <= MAX_LOUD, loud.lines()


# -- nobody listens, or the host does not exist -------------------------------------------


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_redis_refused_port(closed_port: int, loud: Loud, mode: str) -> None:
    results = CROWDS[mode](f"redis://{HOST}:{closed_port}/0")
    check(results, loud, "onnection refused")


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_postgres_refused_port(closed_port: int, loud: Loud, mode: str) -> None:
    results = CROWDS[mode](f"postgresql://postgres@{HOST}:{closed_port}/postgres")
    check(results, loud, "Connection refused")


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_redis_unknown_host(loud: Loud, mode: str) -> None:
    results = CROWDS[mode]("redis://nonexistent.invalid:6379/0")
    check(results, loud, "Name or service not known", "nodename nor servname", transient=False)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_postgres_unknown_host(loud: Loud, mode: str) -> None:
    results = CROWDS[mode]("postgresql://postgres@nonexistent.invalid/postgres")
    check(results, loud, "Name or service not known", "nodename nor servname", transient=False)


# -- Redis refuses the login ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_redis_wrong_password(locked_redis: RedisServer, loud: Loud, mode: str) -> None:
    results = CROWDS[mode](f"redis://:wrong@{HOST}:{locked_redis.port}/0")
    check(results, loud, "WRONGPASS", transient=False)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_redis_missing_password(locked_redis: RedisServer, loud: Loud, mode: str) -> None:
    results = CROWDS[mode](f"redis://{HOST}:{locked_redis.port}/0")
    check(results, loud, "NOAUTH", transient=False)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_redis_acl_user_wrong_password(locked_redis: RedisServer, loud: Loud, mode: str) -> None:
    results = CROWDS[mode](f"redis://{ACL_USER}:wrong@{HOST}:{locked_redis.port}/0")
    check(results, loud, "WRONGPASS", transient=False)


def test_redis_right_passwords_work(locked_redis: RedisServer) -> None:
    """The fixture is sound: the right password and the ACL user get turns."""
    for auth in (f":{REDIS_PASSWORD}", f"{ACL_USER}:{ACL_PASSWORD}"):
        url = f"redis://{auth}@{HOST}:{locked_redis.port}/0"
        for exc, _ in crowd_async(url) + crowd_sync(url):
            assert exc is None, repr(exc)


def test_redis_login_fixed_meanwhile(locked_redis: RedisServer) -> None:
    """A gate whose login was refused gets in once the server takes its password: the
    next call tries again at once (no stale error, no backoff to sit out)."""
    new = "new-password"

    async def main() -> None:
        gate = inturn.Gate.from_url(f"redis://:{new}@{HOST}:{locked_redis.port}/0")
        try:
            with pytest.raises(inturn.BackendUnavailable, match="WRONGPASS"):
                async with gate.turn("k", timeout=DEADLINE):
                    pass
            with redis.Redis(host=HOST, port=locked_redis.port, password=REDIS_PASSWORD) as c:
                c.config_set("requirepass", new)
            try:
                began = time.monotonic()
                async with gate.turn("k", timeout=DEADLINE) as turn:
                    assert turn.fence >= 1
                assert time.monotonic() - began < FAST
            finally:
                with redis.Redis(host=HOST, port=locked_redis.port, password=new) as c:
                    c.config_set("requirepass", REDIS_PASSWORD)
        finally:
            await gate.aclose()

    asyncio.run(main())


# -- PostgreSQL refuses the login -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_postgres_unknown_role(postgres_server: PostgresServer, loud: Loud, mode: str) -> None:
    """(On a server that trusts every login, so that it says the role is not there.)"""
    results = CROWDS[mode](f"postgresql://nosuch@{HOST}:{postgres_server.port}/postgres")
    check(results, loud, 'role "nosuch" does not exist', transient=False)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_postgres_missing_password(locked_postgres: PostgresServer, loud: Loud, mode: str) -> None:
    results = CROWDS[mode](f"postgresql://{PG_ROLE}@{HOST}:{locked_postgres.port}/postgres")
    check(results, loud, "no password supplied", transient=False)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_postgres_wrong_password(locked_postgres: PostgresServer, loud: Loud, mode: str) -> None:
    url = f"postgresql://{PG_ROLE}:wrong@{HOST}:{locked_postgres.port}/postgres"
    results = CROWDS[mode](url)
    check(results, loud, f'password authentication failed for user "{PG_ROLE}"', transient=False)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_postgres_unknown_database(locked_postgres: PostgresServer, loud: Loud, mode: str) -> None:
    results = CROWDS[mode](f"postgresql://postgres@{HOST}:{locked_postgres.port}/nosuchdb")
    check(results, loud, 'database "nosuchdb" does not exist', transient=False)


def test_postgres_right_password_works(locked_postgres: PostgresServer) -> None:
    """The fixture is sound: the role gets turns with its password (once it may create
    inturn's schema)."""
    with psycopg.connect(locked_postgres.dsn, autocommit=True) as conn:
        conn.execute(f"GRANT CREATE ON DATABASE postgres TO {PG_ROLE}")
    url = f"postgresql://{PG_ROLE}:{PG_PASSWORD}@{HOST}:{locked_postgres.port}/postgres"
    for exc, _ in crowd_async(url) + crowd_sync(url):
        assert exc is None, repr(exc)


def test_postgres_role_created_meanwhile(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    """A gate whose role did not exist gets in once it does: the next call tries again."""
    role = f"late_{secrets.token_hex(4)}"
    url = postgres_dsn.replace("postgresql://postgres@", f"postgresql://{role}@")

    async def main() -> None:
        gate = inturn.Gate.from_url(url)
        try:
            with pytest.raises(inturn.BackendUnavailable, match=f'role "{role}" does not exist'):
                async with gate.turn("k", timeout=DEADLINE):
                    pass
            with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
                conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
            began = time.monotonic()
            async with gate.turn("k", timeout=DEADLINE) as turn:
                assert turn.fence >= 1
            assert time.monotonic() - began < FAST
        finally:
            await gate.aclose()

    asyncio.run(main())


# -- a server that answered before and then went away ---------------------------------------


@pytest.mark.parametrize("engine", ["redis", "postgres"])
def test_outage_after_contact_is_ridden_out_to_the_deadline(
    make_redis_server: Callable[..., RedisServer],
    postgres_server: PostgresServer,
    loud: Loud,
    engine: str,
) -> None:
    """A server that answered once and then died: waiters ride it out (a failover may
    be under way) but never past their deadline, and the crowd logs a few lines."""
    deadline = 2.0
    if engine == "redis":
        server: RedisServer | PostgresServer = make_redis_server()
        url = f"redis://{HOST}:{server.port}/0"
    else:
        server = PostgresServer().start()
        url = server.dsn

    async def main() -> list[tuple[BaseException | None, float]]:
        gate = inturn.Gate.from_url(url)
        try:
            async with gate.turn("k", timeout=DEADLINE):
                pass
            server.kill()

            async def one() -> tuple[BaseException | None, float]:
                began = time.monotonic()
                try:
                    async with gate.turn("k", timeout=deadline):
                        pass
                except Exception as exc:
                    return exc, time.monotonic() - began
                return None, time.monotonic() - began

            return await asyncio.gather(*(one() for _ in range(TASKS)))
        finally:
            await gate.aclose()

    try:
        results = asyncio.run(main())
    finally:
        server.stop()
    # On PostgreSQL only the head of a key's line in this process talks to the server; the
    # callers behind it share its outcome.
    for exc, elapsed in results:
        assert isinstance(exc, inturn.BackendUnavailable), repr(exc)
        assert elapsed < deadline + 2.0, f"{elapsed:.2f}s"
    assert any(isinstance(exc, inturn.BackendUnavailable) for exc, _ in results)
    time.sleep(0.3)
    ours = [r for r in loud.records if r.name.startswith("inturn")]
    assert len(ours) <= MAX_LOUD, loud.lines()
    # psycopg's pool logs each of its own reconnection attempts (about one a second).
    assert len(loud.records) <= MAX_LOUD + 5, loud.lines()
