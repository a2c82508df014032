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
