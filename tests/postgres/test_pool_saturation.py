"""More turns at once than the pool has connections for: a turn waits, in FIFO order, for a
connection to come free or for its own deadline (then TurnTimeout, as any wait that ran out),
never BackendUnavailable while the server answers; dedup and mailbox statements keep going.

``max_connections=4``: turns share three of them, the fourth is kept for pooled statements.
"""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest

import inturn
from inturn._backends.postgres._slots import turn_share
from inturn._backends.postgres._sql import mailbox_hash
from tests.servers import PostgresServer

SHARE = turn_share(4)


def test_the_turns_share_leaves_room_for_statements() -> None:
    assert [turn_share(n) for n in (2, 3, 4, 8, 16, 32)] == [1, 2, 3, 7, 14, 28]


async def _hold(
    gate: inturn.Gate, keys: list[str]
) -> tuple[asyncio.Event, list[asyncio.Task[None]]]:
    """Tasks that each hold one key's turn until the event is set."""
    done = asyncio.Event()
    held = asyncio.Semaphore(0)

    async def hold(key: str) -> None:
        async with gate.turn(key, timeout=10):
            held.release()
            await done.wait()

    tasks = [asyncio.ensure_future(hold(k)) for k in keys]
    for _ in keys:
        await asyncio.wait_for(held.acquire(), 10)
    return done, tasks


async def test_a_turn_waits_for_a_busy_pool_and_times_out_as_a_turn(postgres_dsn: str) -> None:
    """Every turn connection in use: the next turn (another key) raises TurnTimeout at its
    own deadline, not BackendUnavailable after the pool's 5 s; a pooled statement still
    runs meanwhile (the reserve); a turn without a timeout gets a connection once one is
    free (before: BackendUnavailable after 5 s whatever the timeout)."""
    gate = inturn.Gate.from_url(postgres_dsn + "?max_connections=4", namespace="busy")
    done, holders = await _hold(gate, [f"h{n}" for n in range(SHARE)])
    began = time.monotonic()
    with pytest.raises(inturn.TurnTimeout):
        async with gate.turn("other", timeout=0.5):
            pass
    assert 0.4 < time.monotonic() - began < 2.5
    box = gate.mailbox("box", handler=lambda message: None, sweep_interval=None)
    assert await box.pending("u") == 0  # the reserve: statements are not held up
    dedup = gate.dedup("scope")
    async with dedup.claim("k", "m1"):
        pass

    async def patient() -> int:
        async with gate.turn("patient", timeout=None) as turn:
            return turn.fence

    waiting = asyncio.ensure_future(patient())
    await asyncio.sleep(0.7)  # longer than a check of the server: it answers, so wait on
    assert not waiting.done()
    done.set()
    assert await asyncio.wait_for(waiting, 10) > 0
    await asyncio.gather(*holders)
    await box.aclose()
    await gate.aclose()


async def test_turns_waiting_for_a_busy_pool_get_it_in_fifo_order(postgres_dsn: str) -> None:
    """One turn connection (``max_connections=2``) held; six turns of six keys queue for
    it and get it one after the other, in the order they asked."""
    gate = inturn.Gate.from_url(postgres_dsn + "?max_connections=2", namespace="fifo")
    done, holders = await _hold(gate, ["h"])
    order: list[int] = []

    async def waiter(n: int) -> None:
        async with gate.turn(f"w{n}", timeout=30):
            order.append(n)
            await asyncio.sleep(0.01)

    waiters = []
    for n in range(6):
        waiters.append(asyncio.ensure_future(waiter(n)))
        await asyncio.sleep(0.05)
    assert order == []
    done.set()
    await asyncio.wait_for(asyncio.gather(*holders, *waiters), 20)
    assert order == list(range(6))
    await gate.aclose()


