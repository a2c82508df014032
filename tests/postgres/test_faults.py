"""A holder whose session the server ended learns it lost the turn; the next waiter goes."""

from __future__ import annotations

import asyncio
import secrets
import time

import psycopg
import pytest

import inturn

from .conftest import advisory_holders, advisory_waiters, until


async def test_terminated_holder_loses_the_turn_and_the_waiter_goes(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """pg_terminate_backend on the holder: the waiter is granted, turn.lost is set by renewal."""
    namespace = f"t{secrets.token_hex(4)}"
    holder_gate = inturn.Gate.from_url(postgres_dsn, namespace=namespace, lease=0.6)
    waiter_gate = inturn.Gate.from_url(postgres_dsn, namespace=namespace, lease=0.6)
    async with holder_gate.turn("k") as turn:
        request = waiter_gate.turn("k", timeout=10)
        waiter = asyncio.ensure_future(request.__aenter__())
        await asyncio.to_thread(until, lambda: advisory_waiters(admin) == 1)
        [pid] = advisory_holders(admin)
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        started = time.monotonic()
        nxt = await asyncio.wait_for(waiter, 5)
        assert time.monotonic() - started < 0.5
        assert nxt.fence > turn.fence
        await asyncio.wait_for(turn.lost.wait(), 2)  # the next renewal (every 0.2 s) finds out
        assert turn.lost_reason == "taken"
        assert not await turn.check()
        assert await nxt.check()
    await request.__aexit__(None, None, None)  # leaving the lost turn raised nothing
    assert await holder_gate.backend.footprint() == 0
    for gate in (holder_gate, waiter_gate):
        await gate.aclose()


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_renew_returns_false_once_the_session_is_gone(
    postgres_dsn: str, admin: psycopg.Connection, mode: str
) -> None:
    """Backend level: renew and is_held say False after the session died; release is quiet."""
    gate = inturn.Gate.from_url(postgres_dsn, namespace=f"r{secrets.token_hex(4)}")
    if mode == "async":
        backend = gate.backend
        grant = await backend.join("k", "tok", 5.0)
        assert grant is not None
        assert await backend.renew("k", "tok", 5.0)
        [pid] = advisory_holders(admin)
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        await asyncio.to_thread(until, lambda: advisory_holders(admin) == [])
        assert not await backend.renew("k", "tok", 5.0)
        assert not await backend.is_held("k", "tok")
        await backend.release("k", "tok")
        assert await backend.footprint() == 0
    else:
        sync = gate.sync_backend

        def run() -> None:
            assert sync.join("k", "tok", 5.0) is not None
            assert sync.renew("k", "tok", 5.0)
            [pid] = advisory_holders(admin)
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            until(lambda: advisory_holders(admin) == [])
            assert not sync.renew("k", "tok", 5.0)
            assert not sync.is_held("k", "tok")
            sync.release("k", "tok")
            assert sync.footprint() == 0

        await asyncio.to_thread(run)
    await gate.aclose()


async def test_an_unreachable_server_raises_backend_unavailable() -> None:
    """A URL nobody listens on gives BackendUnavailable, chained to psycopg's error."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gate = inturn.Gate.from_url(f"postgresql://postgres@127.0.0.1:{port}/x?connect_timeout=1")
    with pytest.raises(inturn.BackendUnavailable) as info:
        async with gate.turn("k", timeout=8):
            pass
    assert info.value.__cause__ is not None
    await gate.aclose()


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_timed_out_head_leaves_the_lock_queue_and_can_wait_again(
    postgres_dsn: str, admin: psycopg.Connection, mode: str
) -> None:
    """Both twins bound the head's lock wait by the server's lock_timeout: after the timeout
    nobody waits in pg_locks, the token keeps its place, and a later wait gets the turn."""
    namespace = f"w{secrets.token_hex(4)}"
    holder = inturn.Gate.from_url(postgres_dsn, namespace=namespace).backend
    waiter = inturn.Gate.from_url(postgres_dsn, namespace=namespace).backend
    assert await holder.join("k", "h", 5.0) is not None
    if mode == "async":
        assert await waiter.join("k", "w", 5.0) is None
        started = time.monotonic()
        assert await waiter.wait("k", "w", 0.3) is None
    else:
        sync = waiter.sync_twin()
        assert await asyncio.to_thread(sync.join, "k", "w", 5.0) is None
        started = time.monotonic()
        assert await asyncio.to_thread(sync.wait, "k", "w", 0.3) is None
    assert 0.25 < time.monotonic() - started < 2.0
    assert advisory_waiters(admin) == 0  # the aborted wait was rolled back
    await holder.release("k", "h")
    if mode == "async":
        grant = await waiter.wait("k", "w", 5)
        assert grant is not None
        await waiter.release("k", "w")
    else:
        assert await asyncio.to_thread(sync.wait, "k", "w", 5) is not None
        await asyncio.to_thread(sync.release, "k", "w")
    assert await waiter.footprint() == 0
    for backend in (holder, waiter):
        await backend.aclose()


async def test_a_cancelled_head_stops_waiting_and_leaves_cleanly(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """Cancelling the task of an async head cancels its lock wait in the server; leave()
    then finds the lock did not come first, and the key is free once the holder goes."""
    namespace = f"c{secrets.token_hex(4)}"
    holder = inturn.Gate.from_url(postgres_dsn, namespace=namespace).backend
    waiter = inturn.Gate.from_url(postgres_dsn, namespace=namespace).backend
    assert await holder.join("k", "h", 5.0) is not None
    assert await waiter.join("k", "w", 5.0) is None
    waiting = asyncio.ensure_future(waiter.wait("k", "w", None))
    await asyncio.to_thread(until, lambda: advisory_waiters(admin) == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert advisory_waiters(admin) == 0
    assert await waiter.leave("k", "w") is None
    await holder.release("k", "h")
    assert not await waiter.is_busy("k")
    assert await waiter.footprint() == 0
    for backend in (holder, waiter):
        await backend.aclose()
