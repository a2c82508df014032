"""`rediss://` and `unix://`: the Redis backend over TLS (against a redis-server that speaks
TLS only) and over a unix socket.

The async backend's pipelined connection writes to redis-py's transport directly, and the
sync twin's threads and the wake-up listeners use redis-py's connections: all must work
over either, from a URL (and over TLS with injected clients too), and keep the contract.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio

import inturn
from inturn.testing import History, check_history
from tests.servers import RedisServer

MakeServer = Callable[..., RedisServer]


async def _contend(gate: inturn.Gate) -> History:
    """8 tasks and 4 threads x 5 turns on 2 keys: in-loop hand-overs, thread hand-overs and
    pushes between the loop and the threads, all over TLS."""
    history = History()

    async def task(n: int) -> None:
        for round_ in range(5):
            async with gate.turn(f"k{(n + round_) % 2}", timeout=30) as turn:
                with history.span(turn, f"task{n}"):
                    await asyncio.sleep(0.002)

    def thread(n: int) -> None:
        for round_ in range(5):
            request = gate.turn_sync(f"k{(n + round_) % 2}", timeout=30)
            with request as turn, history.span(turn, f"thread{n}"):
                threading.Event().wait(0.002)

    threads = [asyncio.to_thread(thread, n) for n in range(4)]
    await asyncio.gather(*(task(n) for n in range(8)), *threads)
    return history


async def test_a_tls_only_server_refuses_plain_connections(make_redis_server: MakeServer) -> None:
    """The fixture's server really speaks TLS only: a plain client cannot talk to it."""
    server = make_redis_server(tls=True)
    assert server.url.startswith("rediss://")
    plain = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            plain.ping()
    finally:
        plain.close()


async def test_rediss_url_keeps_the_contract(make_redis_server: MakeServer) -> None:
    server = make_redis_server(tls=True)
    gate = inturn.Gate.from_url(server.url, namespace=f"tls{secrets.token_hex(4)}")
    try:
        history = await _contend(gate)
        report = check_history(history.spans)
        assert report.spans == 8 * 5 + 4 * 5
        assert await gate.backend.footprint() == 0
    finally:
        await gate.aclose()


async def test_injected_tls_clients_keep_the_contract(make_redis_server: MakeServer) -> None:
    server = make_redis_server(tls=True)
    backend = inturn.RedisBackend(
        redis.asyncio.Redis.from_url(server.url),
        sync_client=redis.Redis.from_url(server.url),
        namespace=f"tls{secrets.token_hex(4)}",
    )
    gate = inturn.Gate(backend)
    try:
        history = await _contend(gate)
        assert check_history(history.spans).spans == 8 * 5 + 4 * 5
        assert await backend.footprint() == 0
    finally:
        await gate.aclose()
        await backend._client.aclose()
        backend._sync_client.close()


async def test_unix_socket_url_keeps_the_contract(
    make_redis_server: MakeServer, tmp_path: Path
) -> None:
    sock = tmp_path / "redis.sock"
    server = make_redis_server({"unixsocket": str(sock), "unixsocketperm": "700"})
    gate = inturn.Gate.from_url(f"unix://{sock}?db=0", namespace=f"unix{secrets.token_hex(4)}")
    try:
        history = await _contend(gate)
        assert check_history(history.spans).spans == 8 * 5 + 4 * 5
        assert await gate.backend.footprint() == 0
        with redis.Redis.from_url(server.url) as admin:  # the gate's connections: the socket's
            on_socket = [c for c in admin.client_list() if c["addr"].startswith(str(sock))]
        assert len(on_socket) >= 2  # the pipelined connection and the wake-up listener
    finally:
        await gate.aclose()
