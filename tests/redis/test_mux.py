"""The backend's own script connections (inturn._backends.redis._mux) against a real redis-server.

Mux (async): one connection carries every script call of a loop, in order; a cancelled
caller does not poison it; a dropped connection is retried on a new one; a silent server
fails calls by the watchdog; and a failed connect is not retried inside the call.
SyncMux (threads): a bounded stack of connections; a dropped one is replaced, a timed-out
read is not retried, and a forked child leaves the parent's connections alone.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from collections.abc import Callable

import pytest
import redis
import redis.asyncio

import inturn
from inturn._backends.redis._mux import Mux, sha1
from inturn._backends.redis._mux_sync import SyncMux
from inturn.testing import History, check_history
from tests.servers import RedisServer

ECHO = "return ARGV[1]"
SLEEP = (
    "local t = redis.call('TIME'); while true do local n = redis.call('TIME'); "
    "if (n[1] - t[1]) * 1000000 + n[2] - t[2] > tonumber(ARGV[1]) then return 'slept' end end"
)

MakeServer = Callable[..., RedisServer]


def _mux(url: str, timeout: float = 5.0) -> tuple[Mux, redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(url)
    return Mux(client.connection_pool, timeout=timeout), client


async def _echo(mux: Mux, value: str) -> bytes:
    result: bytes = await mux.evalsha(sha1(ECHO), ECHO, [], [value])
    return result


def _script_clients(url: str) -> list[str]:
    """The ids of the connections whose last command was a script call."""
    admin = redis.Redis.from_url(url)
    try:
        return [c["id"] for c in admin.client_list() if c["cmd"] in ("evalsha", "eval")]
    finally:
        admin.close()


async def test_many_concurrent_calls_share_one_connection_and_keep_their_order(
    make_redis_server: MakeServer,
) -> None:
    """1,000 concurrent calls of one loop: every reply reaches its own caller, on one socket."""
    redis_url = make_redis_server().url  # its connections are counted: a server of its own
    mux, client = _mux(redis_url)
    try:
        values = [f"v{i}-{secrets.token_hex(2)}" for i in range(1000)]
        replies = await asyncio.gather(*(_echo(mux, v) for v in values))
        assert [r.decode() for r in replies] == values
        assert len(_script_clients(redis_url)) == 1
    finally:
        await mux.aclose()
        await client.aclose()


async def test_a_cancelled_call_does_not_poison_the_connection(
    make_redis_server: MakeServer,
) -> None:
    """A caller cancelled while its script runs: its late reply is dropped, not handed on."""
    redis_url = make_redis_server().url  # its connections are counted: a server of its own
    mux, client = _mux(redis_url)
    try:
        await _echo(mux, "warm")
        before = _script_clients(redis_url)
        slow = asyncio.ensure_future(mux.evalsha(sha1(SLEEP), SLEEP, [], [200_000]))
        await asyncio.sleep(0.05)
        slow.cancel()
        after = await asyncio.gather(*(_echo(mux, f"after{i}") for i in range(5)))
        assert [a.decode() for a in after] == [f"after{i}" for i in range(5)]
        assert _script_clients(redis_url) == before  # the same connection, not a new one
    finally:
        await mux.aclose()
        await client.aclose()


async def test_a_killed_connection_is_replaced(make_redis_server: MakeServer) -> None:
    """CLIENT KILL on the script connection: later calls succeed on a new connection."""
    redis_url = make_redis_server().url  # its connections are counted: a server of its own
    mux, client = _mux(redis_url)
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        await _echo(mux, "warm")
        killed = [c["id"] for c in await admin.client_list() if c["cmd"] in ("evalsha", "eval")]
        assert len(killed) == 1
        await admin.client_kill_filter(_id=killed[0])
        replies = await asyncio.gather(*(_echo(mux, f"later{i}") for i in range(20)))
        assert [r.decode() for r in replies] == [f"later{i}" for i in range(20)]
        now = [c["id"] for c in await admin.client_list() if c["cmd"] in ("evalsha", "eval")]
        assert len(now) == 1
        assert now != killed
    finally:
        await mux.aclose()
        await client.aclose()
        await admin.aclose()


async def test_a_silent_server_fails_calls_by_the_watchdog(make_redis_server: MakeServer) -> None:
    """A paused server: every call in flight fails with TimeoutError near `timeout`."""
    server = make_redis_server()
    mux, client = _mux(server.url, timeout=1.0)
    try:
        await _echo(mux, "warm")
        server.pause()
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(_echo(mux, str(i)) for i in range(10)), return_exceptions=True
        )
        took = time.monotonic() - started
        assert all(isinstance(o, redis.exceptions.TimeoutError) for o in outcomes), outcomes
        assert 0.9 <= took <= 2.5, took  # timeout + at most one watchdog period (1 s)
        server.resume()
        assert await _echo(mux, "back") == b"back"
    finally:
        server.resume()
        await mux.aclose()
        await client.aclose()


async def test_a_refused_connect_fails_at_once(make_redis_server: MakeServer) -> None:
    """No server: the call fails in one connect attempt, not after a retry schedule."""
    server = make_redis_server()
    url = server.url
    server.kill()
    mux, client = _mux(url)
    try:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError):
            await _echo(mux, "x")
        assert time.monotonic() - started < 0.2
    finally:
        await mux.aclose()
        await client.aclose()


async def test_calls_after_aclose_fail(redis_url: str) -> None:
    mux, client = _mux(redis_url)
    try:
        await _echo(mux, "warm")
        await mux.aclose()
        with pytest.raises(redis.exceptions.ConnectionError, match="closed"):
            await _echo(mux, "x")
    finally:
        await client.aclose()


async def test_a_gate_uses_one_script_connection_for_400_waiters(
    make_redis_server: MakeServer,
) -> None:
    """400 tasks of one loop contend on 8 keys: one script connection, a correct history."""
    redis_url = make_redis_server().url  # its connections are counted: a server of its own
    gate = inturn.Gate.from_url(redis_url, namespace=f"mux{secrets.token_hex(4)}")
    history = History()

    async def one(i: int) -> None:
        async with gate.turn(f"k{i % 8}", timeout=30) as turn:
            with history.span(turn):
                await asyncio.sleep(0)

    try:
        await asyncio.gather(*(one(i) for i in range(400)))
        assert check_history(history.spans).spans == 400
        assert len(_script_clients(redis_url)) == 1
        assert await gate.backend.footprint() == 0
    finally:
        await gate.aclose()


async def test_held_commands_leave_in_order_and_aclose_waits_for_their_replies(
    redis_url: str,
) -> None:
    """A command held to the end of the loop step keeps its place before later commands,
    and closing right after sending it still lets its reply arrive."""
    mux, client = _mux(redis_url)
    try:
        await _echo(mux, "connect")
        held = mux.submit(sha1(ECHO), [], ["held"], hold=True)
        later = mux.submit(sha1(ECHO), [], ["later"])
        assert held is not None
        assert later is not None
        assert not held.done()
        assert await later == b"later"
        assert held.done()
        assert held.result() == b"held"
        last = mux.submit(sha1(ECHO), [], ["last"], hold=True)
        assert last is not None
        await mux.aclose()
        assert last.result() == b"last"
    finally:
        await mux.aclose()
        await client.aclose()


async def test_submit_needs_a_connection(redis_url: str) -> None:
    """submit() sends on an open connection only; before the first call it says so (None)."""
    mux, client = _mux(redis_url)
    try:
        assert mux.submit(sha1(ECHO), [], ["x"]) is None
        await _echo(mux, "connect")
        reply = mux.submit(sha1(ECHO), [], ["x"])
        assert reply is not None
        assert await reply == b"x"
    finally:
        await mux.aclose()
        await client.aclose()


async def test_calls_made_while_connecting_leave_in_call_order(redis_url: str) -> None:
    """Calls made before and after the connection is up reach the server in the order they
    were made (a loop's JOINs must: its line is built in that order)."""
    push = "return redis.call('RPUSH', KEYS[1], ARGV[1])"
    client = redis.asyncio.Redis.from_url(redis_url)
    mux = Mux(client.connection_pool, timeout=5.0, preload=[push])  # no NOSCRIPT detour
    key = f"order:{secrets.token_hex(4)}"
    try:
        calls = []
        for i in range(200):
            calls.append(asyncio.ensure_future(mux.evalsha(sha1(push), push, [key], [str(i)])))
            if i % 5 == 0:
                await asyncio.sleep(0)  # some calls come once the connection is up
        await asyncio.gather(*calls)
        assert [int(v) for v in await client.lrange(key, 0, -1)] == list(range(200))
    finally:
        await client.delete(key)
        await mux.aclose()
        await client.aclose()


# -- SyncMux: the sync twin's connections ---------------------------------------------------


def _sync_mux(url: str, size: int = 4, socket_timeout: float = 5.0) -> tuple[SyncMux, redis.Redis]:
    client = redis.Redis.from_url(url, socket_timeout=socket_timeout)
    return SyncMux(client.connection_pool, size=size, wait=5.0), client


def _sync_echo(mux: SyncMux, value: str) -> bytes:
    result: bytes = mux.evalsha(sha1(ECHO), ECHO, [], [value])
    return result


def test_sync_mux_shares_a_bounded_stack_of_connections(make_redis_server: MakeServer) -> None:
    """32 threads x 50 calls on a stack of 4: every reply reaches its own caller, and the
    server never sees more than 4 script connections."""
    redis_url = make_redis_server().url  # its connections are counted: a server of its own
    mux, client = _sync_mux(redis_url, size=4)
    wrong: list[tuple[str, bytes]] = []

    def worker(n: int) -> None:
        for i in range(50):
            value = f"t{n}-{i}"
            reply = _sync_echo(mux, value)
            if reply != value.encode():
                wrong.append((value, reply))

    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert wrong == []
        assert 1 <= len(_script_clients(redis_url)) <= 4
    finally:
        mux.close()
        client.close()


def test_sync_mux_replaces_a_killed_connection(make_redis_server: MakeServer) -> None:
    redis_url = make_redis_server().url
    mux, client = _sync_mux(redis_url, size=1)
    try:
        _sync_echo(mux, "warm")
        killed = _script_clients(redis_url)
        assert len(killed) == 1
        client.client_kill_filter(_id=killed[0])
        assert _sync_echo(mux, "later") == b"later"  # retried on a new connection
        now = _script_clients(redis_url)
        assert len(now) == 1
        assert now != killed
    finally:
        mux.close()
        client.close()


def test_sync_mux_gives_up_on_a_paused_server_at_the_socket_timeout(
    make_redis_server: MakeServer,
) -> None:
    """A read that times out is not retried: the call fails after one socket timeout."""
    server = make_redis_server()
    mux, client = _sync_mux(server.url, socket_timeout=0.5)
    try:
        _sync_echo(mux, "warm")
        server.pause()
        started = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            _sync_echo(mux, "x")
        took = time.monotonic() - started
        assert 0.4 <= took <= 1.0, took
        server.resume()
        assert _sync_echo(mux, "back") == b"back"
    finally:
        server.resume()
        mux.close()
        client.close()


def test_sync_mux_after_fork_leaves_the_parents_connections_alone(
    make_redis_server: MakeServer,
) -> None:
    """A forked child (a Celery prefork worker, say) makes its own connections; the
    parent's stays open and in use after the child exits (the same connection, not a
    retry on a new one)."""
    redis_url = make_redis_server().url  # its connections are counted: a server of its own
    mux, client = _sync_mux(redis_url, size=2)
    try:
        assert _sync_echo(mux, "parent") == b"parent"
        before = _script_clients(redis_url)
        pid = os.fork()
        if pid == 0:  # the child: report by exit status only
            code = 0
            try:
                code = 0 if _sync_echo(mux, "child") == b"child" else 1
                if len(_script_clients(redis_url)) != 2:  # the parent's and its own
                    code = 3
                mux.close()
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _sync_echo(mux, "parent again") == b"parent again"
        assert _script_clients(redis_url) == before
    finally:
        mux.close()
        client.close()


def test_sync_mux_calls_after_close_fail(redis_url: str) -> None:
    mux, client = _sync_mux(redis_url)
    try:
        _sync_echo(mux, "warm")
        mux.close()
        with pytest.raises(redis.exceptions.ConnectionError, match="closed"):
            _sync_echo(mux, "x")
    finally:
        client.close()
