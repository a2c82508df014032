"""PostgreSQL URLs with libpq's defaults: ``postgres://`` alone, or a socket directory."""

from __future__ import annotations

import asyncio

import pytest

import inturn
from inturn._backends.postgres._urls import parse_url
from tests.servers import PostgresServer


@pytest.mark.parametrize(
    ("url", "conninfo"),
    [
        ("postgres://", "postgres://"),
        ("postgresql://", "postgresql://"),
        ("postgresql:///app?host=/run/postgresql", "postgresql:///app?host=%2Frun%2Fpostgresql"),
        ("postgresql:///?schema=turns", "postgresql:///"),
        ("POSTGRESQL://u@h:5/db?sslmode=disable&audit=1", "postgresql://u@h:5/db?sslmode=disable"),
    ],
)
def test_urls_without_host_keep_their_slashes(url: str, conninfo: str) -> None:
    assert parse_url(url)[0] == conninfo


def _turn(url: str) -> int:
    async def main() -> int:
        gate = inturn.Gate.from_url(url)
        try:
            async with gate.turn("k", timeout=10) as turn:
                return turn.fence
        finally:
            await gate.aclose()

    fence = asyncio.run(main())
    gate = inturn.Gate.from_url(url)
    try:
        with gate.turn_sync("k", timeout=10) as turn:
            assert turn.fence > fence
    finally:
        gate.close()
    return fence


def test_bare_url_takes_everything_from_the_environment(
    postgres_server: PostgresServer, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``postgres://`` connects where PGHOST, PGPORT, PGUSER and PGDATABASE say
    (here the server's unix socket directory), as psql would."""
    monkeypatch.setenv("PGHOST", str(postgres_server.dir))
    monkeypatch.setenv("PGPORT", str(postgres_server.port))
    monkeypatch.setenv("PGUSER", "postgres")
    monkeypatch.setenv("PGDATABASE", postgres_dsn.rsplit("/", 1)[1])
    for url in ("postgres://", "postgresql://"):
        assert _turn(url) >= 1


def test_socket_directory_in_the_query(
    postgres_server: PostgresServer, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``postgresql:///dbname?host=/dir``: the database in the path, the socket directory
    in the query, the rest from the environment."""
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.setenv("PGPORT", str(postgres_server.port))
    monkeypatch.setenv("PGUSER", "postgres")
    database = postgres_dsn.rsplit("/", 1)[1]
    assert _turn(f"postgresql:///{database}?host={postgres_server.dir}") >= 1
