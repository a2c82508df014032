"""A server that answered and then went away: only the head of a key's line in this process
talks to it, and every waiter behind the head shares the head's outcome: BackendUnavailable
at the deadline of a long outage, the turn (in line order) after a short one."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg

import inturn
from tests.servers import PostgresServer

WAITERS = 8
DEADLINE = 2.0


async def test_every_waiter_of_a_key_reports_a_dead_server() -> None:
    """After first contact the server is killed: each of the key's waiters raises
    BackendUnavailable by its deadline (before: only the head did; the others raised
    TurnTimeout, as if the key were merely busy)."""
    with PostgresServer() as server:
        gate = inturn.Gate.from_url(server.dsn, namespace="dead")
        async with gate.turn("k", timeout=10):
            pass
        await asyncio.to_thread(server.kill)

        async def one() -> tuple[BaseException | None, float]:
            began = time.monotonic()
            try:
                async with gate.turn("k", timeout=DEADLINE):
                    pass
            except Exception as exc:
                return exc, time.monotonic() - began
            return None, time.monotonic() - began

        results = await asyncio.gather(*(one() for _ in range(WAITERS)))
        for exc, elapsed in results:
            assert isinstance(exc, inturn.BackendUnavailable), repr(exc)
            assert "Connection refused" in str(exc) or "did not answer" in str(exc), str(exc)
            assert elapsed < DEADLINE + 1.5, f"{elapsed:.2f}s"
        await gate.aclose()


def test_every_waiting_thread_of_a_key_reports_a_dead_server() -> None:
    """The same for threads (the sync twin)."""
    with PostgresServer() as server:
        gate = inturn.Gate.from_url(server.dsn, namespace="dead")
        with gate.turn_sync("k", timeout=10):
            pass
        server.kill()
        results: list[tuple[BaseException | None, float]] = []
        lock = threading.Lock()

        def one() -> None:
            began = time.monotonic()
            error: BaseException | None = None
            try:
                with gate.turn_sync("k", timeout=DEADLINE):
                    pass
            except Exception as exc:
                error = exc
            with lock:
                results.append((error, time.monotonic() - began))

        threads = [threading.Thread(target=one) for _ in range(WAITERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(results) == WAITERS
        for exc, elapsed in results:
            assert isinstance(exc, inturn.BackendUnavailable), repr(exc)
            assert elapsed < DEADLINE + 1.5, f"{elapsed:.2f}s"
        gate.close()


async def test_every_waiter_rides_out_a_short_outage_in_line_order() -> None:
    """The server is down for a moment while a key's waiters queue: the head's tries fail
    and the others hear of it, yet all of them ride the outage out and get the turn once
    the server is back, in the order they asked (the head keeps its place in line)."""
    with PostgresServer() as server:
        gate = inturn.Gate.from_url(server.dsn, namespace="short")
        async with gate.turn("k", timeout=10):
            pass
        with psycopg.connect(server.dsn, autocommit=True) as admin:
            admin.execute("CHECKPOINT")  # the schema survives the crash below
        await asyncio.to_thread(server.kill)
        order: list[int] = []

        async def one(n: int) -> None:
            async with gate.turn("k", timeout=25):
                order.append(n)

        waiters = []
        for n in range(WAITERS):
            waiters.append(asyncio.ensure_future(one(n)))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert order == []
        await asyncio.to_thread(server.start)
        await asyncio.wait_for(asyncio.gather(*waiters), 30)
        assert order == list(range(WAITERS))
        await gate.aclose()
