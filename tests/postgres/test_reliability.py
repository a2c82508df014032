"""PostgreSQL reliability: first use in a fresh process, fences across crashes, role-level
timeouts, hostile keys, lost replies, restarts during a drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

import inturn
from tests.servers import PostgresServer

from .conftest import advisory_waiters, until

_BURST = textwrap.dedent(
    """
    import asyncio, json, sys
    import inturn
    from inturn.testing import History, check_history

    async def one(dsn, namespace):
        gate = inturn.Gate.from_url(dsn, namespace=namespace)  # a fresh engine: first use
        order, history = [], History()

        async def call(i):
            async with gate.turn("user-1", timeout=10) as turn:
                with history.span(turn):
                    order.append(i)
                    await asyncio.sleep(0.001)

        await asyncio.gather(*(call(i) for i in range(5)))  # made in the order 0..4
        check_history(history.spans)
        await gate.aclose()
        return order

    dsn, namespace, engines = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps([asyncio.run(one(dsn, f"{namespace}{n}")) for n in range(engines)]))
    """
)


def test_a_burst_in_a_fresh_process_runs_in_the_order_it_was_made(postgres_dsn: str) -> None:
    """20 fresh engines (4 fresh processes, 5 engines each), 5 calls for one key at once:
    every engine runs them in the order they were made (before: out of order in 5 of 5)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BURST, postgres_dsn, f"p{p}e", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(4)
    ]
    orders = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        orders += json.loads(out)
    assert len(orders) == 20
    assert all(order == [0, 1, 2, 3, 4] for order in orders), orders


@pytest.fixture
def short_role_timeouts(postgres_dsn: str, admin: psycopg.Connection) -> Iterator[str]:
    """The role's defaults in the test's database, as a managed database might set them."""
    db = admin.info.dbname
    settings = {
        "statement_timeout": "1s",
        "lock_timeout": "300ms",
        "idle_session_timeout": "1s",
        "idle_in_transaction_session_timeout": "1s",
    }
    for name, value in settings.items():
        admin.execute(
            sql.SQL("ALTER ROLE postgres IN DATABASE {} SET {} = {}").format(
                sql.Identifier(db), sql.Identifier(name), sql.Literal(value)
            )
        )
    yield postgres_dsn
    admin.execute(
        sql.SQL("ALTER ROLE postgres IN DATABASE {} RESET ALL").format(sql.Identifier(db))
    )


async def test_role_timeouts_do_not_cut_waits_or_turns_short(short_role_timeouts: str) -> None:
    """statement_timeout 1s, lock_timeout 300ms, idle_session_timeout 1s for the role: a
    waiter with timeout=10 behind a 2.5 s turn gets it (async and a thread), and calls after
    an idle pause still work (before: BackendUnavailable after 1 s)."""
    gate = inturn.Gate.from_url(short_role_timeouts, namespace=f"t{secrets.token_hex(3)}")
    held = asyncio.Event()
    got: list[str] = []

    async def holder() -> None:
        async with gate.turn("k", timeout=10):
            held.set()
            await asyncio.sleep(2.5)
            got.append("holder")

    async def waiter() -> None:
        await held.wait()
        async with gate.turn("k", timeout=10):
            got.append("async waiter")

    def thread_waiter() -> None:
        with gate.turn_sync("k", timeout=10):
            got.append("thread waiter")

    async def in_thread() -> None:
        await held.wait()
        await asyncio.sleep(0.2)
        await asyncio.to_thread(thread_waiter)

    await asyncio.gather(holder(), waiter(), in_thread())
    assert got == ["holder", "async waiter", "thread waiter"]
    await asyncio.sleep(1.5)  # longer than idle_session_timeout: pooled connections sat idle
    async with gate.turn("k", timeout=10) as turn:
        assert turn.fence > 0
    await asyncio.to_thread(thread_waiter)
    await gate.aclose()


async def test_a_lock_wait_cancelled_by_the_server_is_retried_cleanly(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """The head's lock wait is cancelled on the server (pg_cancel_backend, as a role's
    statement_timeout did): the waiter rides it out and gets the turn (before: the retried
    wait ran in the aborted transaction and raised InFailedSqlTransaction)."""
    gate = inturn.Gate.from_url(postgres_dsn, namespace=f"t{secrets.token_hex(3)}")
    held = asyncio.Event()

    async def holder() -> None:
        async with gate.turn("k", timeout=10):
            held.set()
            await asyncio.to_thread(until, lambda: advisory_waiters(admin) == 1)
            admin.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND NOT granted"
            )
            await asyncio.sleep(0.5)

    async def waiter() -> int:
        await held.wait()
        async with gate.turn("k", timeout=10) as turn:
            return turn.fence

    _, fence = await asyncio.gather(holder(), waiter())
    assert fence > 0
    await gate.aclose()


def _crash(server: PostgresServer) -> None:
    """kill -9 of the postmaster, as `pg_ctl stop -m immediate`: WAL not yet written is lost."""
    server._run(
        str(server.bindir / "pg_ctl"),
        "stop",
        "--wait",
        "--mode=immediate",
        "--pgdata",
        str(server.data_dir),
        timeout=15,
    )
    server._terminate()  # forgets the process group
    server.start()


