"""SyncPostgresBackend: runs the engine's flows (:mod:`._plan`) on psycopg's blocking connections.

What is its own: one pool for every thread, and how a step blocks. It shares
the async backend's :class:`~._plan.Plan`, so tasks and threads of one
process wait in one FIFO line per key.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from functools import partial
from typing import Any, TypeVar

import psycopg
import psycopg_pool

from inturn._backends._wakeup import closed_for_threads, raise_if_closing
from inturn._backends.base import (
    ClaimResult,
    Diagnostics,
    Grant,
    ResumeStatus,
    Statistics,
    Submitted,
    Taken,
)
from inturn._errors import BackendUnavailable

from . import _doctor
from . import _sql as q
from ._plan import MAX_CONNECTIONS, Plan
from ._slots import HEALTHY_FOR, SyncSlots, checks, left, turn_share
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
    cut,
    dead,
    map_errors,
    quiet,
)
from ._urls import CONNECT_TIMEOUT, connect_failure, connection_kwargs, masked

WAIT_GRACE = 0.5
"""How long past its timeout a thread's lock wait may run before its connection is cut (the
server's own lock_timeout answers well before, unless the link is dead)."""

__all__ = ["SyncPostgresBackend"]

_CLOSED = partial(closed_for_threads, "PostgreSQL")

T = TypeVar("T")


def _last(cur: Any) -> Any:
    """The first row of a (multi-statement) query's last result."""
    while cur.nextset():
        pass
    return None if cur.description is None else cur.fetchone()


def _first(cur: Any) -> Any:
    """The first row of a multi-statement query's first result (the rest read to the end)."""
    row = None if cur.description is None else cur.fetchone()
    while cur.nextset():
        pass
    return row


def _configure(conn: Any) -> None:
    """Every new pooled connection: see :data:`._sql.SESSION`."""
    conn.execute(q.SESSION)


def _check(conn: Any) -> None:
    """A pooled connection on its way out: checked only when not quiet (see ``quiet``)."""
    if not quiet(conn):
        psycopg_pool.ConnectionPool.check_connection(conn)


