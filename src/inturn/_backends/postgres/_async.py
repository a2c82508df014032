"""PostgresBackend: runs the engine's flows (:mod:`._plan`) on psycopg's async connections.

What is its own: one pool per event loop (closed when its loop ends), how a
step is awaited, and the per-loop LISTEN connection that delivers cancels of
running calls (``on_busy="cancel"`` across processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import psycopg
import psycopg_pool

from inturn._backends._wakeup import closed_on_loop, raise_if_closing
from inturn._backends.base import (
    ClaimResult,
    Diagnostics,
    Grant,
    ResumeStatus,
    Statistics,
    Submitted,
    Taken,
)
from inturn._errors import BackendUnavailable, ConfigurationError

from . import _doctor
from . import _sql as q
from ._admin import PostgresAdmin
from ._aio import (
    LoopPool,
    abandon,
    check,
    configure,
    give_back,
    pool_timeout,
    statement,
)
from ._plan import MAX_CONNECTIONS, Plan
from ._slots import CHECKS, HEALTHY_FOR, AsyncSlots, checks, left, turn_share
from ._steps import (
    CLOSE_STEP,
    CLOSE_WAIT,
    IDLE,
    Connect,
    Exhausted,
    Flow,
    On,
    PutBack,
    Run,
    Sleep,
    Step,
    closed_lock_waits,
    dead,
    map_errors,
)
from ._sync import SyncPostgresBackend
from ._urls import CONNECT_TIMEOUT, connect_failure, connection_kwargs, masked, parse_url

__all__ = ["PostgresBackend"]

_CLOSED_ON_LOOP = partial(closed_on_loop, "PostgreSQL")

T = TypeVar("T")
logger = logging.getLogger("inturn")

LISTEN_RETRY_MAX = 2.0
"""Longest pause (seconds) before the cancel listener reconnects."""


@dataclass(slots=True)
class _Listener:
    """A loop's LISTEN connection for cancels of its running calls ("cancel|<token>")."""

    channel: str
    cancels: dict[str, Callable[[], None]] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    broken: BaseException | None = None
    task: asyncio.Task[None] | None = None


def _forget(
    probes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]],
    loop: asyncio.AbstractEventLoop,
    done: asyncio.Task[None],
) -> None:
    if probes.get(loop) is done:
        del probes[loop]
    if not done.cancelled():
        done.exception()  # retrieved: a probe nobody awaits any more logs nothing