@pytest.mark.slow
async def test_fences_grow_across_server_crashes() -> None:
    """12 crashes at random points right after a burst of grants, the last turn still held,
    with synchronous_commit=off on the server: the key's next fence is greater than every
    fence handed out before (before: the sequence rewound, a fence was handed out twice)."""
    rng = random.Random(1234)
    with PostgresServer() as server:
        dsn = server.dsn
        seen = 0
        for _ in range(12):
            backend = inturn.PostgresBackend(conninfo=dsn)
            grants = []
            for _ in range(rng.randint(5, 70)):
                token = secrets.token_hex(8)
                grant = await backend.join("k", token, 30.0)
                assert grant is not None
                grants.append(grant.fence)
                if len(grants) < 5 or rng.random() < 0.9:
                    await backend.release("k", token)
                else:
                    break  # the holder still runs when the server dies
            assert grants == sorted(set(grants))
            assert grants[0] > seen
            seen = max(grants)
            await asyncio.sleep(rng.random() * 0.02)
            await asyncio.to_thread(_crash, server)
            with contextlib.suppress(Exception):
                await backend.aclose()
        backend = inturn.PostgresBackend(conninfo=dsn)
        grant = await backend.join("k", "last", 30.0)
        assert grant is not None
        assert grant.fence > seen
        await backend.release("k", "last")
        await backend.aclose()


HOSTILE = [
    "a\x00b",
    "\x00",
    "\x01",
    "\x010",  # what NUL is escaped to: must stay a key of its own
    "\x01\x00",
    "k" * 1024,
    "user:1",
    "{user}",
    "line\nbreak",
    "ünïcødé 🙂",
]


async def test_hostile_keys_and_ids_round_trip_in_every_operation(postgres_dsn: str) -> None:
    """NUL (which a text column cannot hold), the escape character itself, 1 KiB, ':', '{',
    newlines and unicode, in keys, ids, scopes, mailbox names, messages and results: turns,
    dedup, supersede, mailboxes and statistics keep each one apart and give it back as it
    was (before: a raw psycopg.DataError from dedup and mailboxes)."""
    gate = inturn.Gate.from_url(postgres_dsn + "?audit=1", namespace="ns\x00")
    store = gate.backend
    assert isinstance(store, inturn.PostgresBackend)
    box = "box\x00"
    for n, key in enumerate(HOSTILE):
        async with gate.turn(key, timeout=5) as turn:
            stats = await store.statistics(key)
            assert [(k.key, k.holder is not None) for k in stats.keys] == [(key, True)]
            assert turn.fence > 0
        with gate.turn_sync(key, timeout=5) as turn:
            assert turn.fence > 0
        # dedup: the id and the result too
        claimed = await store.claim(key, key, key, "t", fence=None, lease=5, window=60)
        assert claimed.state == "new"
        await store.finish(key, key, key, "t", f'"{key}\x00"', window=60)
        done = await store.claim(key, key, key, "u", fence=None, lease=5, window=60)
        assert done == inturn.ClaimResult("done", f'"{key}\x00"')
        await store.abandon(key, key, key + "other", "t")
        # newest call wins
        generation = await store.supersede(key, key, cancel_running=False)
        assert await store.is_newest(key, key, generation)
        await store.start_running(key, key, "t", lambda: None)
        await store.stop_running(key, key, "t")
        # mailboxes: n + 1 messages for the n-th key, bodies with NUL
        for i in range(n + 1):
            await store.mb_submit(
                box, key, f"{key}\x00{i}", max_pending=100, drop_oldest=False, token="d", lease=30
            )
    assert sorted(await store.mb_hinted(box)) == sorted(HOSTILE)
    stats = await store.statistics()
    assert {b.key: b.queued for b in stats.boxes} == {k: n + 1 for n, k in enumerate(HOSTILE)}
    assert {b.mailbox for b in stats.boxes} == {box}
    for n, key in enumerate(HOSTILE):
        assert await store.mb_pending(box, key) == n + 1
        taken = await store.mb_take(box, key, "d", limit=100, lease=30, ack=False)
        assert taken.messages == tuple(f"{key}\x00{i}" for i in range(n + 1))
        await store.mb_retry(box, key, "d", [f"again {key}"], not_before=0.0)
        taken = await store.mb_take(box, key, "d", limit=1, lease=30, ack=False)
        assert taken.messages == (f"again {key}",)
        await store.mb_dead(box, [f"dead {key}"])
        await store.mb_done(box, key, "d")
    dead = await store.mb_dead_letters(box, 100)
    assert sorted(dead) == sorted(f"dead {k}" for k in HOSTILE)
    assert (await store.statistics()).dead_letters == {box: len(HOSTILE)}
    await gate.aclose()


