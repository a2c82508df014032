"""A connection goes back to the pool it came from: the async backend has a pool per event
loop, and a loop's pool is closed when the loop shuts down or the gate closes on it; a turn
given back after that, or from another loop, must neither fail ("can't return connection to
pool 'inturn-X', it comes from pool 'inturn-X'") nor open a new pool on a dying loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import psycopg
import pytest

import inturn
from tests.postgres.conftest import advisory_holders, until


@pytest.fixture
def other_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_a_turn_released_while_its_loop_shuts_down(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """``asyncio.run`` ends without ``aclose()`` while a task still holds a turn: the loop's
    pool closes first, then the task's ``finally`` releases the turn. The release works and
    its connection is closed, not offered to a new pool made on the dying loop (before:
    ValueError "can't return connection to pool ...")."""
    backend = inturn.PostgresBackend(conninfo=postgres_dsn, namespace="dying")
    errors: list[BaseException] = []
    tasks: list[asyncio.Task[None]] = []

    async def main() -> None:
        assert await backend.join("k", "t1", 30.0) is not None

        async def holder() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(0.3)  # the loop's pool has closed by now
                try:
                    await backend.release("k", "t1")
                    await backend.is_busy("other")  # a new call: refused, no new pool
                except BaseException as exc:
                    errors.append(exc)

        tasks.append(asyncio.ensure_future(holder()))
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert len(errors) == 1, errors
    assert isinstance(errors[0], inturn.BackendUnavailable), repr(errors[0])
    assert "shutting down" in str(errors[0])
    until(lambda: advisory_holders(admin) == [])


async def test_a_turn_released_from_another_loop_goes_back_to_its_own_pool(
    postgres_dsn: str, other_loop: asyncio.AbstractEventLoop
) -> None:
    """A turn taken on one event loop and released from another: the connection goes back
    to the first loop's pool, on that loop (before: ValueError "can't return connection to
    pool 'inturn-X', it comes from pool 'inturn-X'" from the second loop's new pool)."""
    backend = inturn.PostgresBackend(conninfo=postgres_dsn, namespace="moved", max_connections=2)

    def there(coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, other_loop).result(10)  # type: ignore[arg-type]

    assert await asyncio.to_thread(there, backend.join("k", "t1", 30.0)) is not None
    await backend.release("k", "t1")
    # The first loop's pool has its connection back: with max_connections=2 its one turn
    # connection is free again, so the next turn there is granted at once.
    for n in range(3):
        grant = await asyncio.to_thread(there, backend.join("k", f"t{n + 2}", 30.0))
        assert grant is not None
        await asyncio.to_thread(there, backend.release("k", f"t{n + 2}"))
    assert await backend.is_busy("k") is False
    await asyncio.to_thread(there, backend.aclose())
    await backend.aclose()


async def test_a_turn_released_after_the_gate_closed_on_its_loop(postgres_dsn: str) -> None:
    """A task releases its turn after ``gate.aclose()`` on the same loop: the release still
    ends the turn and closes its connection (before: BackendUnavailable, and the connection
    was left open)."""
    backend = inturn.PostgresBackend(conninfo=postgres_dsn, namespace="late")
    assert await backend.join("k", "t1", 30.0) is not None
    await backend.aclose()
    await backend.release("k", "t1")
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        until(lambda: advisory_holders(admin) == [])