class PostgresBackend(PostgresAdmin):
    """The async PostgreSQL backend. See the package docstring for what it guarantees.

    ``pool`` is an open ``psycopg_pool.AsyncConnectionPool`` whose connections
    are in ``autocommit`` mode (it is used from the loop it belongs to and is
    not closed by :meth:`aclose`); ``sync_pool`` a ``psycopg_pool.ConnectionPool``
    for the sync twin. Or give ``conninfo`` and the backend makes one pool per
    event loop (and one for threads) of ``max_connections`` each.
    ``audit=True`` records every grant in ``<schema>.grants``.
    """

    def __init__(
        self,
        pool: Any = None,
        *,
        sync_pool: Any = None,
        conninfo: str | None = None,
        namespace: str = "default",
        schema: str = "inturn",
        audit: bool = False,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if pool is None and conninfo is None:
            raise ConfigurationError("PostgresBackend needs a pool or a conninfo (or use from_url)")
        if max_connections < 2:
            raise ConfigurationError(
                "max_connections must be at least 2 (one for turns, one for statements)"
            )
        self._plan = Plan(namespace, schema, audit)
        self._pool = pool
        self._sync_pool = sync_pool
        self._conninfo = conninfo
        self._max = max_connections
        self._share = turn_share(max_connections if pool is None else int(pool.max_size))
        # Loops this backend was closed on: a call that comes after (a task still running
        # when the gate closed) must not open a new pool that would outlive the loop.
        self._closed_on: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopPool] = (
            weakref.WeakKeyDictionary()
        )
        self._twin: SyncPostgresBackend | None = None
        self._listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Listener] = (
            weakref.WeakKeyDictionary()
        )
        self._reached = False
        """A connection of ours was made once: from then on the pools connect by themselves."""
        self._probes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary()
        )
        self._healthy_at = float("-inf")
        """When a check last found the server answering (``time.monotonic()``)."""
        self._origins: weakref.WeakKeyDictionary[Any, tuple[Any, LoopPool, bool]] = (
            weakref.WeakKeyDictionary()
        )
        """Each connection out of a pool: its loop, that loop's pool, whether a turn has it."""
        self._returns: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "default") -> PostgresBackend:
        """Build the backend from a ``postgresql://`` URL (see the package docstring)."""
        conninfo, options = parse_url(url)
        return cls(conninfo=conninfo, namespace=namespace, **options)

    # -- the executor -------------------------------------------------------------------

    async def _drive(self, flow: Flow[T]) -> T:
        """Run a flow: await each step, send its answer back (or throw its exception in)."""
        answer: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = flow.send(answer) if error is None else flow.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            except Exception as exc:  # aclose() closed the pool, or cancelled, under the call
                closing = asyncio.get_running_loop() in self._closed_on
                raise_if_closing(exc, closing, _CLOSED_ON_LOOP)
                raise
            finally:
                error = None
            try:
                answer = await self._step(step)
            except BaseException as exc:  # the flow decides, cancellation included
                answer, error = None, exc

    async def _step(self, step: Step) -> Any:
        if isinstance(step, On):
            return await statement(step.conn, step.sql, step.params, first=step.first)
        if isinstance(step, Run):
            conn = await self._getconn(None)
            try:
                with map_errors(step.what):
                    return await statement(conn, step.sql, step.params, rows=step.rows)
            finally:
                await self._putconn(conn)
        if isinstance(step, Connect):
            return await self._getconn(step.until, turn=True, quick=step.quick)
        if isinstance(step, PutBack):
            return await self._putconn(step.conn)
        assert isinstance(step, Sleep)
        return await step.waiter.sleep(step.seconds)

    async def _entry_here(self) -> LoopPool:
        loop = asyncio.get_running_loop()
        entry = self._pools.get(loop)
        if entry is None and loop in self._closed_on:
            raise _CLOSED_ON_LOOP()
        if entry is None and self._pool is not None:
            entry = self._pools[loop] = LoopPool(self._pool, AsyncSlots(self._share))
            entry.ready.set()
        if entry is None and not self._reached:
            await self._probe(loop)
            entry = self._pools.get(loop)
        if entry is None:
            pool = psycopg_pool.AsyncConnectionPool(
                self._conninfo or "",
                min_size=1,
                max_size=self._max,
                kwargs=connection_kwargs(),
                configure=configure,
                check=check,
                timeout=CONNECT_TIMEOUT,
                open=False,
                name=f"inturn-{self._plan.sql.namespace}",
            )
            entry = self._pools[loop] = LoopPool(pool, AsyncSlots(self._share))
            # The keeper closes the pool when the loop shuts down (asyncio.run cancels it)
            # while the loop still runs: its connections cannot outlive their loop.
            entry.keeper = asyncio.ensure_future(self._keep(loop, entry))
            try:
                await asyncio.shield(pool.open(wait=False))
            finally:
                entry.ready.set()
        elif not entry.ready.is_set():
            await entry.ready.wait()
        return entry

    async def _probe(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect once before the first pool opens, so that a server that cannot be
        reached, or refuses the login, fails the call now with libpq's own words (a pool
        would retry in the background, log each try, and say only that it timed out).

        Also the check, while a call waits for a busy pool, that the server still
        answers (then a failure is ``transient``: an outage to ride out). The callers of
        a loop share one attempt; a caller that comes after it failed starts another.
        """
        probe = self._probes.get(loop)
        if probe is None:
            probe = self._probes[loop] = asyncio.ensure_future(self._connect_once())
            probe.add_done_callback(lambda done: _forget(self._probes, loop, done))
        try:
            await asyncio.shield(probe)
        except BackendUnavailable as exc:  # each caller gets an exception of its own
            raise BackendUnavailable(str(exc), transient=exc.transient) from exc.__cause__

    async def _connect_once(self) -> None:
        try:
            conninfo = self._conninfo if self._conninfo is not None else self._pool.conninfo
            conn = await psycopg.AsyncConnection.connect(conninfo, **connection_kwargs())
        except psycopg.Error as exc:
            raise connect_failure(exc, first=not self._reached) from exc
        self._reached = True
        self._healthy_at = time.monotonic()
        with contextlib.suppress(Exception):
            await conn.close()

    async def _keep(self, loop: asyncio.AbstractEventLoop, entry: LoopPool) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            # The loop is shutting down (or aclose() runs): no pool is made on it again.
            self._closed_on.add(loop)
            if self._pools.get(loop) is entry:
                del self._pools[loop]
            with contextlib.suppress(Exception):
                await asyncio.shield(entry.pool.close(timeout=1.0))

    async def _getconn(
        self, until: float | None, *, turn: bool = False, quick: bool = False
    ) -> Any:
        """A connection of this loop's pool: for a turn, first a place in the turns' share
        (FIFO; ``quick``: only if free now); see :class:`._steps.Connect`. Remembers where
        it came from: it goes back there, whatever loop gives it back."""
        entry = await self._entry_here()
        if turn and quick and not entry.slots.take_now():
            raise Exhausted
        if turn and not quick:
            ticket = entry.slots.ticket()
            try:
                await self._patiently(ticket, until)
            except BaseException:
                entry.slots.drop(ticket)
                raise
        limit = time.monotonic() + CONNECT_TIMEOUT if quick else until
        try:
            try:  # mostly at once; else the patient wait below
                conn = await entry.pool.getconn(timeout=pool_timeout(limit, CHECKS[0]))
            except psycopg_pool.PoolTimeout:
                conn = await self._patient_getconn(entry.pool, limit)
            except psycopg.Error as exc:
                raise connect_failure(exc) from exc
        except BaseException:
            if turn:
                entry.slots.give()
            raise
        self._origins[conn] = (asyncio.get_running_loop(), entry, turn)
        return conn

    async def _patient_getconn(self, pool: Any, until: float | None) -> Any:
        """Wait for a pooled connection (one request: the pool serves its waiters in order)
        until ``until`` (then Exhausted), checking meanwhile that the server answers."""
        left(until)
        await self._check_server()
        get = asyncio.ensure_future(pool.getconn(timeout=pool_timeout(until)))
        try:
            await self._patiently(get, until)
        except BaseException:
            abandon(get, pool)
            raise
        try:
            return get.result()
        except psycopg_pool.PoolTimeout as exc:  # its deadline came, the server answers
            raise Exhausted from exc
        except psycopg.Error as exc:
            raise connect_failure(exc) from exc

    async def _patiently(self, waiting: asyncio.Future[Any], until: float | None) -> None:
        """Wait for ``waiting`` until ``until`` (then Exhausted), checking meanwhile that the
        server answers (a failed check raises BackendUnavailable with libpq's words)."""
        for pause in checks():
            if waiting.done():
                return
            rest = left(until)
            await asyncio.wait((waiting,), timeout=pause if rest is None else min(pause, rest))
            if not waiting.done() and (rest is None or pause < rest):
                await self._check_server()

    async def _check_server(self) -> None:
        """Raise BackendUnavailable unless the server answers (a check shared a moment)."""
        if time.monotonic() - self._healthy_at > HEALTHY_FOR:
            await self._probe(asyncio.get_running_loop())

    async def _putconn(self, conn: Any) -> None:
        """Give a connection back, out of any transaction (or discarded when dead), to the
        pool it came from: on its own loop, and never to a pool made since."""
        if not dead(conn) and conn.info.transaction_status != IDLE:
            try:
                await conn.execute(q.ROLLBACK)
            except Exception:
                await conn.close()
        origin = self._origins.pop(conn, None)
        if origin is None:  # not one of ours (cannot happen): nobody else will close it
            await conn.close()
            return
        loop, entry, turn = origin
        if loop is asyncio.get_running_loop():
            await give_back(conn, entry, turn)
            return
        try:  # taken on another loop: its pool and slots are that loop's
            loop.call_soon_threadsafe(self._return_on_its_loop, conn, entry, turn)
        except RuntimeError:  # that loop is closed, and its pool with it
            await conn.close()

    def _return_on_its_loop(self, conn: Any, entry: LoopPool, turn: bool) -> None:
        task = asyncio.ensure_future(give_back(conn, entry, turn))
        self._returns.add(task)
        task.add_done_callback(self._returns.discard)

    # -- Backend ------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Create or update inturn's schema (idempotent; concurrent calls run one at a time)."""
        await self._drive(self._plan.migrate())

    async def join(self, key: str, token: str, lease: float) -> Grant | None:
        return await self._drive(self._plan.join(key, token, lease, sync=False))

    async def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        return await self._drive(self._plan.try_acquire(key, token, lease))

    async def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        return await self._drive(self._plan.wait(key, token, timeout))

    async def renew(self, key: str, token: str, lease: float) -> bool:
        return await self._drive(self._plan.renew(key, token, lease))

    async def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        await self._drive(self._plan.release(key, token))

    async def leave(self, key: str, token: str) -> Grant | None:
        return await self._drive(self._plan.leave(key, token))

    async def is_held(self, key: str, token: str) -> bool:
        return await self._drive(self._plan.is_held(key, token))

    async def is_busy(self, key: str) -> bool:
        return await self._drive(self._plan.is_busy(key))

    async def footprint(self) -> int:
        return await self._drive(self._plan.footprint())

    async def statistics(self, key: str | None = None, *, limit: int = 1000) -> Statistics:
        return await self._drive(_doctor.statistics(self._plan, key, limit))

    async def diagnose(self) -> Diagnostics:
        server = masked(self._conninfo if self._conninfo is not None else self._pool.conninfo)
        return await self._drive(_doctor.diagnose(self._plan, server))

    # -- DedupBackend ---------------------------------------------------------------------

    async def claim(
        self,
        key: str,
        scope: str,
        id: str,
        token: str,
        *,
        fence: int | None,
        lease: float,
        window: float,
    ) -> ClaimResult:
        return await self._drive(self._plan.claim(key, scope, id, token, fence, lease, window))

    async def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None:
        await self._drive(self._plan.finish(key, scope, id, token, result, window))

    async def abandon(self, key: str, scope: str, id: str, token: str) -> None:
        await self._drive(self._plan.abandon(key, scope, id, token))

    async def purge(self) -> None:
        """Delete every expired dedup mark and supersede row now, in batches (see
        ``Plan.purge``): for a deployment that goes quiet, from a periodic task."""
        await self._drive(self._plan.purge(every=True))

    # -- SupersedeBackend -----------------------------------------------------------------

    async def supersede(self, key: str, scope: str, *, cancel_running: bool) -> int:
        """Become the newest call of (key, scope); with ``cancel_running``, NOTIFY the running
        call's loop, whatever process or loop of this one it runs in."""
        return await self._drive(self._plan.supersede(key, scope, cancel_running))

    async def is_newest(self, key: str, scope: str, generation: int) -> bool:
        return await self._drive(self._plan.is_newest(key, scope, generation))

    async def start_running(
        self, key: str, scope: str, token: str, on_cancel: Callable[[], None]
    ) -> None:
        """Record the running call with this loop's NOTIFY channel; a newer call's
        ``supersede(cancel_running=True)``, in any process, calls ``on_cancel``."""
        listener = await self._listening()
        listener.cancels[token] = on_cancel
        try:
            await self._drive(self._plan.start_running(key, scope, token, listener.channel))
        except BaseException:
            listener.cancels.pop(token, None)
            raise

    async def stop_running(self, key: str, scope: str, token: str) -> None:
        listener = self._listeners.get(asyncio.get_running_loop())
        if listener is not None:
            listener.cancels.pop(token, None)
        await self._drive(self._plan.stop_running(key, scope, token))

    async def _listening(self) -> _Listener:
        """This loop's cancel listener, once its LISTEN is in place."""
        loop = asyncio.get_running_loop()
        listener = self._listeners.get(loop)
        if listener is None:
            listener = self._listeners[loop] = _Listener(f"inturn_{secrets.token_hex(12)}")
        if listener.task is None or listener.task.done():
            listener.task = asyncio.ensure_future(self._listen(listener))
        if not listener.ready.is_set():
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await listener.ready.wait()
            except TimeoutError as exc:
                broken = listener.broken or exc
                message = f"PostgreSQL did not answer (listen): {broken}"
                raise BackendUnavailable(message) from broken
        return listener

    async def _listen(self, listener: _Listener) -> None:
        """LISTEN on the loop's channel on a connection of its own; reconnect with backoff.

        Runs until cancelled (``aclose()``, or the loop shutting down). While it
        is disconnected, cancels sent to this loop's running calls are lost.
        """
        backoff = 0.05
        while True:
            conn = None
            try:
                conninfo = self._conninfo if self._conninfo is not None else self._pool.conninfo
                conn = await psycopg.AsyncConnection.connect(conninfo, **connection_kwargs())
                await conn.execute(q.SESSION)
                await conn.execute(f'LISTEN "{listener.channel}"')  # our own [a-z0-9_] name
                listener.broken = None
                listener.ready.set()
                backoff = 0.05
                async for note in conn.notifies():
                    on_cancel = listener.cancels.get(note.payload.removeprefix("cancel|"))
                    if on_cancel is not None:
                        on_cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                listener.ready.clear()
                listener.broken = exc
                logger.log(  # the first failure in a row is a WARNING, repeats DEBUG
                    logging.WARNING if backoff <= 0.05 else logging.DEBUG,
                    "inturn: the PostgreSQL cancel listener lost its connection (%s); "
                    "retrying in %.2fs",
                    connect_failure(exc, "listen") if isinstance(exc, psycopg.Error) else exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, LISTEN_RETRY_MAX)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close())

    # -- MailboxBackend -------------------------------------------------------------------

    async def mb_submit(
        self,
        name: str,
        key: str,
        message: str,
        *,
        max_pending: int,
        drop_oldest: bool,
        token: str,
        lease: float,
        take: int = 0,
        turn: tuple[str, float] | None = None,  # not granted here: the drainer joins
    ) -> Submitted:
        flow = self._plan.mb_submit(
            name, key, message, max_pending, drop_oldest, token, lease, take
        )
        return await self._drive(flow)

    async def mb_take(
        self,
        name: str,
        key: str,
        token: str,
        *,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,  # not granted here: the drainer joins
    ) -> Taken:
        return await self._drive(self._plan.mb_take(name, key, token, limit, lease, ack))

    async def mb_release_take(
        self,
        name: str,
        key: str,
        token: str,
        turn_token: str,
        *,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,  # the turn is not kept here
    ) -> Taken:
        flow = self._plan.mb_release_take(name, key, token, turn_token, limit, lease, ack)
        return await self._drive(flow)

    async def mb_done(self, name: str, key: str, token: str) -> None:
        await self._drive(self._plan.mb_retry(name, key, token, [], 0.0))

    async def mb_retry(
        self, name: str, key: str, token: str, messages: list[str], *, not_before: float
    ) -> None:
        await self._drive(self._plan.mb_retry(name, key, token, messages, not_before))

    async def mb_resume(self, name: str, key: str, token: str, *, lease: float) -> ResumeStatus:
        return await self._drive(self._plan.mb_resume(name, key, token, lease))

    async def mb_renew(self, name: str, key: str, token: str, *, lease: float) -> bool:
        return await self._drive(self._plan.mb_renew(name, key, token, lease))

    async def mb_pending(self, name: str, key: str) -> int:
        return await self._drive(self._plan.mb_pending(name, key))

    async def mb_draining(self, name: str, key: str) -> bool:
        return await self._drive(self._plan.mb_draining(name, key))

    async def mb_hint(self, name: str, key: str, present: bool) -> None:
        """Nothing to do: the roles and queues themselves are the index (see mb_hinted)."""

    async def mb_hinted(self, name: str) -> list[str]:
        return await self._drive(self._plan.mb_hinted(name))

    async def mb_dead(self, name: str, entries: list[str]) -> None:
        await self._drive(self._plan.mb_dead(name, entries))

    async def mb_dead_letters(self, name: str, limit: int) -> list[str]:
        return await self._drive(self._plan.mb_dead_letters(name, limit))

    # -- lifetime -------------------------------------------------------------------------

    def sync_twin(self) -> SyncPostgresBackend:
        if self._twin is None:
            self._twin = SyncPostgresBackend(
                self._plan,
                pool=self._sync_pool,
                conninfo=self._conninfo,
                max_connections=self._max,
            )
        return self._twin

    async def aclose(self) -> None:
        """Close this loop's pool and cancel listener (those of other loops close when
        their loop ends). This loop's waiters leave their lines first (at most CLOSE_WAIT
        seconds) and their waits raise; a call made on this loop afterwards is refused."""
        loop = asyncio.get_running_loop()
        self._closed_on.add(loop)
        closing = self._plan.lines.close_waiters(lambda waiter: waiter.loop is loop)
        for conns in closed_lock_waits(self._plan.lines, closing):  # they leave, on their own
            cancels = (conn.cancel_safe(timeout=CLOSE_WAIT) for conn in conns)
            await asyncio.gather(*cancels, return_exceptions=True)
            await asyncio.sleep(CLOSE_STEP)
        listener = self._listeners.pop(asyncio.get_running_loop(), None)
        if listener is not None and listener.task is not None:
            listener.task.cancel()
            with contextlib.suppress(BaseException):
                await listener.task
        self._closed_on.add(asyncio.get_running_loop())
        entry = self._pools.pop(asyncio.get_running_loop(), None)
        if entry is not None and entry.keeper is not None:
            entry.keeper.cancel()
            with contextlib.suppress(BaseException):
                await entry.keeper
        if self._twin is not None:
            self._twin.close()
