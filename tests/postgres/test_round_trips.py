"""Round trips per mailbox message on PostgreSQL, counted on the wire: a loopback proxy
counts the server's ReadyForQuery messages (exactly one ends every round trip: a simple
query, or an extended-protocol Sync)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct

import psycopg

import inturn

MESSAGES = 40
"""Uncontended submit -> drain -> done cycles measured (one message each, distinct keys)."""


class CountingProxy:
    """Forwards PostgreSQL's wire protocol both ways and counts round trips and sessions.

    The client must not negotiate SSL or GSS (``sslmode=disable gssencmode=disable``):
    then every byte the server sends is a typed message (type, int32 length, body).
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.ready = 0
        """ReadyForQuery messages seen: one per round trip (and one per session start)."""
        self.sessions = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self.writers += [writer, up_writer]

        async def upward() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def downward() -> None:
            buffer = b""
            while data := await up_reader.read(65536):
                buffer += data
                while len(buffer) >= 5:
                    kind, length = buffer[:1], struct.unpack("!i", buffer[1:5])[0]
                    if len(buffer) < 1 + length:
                        break
                    self.ready += kind == b"Z"
                    buffer = buffer[1 + length :]
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(upward()), asyncio.ensure_future(downward())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            w.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 5)


async def test_a_mailbox_message_costs_three_round_trips(postgres_dsn: str) -> None:
    """submit (and the new drainer's first take) + the turn (BEGIN and the lock) + the
    next take riding on the turn's COMMIT (which also acknowledges and gives the role up).
    Before: 4 (the take and the COMMIT were two round trips)."""
    info = psycopg.conninfo.conninfo_to_dict(postgres_dsn)
    proxy = CountingProxy(int(str(info["port"])))
    port = await proxy.start()
    conninfo = psycopg.conninfo.make_conninfo(
        postgres_dsn, port=port, sslmode="disable", gssencmode="disable"
    )
    backend = inturn.PostgresBackend(conninfo=conninfo, namespace=f"rt{secrets.token_hex(3)}")
    gate = inturn.Gate(backend)
    handled: list[str] = []

    async def handle(message: inturn.Message) -> None:
        handled.append(message.key)

    box = gate.mailbox("inbox", handler=handle, sweep_interval=None)
    try:
        async with asyncio.timeout(60):
            for i in range(3):  # warm up: the schema, the pool's connections
                await box.submit(f"warm-{i}", {"n": i})
                assert await box.drained(10)
            ready, sessions = proxy.ready, proxy.sessions
            for i in range(MESSAGES):
                await box.submit(f"user-{i}", {"n": i})
                assert await box.drained(10)
            # A new session costs two ReadyForQuery of its own (its start, its settings).
            trips = proxy.ready - ready - 2 * (proxy.sessions - sessions)
        assert len(handled) == 3 + MESSAGES
        assert trips <= 3 * MESSAGES, f"{trips / MESSAGES:.2f} round trips per message"
        assert trips >= 3 * MESSAGES  # the proxy does see them: submit, turn, commit
        assert await backend.footprint() == 0
    finally:
        await gate.aclose()
        await proxy.close()


async def test_the_take_with_the_commit_closes_an_audited_grant(postgres_dsn: str) -> None:
    """With audit=1 the take rides on the audited release: the grant's row is closed as
    released in the same COMMIT, and every message is handled once."""
    backend = inturn.PostgresBackend(
        conninfo=postgres_dsn, namespace=f"ra{secrets.token_hex(3)}", audit=True
    )
    gate = inturn.Gate(backend)
    handled: list[int] = []

    async def handle(message: inturn.Message) -> None:
        handled.append(message.payload["n"])

    box = gate.mailbox("inbox", handler=handle, sweep_interval=None)
    try:
        async with asyncio.timeout(60):
            for i in range(10):
                await box.submit("user", {"n": i})
            assert await box.drained(30)
        assert handled == list(range(10))
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            outcomes = conn.execute("SELECT outcome, count(*) FROM inturn.grants GROUP BY 1")
            rows = dict(outcomes.fetchall())
        assert set(rows) == {"released"}
        assert rows["released"] >= 1
        assert await backend.footprint() == 0
    finally:
        await gate.aclose()