class _Proxy:
    """A loopback TCP proxy in front of PostgreSQL that, once armed with a marker, forwards
    the request containing it and then closes that connection instead of forwarding the
    reply: the server ran (and committed) the statement, the client never hears of it."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.marker: bytes | None = None
        self.dropped = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self.writers.update((writer, up_writer))
        armed = asyncio.Event()

        async def upward() -> None:
            while data := await reader.read(65536):
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    armed.set()
                up_writer.write(data)
                await up_writer.drain()

        async def downward() -> None:
            while data := await up_reader.read(65536):
                if armed.is_set():
                    self.dropped += 1
                    return  # the reply is lost
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(upward()), asyncio.ensure_future(downward())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await self._shut(writer, up_writer)

    async def _shut(self, *writers: asyncio.StreamWriter) -> None:
        for w in writers:
            self.writers.discard(w)
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self._shut(*self.writers)
        await self.server.wait_closed()


async def test_a_write_whose_reply_is_lost_is_not_run_twice(postgres_dsn: str) -> None:
    """The connection drops after the server committed, before the reply: mb_submit raises
    BackendUnavailable and is not retried (stored once); mb_retry, which a drainer retries,
    runs twice harmlessly (before: its retry stored the retried batch a second time)."""
    info = psycopg.conninfo.conninfo_to_dict(postgres_dsn)
    proxy = _Proxy(int(str(info["port"])))
    port = await proxy.start()
    store = inturn.PostgresBackend(conninfo=psycopg.conninfo.make_conninfo(postgres_dsn, port=port))
    await store.migrate()

    async def submit(body: str) -> inturn.Submitted:
        return await store.mb_submit(
            "box", "u", body, max_pending=10, drop_oldest=False, token="d", lease=30
        )

    proxy.marker = b"mb_submit"
    with pytest.raises(inturn.BackendUnavailable):
        await submit("one")
    assert proxy.dropped == 1
    assert await store.mb_pending("box", "u") == 1  # committed once, not retried
    taken = await store.mb_take("box", "u", "d", limit=10, lease=30, ack=False)
    assert taken.messages == ("one",)
    proxy.marker = b"mb_retry"
    with pytest.raises(inturn.BackendUnavailable):
        await store.mb_retry("box", "u", "d", ["one, again"], not_before=0.0)
    assert proxy.dropped == 2
    await store.mb_retry("box", "u", "d", ["one, again"], not_before=0.0)  # the retry
    taken = await store.mb_take("box", "u", "d", limit=10, lease=30, ack=False)
    assert taken.messages == ("one, again",)
    await store.mb_done("box", "u", "d")
    assert await store.mb_pending("box", "u") == 0
    await store.aclose()
    await proxy.close()


@pytest.mark.slow
@pytest.mark.parametrize(("ids", "threads"), [(True, False), (False, False), (True, True)])
async def test_a_restart_during_a_drain_loses_and_repeats_nothing(ids: bool, threads: bool) -> None:
    """`pg_ctl restart -m fast` while a drain of 10 messages runs (after the 3rd): the drainer
    rides it out and all 10 are handled, in order, without a sweep; only the message in
    flight at the restart may be handled again (its acknowledgement was lost with the
    server); for an async handler and a def handler (drained in a thread)."""
    with PostgresServer() as server:
        gate = inturn.Gate.from_url(server.dsn, namespace="restart")
        handled: list[int] = []
        loop = asyncio.get_running_loop()
        third = asyncio.Event()

        def record(message: inturn.Message) -> None:
            handled.append(message.payload)
            if len(handled) == 3:
                loop.call_soon_threadsafe(third.set)

        async def handler(message: inturn.Message) -> None:
            await asyncio.sleep(0.2)
            record(message)

        def sync_handler(message: inturn.Message) -> None:
            time.sleep(0.2)
            record(message)

        box = gate.mailbox("box", handler=sync_handler if threads else handler, sweep_interval=None)
        for n in range(10):
            await box.submit("u", n, id=f"m{n}" if ids else None)
        await third.wait()
        await asyncio.to_thread(server.restart)
        assert len(handled) < 10, handled  # the restart came in the middle of the drain
        assert await box.drained(timeout=30), handled
        # Every message, in order. One may be handled twice: the one whose handler finished
        # while the server went down, before its acknowledgement (and, with an id, its
        # dedup mark) could be recorded.
        assert sorted(set(handled)) == list(range(10)), handled
        assert handled == sorted(handled), handled
        assert len(handled) <= 11, handled
        assert await box.pending("u") == 0
        await box.aclose()
        await gate.aclose()


async def test_no_call_fails_on_a_connection_the_restart_ended() -> None:
    """After `pg_ctl restart -m fast`, every idle pooled connection holds the server's FATAL:
    the pool replaces them before use, so the next calls (async and threads) succeed (before:
    the first call on each such connection raised BackendUnavailable)."""
    with PostgresServer() as server:
        store = inturn.PostgresBackend(conninfo=server.dsn)
        twin = store.sync_twin()

        async def burst() -> None:
            await asyncio.gather(*(store.mb_pending("box", f"u{n}") for n in range(4)))
            await asyncio.to_thread(lambda: [twin.mb_pending("box", f"u{n}") for n in range(2)])

        await burst()  # the pools hold idle connections now
        await asyncio.to_thread(server.restart)
        for _ in range(3):
            await burst()
            assert not await store.is_busy("k")
        await store.aclose()
