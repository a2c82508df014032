"""The async executor's helpers: one statement (and its cancel), an event loop's pool with
the turns' share of it, and how a connection goes back to the pool it came from."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg_pool

from . import _sql as q
from ._slots import AsyncSlots
from ._steps import cut, quiet

__all__ = [
    "CANCEL_WAIT",
    "LoopPool",
    "abandon",
    "check",
    "configure",
    "give_back",
    "pool_timeout",
    "statement",
]


_returning: set[asyncio.Future[None]] = set()
"""Connections on their way back to a pool (a reference, until they are)."""

CANCEL_WAIT = 0.25
"""Seconds a cancelled statement waits for the server to confirm its cancel (twice)."""


async def statement(
    conn: Any, sql: str, params: Any, *, rows: bool = False, first: bool = False
) -> Any:
    """Run one statement on ``conn``: its last result's first row, or every row; with
    ``first``, bound on the client (several statements, one round trip): the first
    result's first row.

    Cancelled (a caller's deadline), it asks the server to cancel the statement and waits
    for that at most CANCEL_WAIT; over a dead link (a partition, a half-open connection)
    the answer never comes (psycopg itself would wait for it), so then the connection is
    cut: the statement's task ends at once, and PostgreSQL rolls its transaction back
    when it notices.
    """

    async def run() -> Any:
        if first:
            cur = await psycopg.AsyncClientCursor(conn).execute(sql, params)
            row = None if cur.description is None else await cur.fetchone()
            while cur.nextset():
                pass
            return row
        cur = await conn.execute(sql, params)
        return list(await cur.fetchall()) if rows else await _last(cur)

    task = asyncio.ensure_future(run())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            # Ask the server to cancel the statement, briefly; over a dead link that
            # answer never comes, so the connection is cut instead.
            with contextlib.suppress(Exception):
                await conn.cancel_safe(timeout=CANCEL_WAIT)
            await asyncio.wait({task}, timeout=CANCEL_WAIT)
            if not task.done():
                cut(conn)
            task.add_done_callback(_swallow)
        raise


async def give_back(conn: Any, entry: LoopPool, turn: bool) -> None:
    """Into its own pool (a closed pool closes it); a turn's slot goes to the next in line."""
    try:
        await entry.pool.putconn(conn)
    finally:
        if turn:
            entry.slots.give()


def pool_timeout(until: float | None, most: float = 86400.0) -> float:
    """A pool's wait timeout for a deadline, at most ``most`` (None: no deadline; the
    caller checks the server in between)."""
    return most if until is None else max(0.001, min(most, until - time.monotonic()))


def _swallow(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: the connection was cut on purpose


async def _last(cur: Any) -> Any:
    """The first row of a (multi-statement) query's last result."""
    while cur.nextset():
        pass
    return None if cur.description is None else await cur.fetchone()


async def configure(conn: Any) -> None:
    """Every new pooled connection: see :data:`._sql.SESSION`."""
    await conn.execute(q.SESSION)


async def check(conn: Any) -> None:
    """A pooled connection on its way out: checked only when not quiet (see ``quiet``)."""
    if not quiet(conn):
        await psycopg_pool.AsyncConnectionPool.check_connection(conn)


@dataclass(slots=True)
class LoopPool:
    """An event loop's pool (made here, or the one injected) and the turns' share of it."""

    pool: Any
    slots: AsyncSlots
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    keeper: asyncio.Task[None] | None = None


def abandon(get: asyncio.Future[Any], pool: Any) -> None:
    """A connection asked for and no longer wanted goes back to its pool when it comes."""

    def done(task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is None:
            back = asyncio.ensure_future(pool.putconn(task.result()))
            _returning.add(back)
            back.add_done_callback(_returning.discard)

    get.cancel()
    get.add_done_callback(done)
