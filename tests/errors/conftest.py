"""Servers that refuse the caller: a Redis with a password and an ACL user, a PostgreSQL
that asks for passwords, a closed port. Each test builds its gate from the URLs here."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import psycopg
import pytest
import redis

from tests.conftest import _start_or_skip
from tests.servers import HOST, PostgresServer, RedisServer

REDIS_PASSWORD = "right-password"
ACL_USER, ACL_PASSWORD = "alice", "alice-password"
PG_ROLE, PG_PASSWORD = "app", "app-password"


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: bound once, then closed."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[RedisServer]:
    """A Redis that wants a password (``requirepass``) and knows an ACL user ``alice``."""
    server = _start_or_skip(lambda: RedisServer().start())
    with redis.Redis(host=HOST, port=server.port) as client:
        client.execute_command(
            "ACL", "SETUSER", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"
        )
        client.config_set("requirepass", REDIS_PASSWORD)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def locked_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL that asks every role but ``postgres`` for its password over TCP, and
    has a role ``app`` with a password."""

    def start() -> PostgresServer:
        server = PostgresServer()
        hba = server.dir / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            f"host all postgres {HOST}/32 trust\n"
            f"host all all {HOST}/32 scram-sha-256\n"
        )
        hba.chmod(0o644)
        server.settings["hba_file"] = str(hba)
        return server.start()

    server = _start_or_skip(start)
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {PG_ROLE} LOGIN PASSWORD '{PG_PASSWORD}'")
    yield server
    server.stop()


class Loud(logging.Handler):
    """Collects the WARNING-or-worse records of every logger (inturn's and the drivers')."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records]


@pytest.fixture
def loud() -> Iterator[Loud]:
    handler = Loud()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