def test_threads_wait_for_a_busy_pool_in_order_and_time_out_as_turns(postgres_dsn: str) -> None:
    """The sync twin: threads holding every turn connection; another thread's turn raises
    TurnTimeout at its deadline; waiting threads get the connections in arrival order."""
    gate = inturn.Gate.from_url(postgres_dsn + "?max_connections=4", namespace="threads")
    done = threading.Event()
    held = threading.Semaphore(0)

    def hold(key: str, until: threading.Event = done) -> None:
        with gate.turn_sync(key, timeout=10):
            held.release()
            until.wait(20)

    holders = [threading.Thread(target=hold, args=(f"h{n}",)) for n in range(SHARE)]
    for t in holders:
        t.start()
    for _ in holders:
        assert held.acquire(timeout=10)
    began = time.monotonic()
    with pytest.raises(inturn.TurnTimeout), gate.turn_sync("other", timeout=0.5):
        pass
    assert 0.4 < time.monotonic() - began < 2.5
    order: list[int] = []
    lock = threading.Lock()

    done.set()
    for t in holders:
        t.join(20)
    gate.close()
    # One turn connection (max_connections=2): waiting threads get it one at a time.
    gate = inturn.Gate.from_url(postgres_dsn + "?max_connections=2", namespace="order")
    release = threading.Event()
    holder = threading.Thread(target=lambda: hold("h", release))
    holder.start()
    assert held.acquire(timeout=10)

    def waiter(n: int) -> None:
        with gate.turn_sync(f"w{n}", timeout=30):
            with lock:
                order.append(n)
            time.sleep(0.01)

    waiters = []
    for n in range(5):
        waiters.append(threading.Thread(target=waiter, args=(n,)))
        waiters[-1].start()
        time.sleep(0.1)
    release.set()
    for t in [holder, *waiters]:
        t.join(20)
    assert order == list(range(5))
    gate.close()


async def test_a_server_that_dies_under_a_busy_pool_fails_fast() -> None:
    """Every turn connection held, then the server is killed: a turn waiting for the pool
    raises BackendUnavailable (the server's reason), not TurnTimeout, and by its deadline."""
    with PostgresServer() as server:
        gate = inturn.Gate.from_url(
            server.dsn + "&max_connections=4"
            if "?" in server.dsn
            else server.dsn + "?max_connections=4",
            namespace="dies",
        )
        done, holders = await _hold(gate, [f"h{n}" for n in range(SHARE)])
        await asyncio.to_thread(server.kill)
        began = time.monotonic()
        with pytest.raises(inturn.BackendUnavailable):
            async with gate.turn("other", timeout=2):
                pass
        assert time.monotonic() - began < 3.5
        done.set()
        await asyncio.gather(*holders, return_exceptions=True)
        await gate.aclose()


async def test_statements_wait_for_a_busy_pool_while_the_server_answers(
    postgres_dsn: str,
) -> None:
    """Every pooled connection busy for longer than the pool's 5 s (two mailbox steps
    blocked behind an admin's lock on their keys, for the loop's pool and for the threads'):
    a third statement waits for a connection and succeeds once one comes free (before:
    BackendUnavailable after 5 s with the server answering all along)."""
    store = inturn.PostgresBackend(conninfo=postgres_dsn, namespace="stmts", max_connections=2)
    twin = store.sync_twin()
    await store.migrate()
    locks = [mailbox_hash("stmts", "box", k) for k in ("a1", "a2", "s1", "s2")]
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute("BEGIN")
        for lock in locks:
            admin.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))

        async def submit(key: str) -> inturn.Submitted:
            return await store.mb_submit(
                "box", key, "m", max_pending=10, drop_oldest=False, token="d", lease=30
            )

        def submit_sync(key: str) -> inturn.Submitted:
            return twin.mb_submit(
                "box", key, "m", max_pending=10, drop_oldest=False, token="d", lease=30
            )

        blocked = [asyncio.ensure_future(submit(k)) for k in ("a1", "a2")]
        blocked += [asyncio.ensure_future(asyncio.to_thread(submit_sync, k)) for k in ("s1", "s2")]
        await asyncio.sleep(0.5)
        began = time.monotonic()
        counts = [
            asyncio.ensure_future(store.mb_pending("box", "other")),
            asyncio.ensure_future(asyncio.to_thread(twin.mb_pending, "box", "other")),
        ]
        await asyncio.sleep(6.0)
        assert not any(c.done() for c in counts), [c.result() for c in counts if c.done()]
        admin.execute("COMMIT")
    assert await asyncio.wait_for(asyncio.gather(*counts), 10) == [0, 0]
    assert time.monotonic() - began > 5.5
    await asyncio.wait_for(asyncio.gather(*blocked), 10)
    await store.aclose()
