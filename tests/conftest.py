"""Fixtures that start real servers on free loopback ports; see `tests/servers.py`.

No library imports here: the fixtures hand out URLs and DSNs, and each test builds its own
backend from them. A missing server binary skips the test locally and fails it under `CI=true`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import psycopg
import pytest
import redis
from psycopg import sql

from tests.servers import (
    MissingServerBinary,
    PostgresServer,
    RedisCluster,
    RedisSentinel,
    RedisServer,
)

_T = TypeVar("_T")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def _start_or_skip(start: Callable[[], _T]) -> _T:
    try:
        return start()
    except MissingServerBinary as exc:
        if _in_ci():
            pytest.fail(f"{exc} (CI must have every server)", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One `redis-server` for the session; tests get a clean db through `redis_url`."""
    server = _start_or_skip(lambda: RedisServer().start())
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, FLUSHALLed; revived first if a test killed or paused it."""
    redis_server.resume()
    redis_server.start()
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def make_redis_server() -> Iterator[Callable[..., RedisServer]]:
    """Factory for a private server a test may kill, pause or restart; all stop at teardown."""
    servers: list[RedisServer] = []

    def make(options: Mapping[str, str] | None = None, *, tls: bool = False) -> RedisServer:
        server = _start_or_skip(lambda: RedisServer(options, tls=tls))
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster, started only if a test asks for it."""
    cluster = _start_or_skip(lambda: RedisCluster().start())
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the session."""
    server = _start_or_skip(lambda: PostgresServer().start())
    yield server
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A DSN to a fresh, empty database of its own, dropped (connections and all) afterwards."""
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres_server.dsn_for(name)
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def redis_sentinel(redis_server: RedisServer) -> Iterator[RedisSentinel]:
    """A Sentinel monitoring the session `redis_server` as `mymaster`, started only if asked."""
    sentinel = _start_or_skip(lambda: RedisSentinel(redis_server.port).start())
    yield sentinel
    sentinel.stop()