class SyncPostgresBackend:
    """The sync twin of :class:`PostgresBackend`; get it with ``PostgresBackend.sync_twin()``.

    A waiting thread blocks in PostgreSQL's lock queue itself (bounded by
    ``lock_timeout``) when it is the head of its line, and on a
    ``threading.Event`` otherwise. Every call but ``wait`` may block on the
    network: ``never_blocks`` is False.
    """

    never_blocks = False

    def __init__(
        self,
        plan: Plan,
        *,
        pool: Any = None,
        conninfo: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._plan = plan
        self._owned = pool is None
        self._pool = pool
        self._conninfo = conninfo
        self._max = max_connections
        self._lock = threading.Lock()
        self._slots = SyncSlots(turn_share(max_connections if pool is None else pool.max_size))
        self._origins: weakref.WeakKeyDictionary[Any, tuple[Any, SyncSlots, bool]] = (
            weakref.WeakKeyDictionary()
        )
        """Each connection out of a pool: that pool, its turns' share, whether a turn has it."""
        self._healthy_at = float("-inf")
        self._closed = False
        """Set by :meth:`close`: no pool is made any more (threads' calls are refused)."""
        self._reached = False
        """A connection of ours was made once: from then on the pool connects by itself."""
        self._probe_done = threading.Condition()
        self._probing = False
        self._probes = 0
        """Attempts that ended (guarded by ``_probe_done``), and the last one's error."""
        self._probe_error: BackendUnavailable | None = None

    # -- the executor -------------------------------------------------------------------

    def _drive(self, flow: Flow[T]) -> T:
        """Run a flow: do each step, send its answer back (or throw its exception in)."""
        answer: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = flow.send(answer) if error is None else flow.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            except Exception as exc:  # close() closed the pool, or cancelled, under the call
                raise_if_closing(exc, self._closed, _CLOSED)
                raise
            finally:
                error = None
            try:
                answer = self._step(step)
            except BaseException as exc:  # the flow decides, KeyboardInterrupt included
                answer, error = None, exc

    def _step(self, step: Step) -> Any:
        if isinstance(step, On):
            if step.first:
                return _first(psycopg.ClientCursor(step.conn).execute(step.sql, step.params))
            return _last(step.conn.execute(step.sql, step.params))
        if isinstance(step, Run):
            conn = self._getconn(None)
            try:
                with map_errors(step.what):
                    cur = conn.execute(step.sql, step.params)
                    return list(cur.fetchall()) if step.rows else _last(cur)
            finally:
                self._putconn(conn)
        if isinstance(step, Connect):
            return self._getconn(step.until, turn=True, quick=step.quick)
        if isinstance(step, PutBack):
            return self._putconn(step.conn)
        assert isinstance(step, Sleep)
        return step.waiter.sleep_sync(step.seconds)

    def _probe(self) -> None:
        """Connect once before the pool opens, or to check that the server answers while
        a call waits for a busy pool (see the async backend's ``_probe``); the threads
        that ask meanwhile share the attempt."""
        with self._probe_done:
            if self._probing:
                seen = self._probes
                self._probe_done.wait_for(lambda: self._probes > seen, CONNECT_TIMEOUT + 1)
                error = self._probe_error if self._probes > seen else None
                if error is not None:
                    raise BackendUnavailable(str(error), transient=error.transient) from (
                        error.__cause__
                    )
                return
            self._probing = True
        error = None
        try:
            conninfo = self._conninfo or (self._pool.conninfo if self._pool is not None else "")
            psycopg.connect(conninfo, **connection_kwargs()).close()
        except psycopg.Error as exc:
            error = connect_failure(exc, first=not self._reached)
            error.__cause__ = exc
        finally:
            with self._probe_done:
                self._probing = False
                self._probes += 1
                self._reached = self._reached or error is None
                if error is None:
                    self._healthy_at = time.monotonic()
                self._probe_error = error
                self._probe_done.notify_all()
        if error is not None:
            raise error

    def _pool_here(self) -> tuple[Any, SyncSlots]:
        if self._closed:  # a request racing close(), or made after it: no new pool to leak
            raise _CLOSED()
        if self._pool is None and not self._reached and self._owned:
            self._probe()
        with self._lock:
            if self._pool is None:
                self._pool = psycopg_pool.ConnectionPool(
                    self._conninfo or "",
                    min_size=1,
                    max_size=self._max,
                    kwargs=connection_kwargs(),
                    configure=_configure,
                    check=_check,
                    timeout=CONNECT_TIMEOUT,
                    open=True,
                    name=f"inturn-{self._plan.sql.namespace}-sync",
                )
                self._slots = SyncSlots(turn_share(self._max))
            return self._pool, self._slots

    def _getconn(self, until: float | None, *, turn: bool = False, quick: bool = False) -> Any:
        """A connection of the pool: for a turn, first a place in the turns' share (FIFO;
        ``quick``: only if free now); see :class:`._steps.Connect`. Remembers where it came
        from: it goes back there, even after that pool was closed."""
        pool, slots = self._pool_here()
        if turn and quick and not slots.take_now():
            raise Exhausted
        if turn and not quick:
            slots.take(until, self._healthy)
        limit = time.monotonic() + CONNECT_TIMEOUT if quick else until
        try:
            conn = self._from_pool(pool, limit)
        except BaseException:
            if turn:
                slots.give()
            raise
        self._origins[conn] = (pool, slots, turn)
        return conn

    def _from_pool(self, pool: Any, until: float | None) -> Any:
        """Wait for a pooled connection until ``until`` (then Exhausted), checking between
        waits that the server answers (else BackendUnavailable with libpq's words)."""
        for pause in checks():
            rest = left(until)
            try:
                return pool.getconn(timeout=pause if rest is None else min(pause, rest))
            except psycopg_pool.PoolTimeout:
                if rest is None or pause < rest:
                    self._healthy()
            except psycopg.Error as exc:
                raise connect_failure(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover - checks() never ends

    def _healthy(self) -> None:
        """Raise BackendUnavailable unless the server answers (a check shared a moment)."""
        if time.monotonic() - self._healthy_at > HEALTHY_FOR:
            self._probe()

    def _putconn(self, conn: Any) -> None:
        """Give a connection back, out of any transaction (or discarded when dead), to the
        pool it came from (a closed pool closes it); a turn's slot goes to the next."""
        if not dead(conn) and conn.info.transaction_status != IDLE:
            try:
                conn.execute(q.ROLLBACK)
            except Exception:
                conn.close()
        origin = self._origins.pop(conn, None)
        if origin is None:  # not one of ours (cannot happen): nobody else will close it
            conn.close()
            return
        pool, slots, turn = origin
        try:
            pool.putconn(conn)
        finally:
            if turn:
                slots.give()

    # -- SyncBackend ----------------------------------------------------------------------

    def migrate(self) -> None:
        """Create or update inturn's schema (idempotent; concurrent calls run one at a time)."""
        self._drive(self._plan.migrate())

    def join(self, key: str, token: str, lease: float) -> Grant | None:
        return self._drive(self._plan.join(key, token, lease, sync=True))

    def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        return self._drive(self._plan.try_acquire(key, token, lease))

    def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        if timeout is None:
            return self._drive(self._plan.wait(key, token, timeout))
        # The server bounds the lock wait (lock_timeout), but over a dead link its answer
        # never comes: past the timeout (and a grace), cut the waiter's connection.
        cutter = threading.Timer(timeout + WAIT_GRACE, self._cut_waiter, (token,))
        cutter.daemon = True
        cutter.start()
        try:
            return self._drive(self._plan.wait(key, token, timeout))
        finally:
            cutter.cancel()

    def _cut_waiter(self, token: str) -> None:
        waiter, _ = self._plan.lines.find(token)
        if waiter is not None and waiter.conn is not None:
            cut(waiter.conn)

    def renew(self, key: str, token: str, lease: float) -> bool:
        return self._drive(self._plan.renew(key, token, lease))

    def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        self._drive(self._plan.release(key, token))

    def leave(self, key: str, token: str) -> Grant | None:
        return self._drive(self._plan.leave(key, token))

    def is_held(self, key: str, token: str) -> bool:
        return self._drive(self._plan.is_held(key, token))

    def is_busy(self, key: str) -> bool:
        return self._drive(self._plan.is_busy(key))

    def footprint(self) -> int:
        return self._drive(self._plan.footprint())

    def statistics(self, key: str | None = None, *, limit: int = 1000) -> Statistics:
        return self._drive(_doctor.statistics(self._plan, key, limit))

    def diagnose(self) -> Diagnostics:
        server = masked(self._conninfo if self._conninfo is not None else self._pool.conninfo)
        return self._drive(_doctor.diagnose(self._plan, server))

    # -- SyncDedupBackend -----------------------------------------------------------------

    def claim(
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
        return self._drive(self._plan.claim(key, scope, id, token, fence, lease, window))

    def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None:
        self._drive(self._plan.finish(key, scope, id, token, result, window))

    def abandon(self, key: str, scope: str, id: str, token: str) -> None:
        self._drive(self._plan.abandon(key, scope, id, token))

    def purge(self) -> None:
        """See :meth:`PostgresBackend.purge`."""
        self._drive(self._plan.purge(every=True))

    # -- SyncSupersedeBackend -------------------------------------------------------------

    def supersede(self, key: str, scope: str, *, cancel_running: bool) -> int:
        return self._drive(self._plan.supersede(key, scope, cancel_running))

    def is_newest(self, key: str, scope: str, generation: int) -> bool:
        return self._drive(self._plan.is_newest(key, scope, generation))

    # -- SyncMailboxBackend ---------------------------------------------------------------

    def mb_submit(
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
        return self._drive(flow)

    def mb_take(
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
        return self._drive(self._plan.mb_take(name, key, token, limit, lease, ack))

    def mb_release_take(
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
        return self._drive(flow)

    def mb_done(self, name: str, key: str, token: str) -> None:
        self._drive(self._plan.mb_retry(name, key, token, [], 0.0))

    def mb_retry(
        self, name: str, key: str, token: str, messages: list[str], *, not_before: float
    ) -> None:
        self._drive(self._plan.mb_retry(name, key, token, messages, not_before))

    def mb_resume(self, name: str, key: str, token: str, *, lease: float) -> ResumeStatus:
        return self._drive(self._plan.mb_resume(name, key, token, lease))

    def mb_renew(self, name: str, key: str, token: str, *, lease: float) -> bool:
        return self._drive(self._plan.mb_renew(name, key, token, lease))

    def mb_pending(self, name: str, key: str) -> int:
        return self._drive(self._plan.mb_pending(name, key))

    def mb_draining(self, name: str, key: str) -> bool:
        return self._drive(self._plan.mb_draining(name, key))

    def mb_hint(self, name: str, key: str, present: bool) -> None:
        """Nothing to do: the roles and queues themselves are the index (see mb_hinted)."""

    def mb_hinted(self, name: str) -> list[str]:
        return self._drive(self._plan.mb_hinted(name))

    def mb_dead(self, name: str, entries: list[str]) -> None:
        self._drive(self._plan.mb_dead(name, entries))

    def mb_dead_letters(self, name: str, limit: int) -> list[str]:
        return self._drive(self._plan.mb_dead_letters(name, limit))

    def close(self) -> None:
        """Close the pool this twin made (an injected pool is its owner's to close). The
        threads' waiters leave their lines first (at most CLOSE_WAIT seconds) and their
        waits raise. Later calls are refused (a closed twin makes no new pool)."""
        self._closed = True
        closing = self._plan.lines.close_waiters(lambda waiter: waiter.loop is None)
        for conns in closed_lock_waits(self._plan.lines, closing):  # they leave, on their own
            for conn in conns:
                with contextlib.suppress(Exception):
                    conn.cancel_safe(timeout=CLOSE_WAIT)
            time.sleep(CLOSE_STEP)
        with self._lock:
            pool, self._pool = (self._pool, None) if self._owned else (None, self._pool)
        if pool is not None:
            pool.close()
