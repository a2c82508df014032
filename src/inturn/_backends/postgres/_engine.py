"""The PostgreSQL backend: advisory-lock turns, fences from a sequence, an optional audit table.

URLs: ``postgresql://`` or ``postgres://`` (any libpq URL), with inturn's own
query options ``audit=1``, ``schema=<name>`` (default ``inturn``) and
``max_connections=<n>`` (per event loop, and for the threads). Or inject
psycopg pools: ``PostgresBackend(pool, sync_pool=...)``.

How it keeps the contract:

- **One transaction per turn.** A turn is a transaction holding
  ``pg_advisory_xact_lock`` on a stable 64-bit hash of (namespace, key)
  (blake2b, never Python's ``hash()``), on a connection of its own. COMMIT
  releases it and PostgreSQL grants the lock straight to its next waiter.
  Transaction-level locks, not session-level: they cannot leak into a pooled
  connection (a session lock survives COMMIT and is re-entrant per
  connection, so two tokens sharing one connection would both "hold" the
  key), and they work behind PgBouncer in transaction mode.
- **The lease is enforced by the server.** The turn's transaction sets
  ``idle_in_transaction_session_timeout`` to the lease, and each renewal sets
  it again: a holder that stalls (sends nothing for ``lease`` seconds) is
  disconnected by the server, which releases its lock; a holder whose process
  dies releases when its connection drops. ``client_connection_check_interval``
  makes a waiter whose process died leave the lock queue within a second;
  client TCP keepalives cover a lost network.
- **A process-local line per key.** Only the head of a key's line waits in
  PostgreSQL's lock queue (on one connection); the others sleep on a future or
  an event and are woken one at a time: 400 waiters of one key in one process
  use two connections (the holder's and the head's). One line per key serves
  every event loop and thread of the backend (and its sync twin), so FIFO is
  exact within a process; each waiter talks to PostgreSQL from its own loop or
  thread, so a blocked event loop never holds up a waiter on another.
- **Across processes** each process has one head in PostgreSQL's lock queue,
  which grants in arrival order (``tests/postgres/test_lock_queue.py``
  measures it): the heads of the processes alternate, and a process's second
  waiter queues in PostgreSQL only once its head got the turn. So grants are
  FIFO within a process and fair but not strictly FIFO across processes;
  nobody starves.
- **Fences** come from one ``CACHE 1`` sequence taken after the lock was
  granted: strictly increasing across keys, processes and restarts.
- **Audit** (opt-in): a row per grant in ``<schema>.grants``, written on
  another connection so it survives the holder; closed in the same COMMIT
  that releases the turn, or as ``lost`` by the next grant of the key.

What it does not promise: a holder whose session the server ended (lease
lapsed, ``pg_terminate_backend``, failover) learns it at its next renewal or
check (``renew`` returns False); until then it may run beside the next holder,
as with any lease. Pass ``turn.fence`` to sinks that can refuse stale writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import secrets
import socket
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..._errors import BackendUnavailable, ConfigurationError
from .._wakeup import Wakeup
from ..base import ClaimResult, Grant, Taken
from . import _sql as q

try:
    import psycopg
    import psycopg.conninfo
    import psycopg.errors
    import psycopg_pool
    from psycopg.pq import TransactionStatus
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "the PostgreSQL backend needs psycopg 3 and psycopg-pool: pip install 'inturn[postgres]'"
    ) from exc

__all__ = ["PostgresBackend", "SyncPostgresBackend", "from_url", "key_hash", "mailbox_hash"]

logger = logging.getLogger("inturn")

CONNECT_TIMEOUT = 5.0
"""Seconds to connect, or to wait for a free pooled connection."""
MAX_CONNECTIONS = 32
"""Pooled connections per event loop (and one pool for threads) made by from_url.

A key with activity in this process uses at most two at a time (its holder's
and its head waiter's), whatever the number of waiters.
"""
TCP_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5}
"""libpq keepalives: a dead network is noticed in about 10 + 3 * 5 seconds."""

SUPERSEDE_KEEP = 3600.0
"""Seconds a (key, function) generation and running-call record outlive their last use."""
PURGE_INTERVAL = 30.0
"""At most this often (seconds) a process's dedup claims also delete expired rows."""
PURGE_LIMIT = 1000
"""Expired rows of each table deleted by one purge."""
LISTEN_RETRY_MAX = 2.0
"""Longest pause (seconds) before the cancel listener reconnects."""

_OPTIONS = ("audit", "schema", "max_connections")
_IDLE, _INTRANS, _INERROR = (
    TransactionStatus.IDLE,
    TransactionStatus.INTRANS,
    TransactionStatus.INERROR,
)


def key_hash(namespace: str, key: str) -> int:
    """The advisory lock id of a key: a signed 64-bit hash, stable across processes.

    blake2b over the length-prefixed namespace and the key (injective before
    hashing), personalised so later kinds of lock (dedup, mailbox) get ids of
    their own.
    """
    ns = namespace.encode()
    data = len(ns).to_bytes(4, "big") + ns + key.encode()
    digest = hashlib.blake2b(data, digest_size=8, person=b"inturn-turn").digest()
    return int.from_bytes(digest, "big", signed=True)


def mailbox_hash(namespace: str, mailbox: str, key: str) -> int:
    """The advisory lock id that serializes the mailbox operations of one key.

    Length-prefixed namespace and mailbox name, then the key (injective before
    hashing), personalised apart from :func:`key_hash`: never the id of a turn.
    """
    data = b""
    for part in (namespace, mailbox):
        raw = part.encode()
        data += len(raw).to_bytes(4, "big") + raw
    digest = hashlib.blake2b(data + key.encode(), digest_size=8, person=b"inturn-mbox").digest()
    return int.from_bytes(digest, "big", signed=True)


def _halves(h: int) -> dict[str, int]:
    """How pg_locks shows a bigint advisory lock: classid (high 32 bits), objid (low 32)."""
    unsigned = h & 0xFFFFFFFFFFFFFFFF
    return {"classid": unsigned >> 32, "objid": unsigned & 0xFFFFFFFF}


def _ms(seconds: float) -> int:
    """Whole milliseconds, at least 1 (0 would mean "no timeout" to PostgreSQL)."""
    return max(1, math.ceil(seconds * 1000))


def _app_name(namespace: str) -> str:
    """The session tag while waiting or holding: printable ASCII, no quotes, <= 63 bytes."""
    safe = "".join(
        c if c.isascii() and c.isprintable() and c not in "'\\" else "?" for c in namespace
    )
    return f"inturn:{safe}"[:63]


def _unavailable(exc: BaseException, what: str) -> BackendUnavailable:
    return BackendUnavailable(f"PostgreSQL did not answer ({what}): {exc}")


_TRANSPORT_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout)


def _dead(conn: Any) -> bool:
    return bool(conn.closed or conn.broken)


class _Waiter(Wakeup):
    """One token in a key's local line; woken on the loop or thread that waits."""

    __slots__ = ("conn", "key", "lease", "token")

    def __init__(self, key: str, token: str, lease: float, *, sync: bool) -> None:
        super().__init__(sync=sync)
        self.key = key
        self.token = token
        self.lease = lease
        self.conn: Any = None
        """The connection this waiter queues on in PostgreSQL (the head's only)."""


@dataclass(slots=True)
class _Holding:
    """A granted turn: its connection holds the lock inside an open transaction."""

    key: str
    conn: Any
    grant: Grant | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Serializes renew / check / release on the connection (sync renewals run on a timer)."""


@dataclass(slots=True)
class _Line:
    holder: str | None = None
    waiters: dict[str, _Waiter] = field(default_factory=dict)


class _Core:
    """The process-local lines, shared by the async backend and its sync twin.

    Every method is a short critical section under one ``threading.Lock``; no
    I/O happens inside. The head of a line is its first waiter: the only one
    that waits in PostgreSQL.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lines: dict[str, _Line] = {}
        self.waiters: dict[str, _Waiter] = {}
        self.holds: dict[str, _Holding] = {}

    def enter(self, waiter: _Waiter) -> bool:
        """Queue a waiter at the end of its key's line; True when the key was idle here."""
        with self.lock:
            line = self.lines.get(waiter.key)
            idle = line is None
            if line is None:
                line = self.lines[waiter.key] = _Line()
            line.waiters[waiter.token] = waiter
            self.waiters[waiter.token] = waiter
            return idle

    def claim(self, key: str, token: str, holding: _Holding) -> bool:
        """Become the holder-to-be of an idle key (try_acquire); False if the key has a line."""
        with self.lock:
            if key in self.lines:
                return False
            self.lines[key] = _Line(holder=token)
            self.holds[token] = holding
            return True

    def is_head(self, waiter: _Waiter) -> bool:
        with self.lock:
            line = self.lines.get(waiter.key)
            return line is not None and next(iter(line.waiters), None) == waiter.token

    def granted(self, waiter: _Waiter, holding: _Holding) -> None:
        """The waiter holds the turn now; the next waiter becomes the head."""
        with self.lock:
            line = self.lines[waiter.key]
            line.waiters.pop(waiter.token, None)
            self.waiters.pop(waiter.token, None)
            line.holder = waiter.token
            self.holds[waiter.token] = holding
            head = next(iter(line.waiters.values()), None)
        if head is not None:
            head.wake()

    def remove(self, waiter: _Waiter) -> None:
        """The waiter left: wake the new head if it was the head; forget an idle key."""
        head = None
        with self.lock:
            self.waiters.pop(waiter.token, None)
            line = self.lines.get(waiter.key)
            if line is None or waiter.token not in line.waiters:
                return
            was_head = next(iter(line.waiters)) == waiter.token
            del line.waiters[waiter.token]
            if was_head:
                head = next(iter(line.waiters.values()), None)
            if line.holder is None and not line.waiters:
                del self.lines[waiter.key]
        if head is not None:
            head.wake()

    def unhold(self, key: str, token: str) -> _Holding | None:
        """Forget the holder; the line goes when nobody waits."""
        with self.lock:
            holding = self.holds.pop(token, None)
            line = self.lines.get(key)
            if line is not None and line.holder == token:
                line.holder = None
                if not line.waiters:
                    del self.lines[key]
            return holding

    def footprint(self) -> int:
        with self.lock:
            return len(self.lines) + len(self.waiters) + len(self.holds)


class _Config:
    """What both faces share: names, SQL rendered for the schema, the local lines."""

    def __init__(self, namespace: str, schema: str, audit: bool) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ConfigurationError("namespace must be a non-empty str")
        if not q.SCHEMA_PATTERN.match(schema):
            raise ConfigurationError(
                f"schema must be a lower-case SQL identifier (a-z, 0-9, _), not {schema!r}"
            )
        self.namespace = namespace
        self.schema = schema
        self.audit = audit
        self.app = _app_name(namespace)
        self.host = socket.gethostname()
        self.core = _Core()
        self.migrated = False
        self.fence_sql = q.render(q.FENCE, schema=schema)
        self.audit_grant = q.render(q.AUDIT_GRANT, schema=schema)
        self.audit_close = q.render(q.AUDIT_CLOSE, schema=schema)
        self.open_rows = q.render(q.AUDIT_OPEN, schema=schema)
        self.sql = {name: q.render(getattr(q, name), schema=schema) for name in _STATEMENTS}
        self.sql["PURGE"] = q.render(q.PURGE, schema=schema, limit=PURGE_LIMIT)
        self.next_purge = 0.0

    def purge_due(self) -> bool:
        """True at most once per PURGE_INTERVAL (whichever twin asks first)."""
        now = time.monotonic()
        with self.core.lock:
            if now < self.next_purge:
                return False
            self.next_purge = now + PURGE_INTERVAL
            return True

    def mark(self, key: str, scope: str, id: str, token: str) -> dict[str, Any]:
        return {"ns": self.namespace, "key": key, "scope": scope, "id": id, "token": token}

    def claim(
        self,
        key: str,
        scope: str,
        id: str,
        token: str,
        fence: int | None,
        lease: float,
        window: float,
    ) -> dict[str, Any]:
        """DEDUP_CLAIM's parameters (shared by the async backend and its twin)."""
        marked = self.mark(key, scope, id, token)
        return {**marked, "fence": fence, "lease_ms": _ms(lease), "window_ms": _ms(window)}

    def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, window: float
    ) -> dict[str, Any]:
        """DEDUP_FINISH's parameters."""
        return {**self.mark(key, scope, id, token), "result": result, "window_ms": _ms(window)}

    def scope(self, key: str, scope: str) -> dict[str, Any]:
        """A (key, scope) pair of the supersede table."""
        return {"ns": self.namespace, "key": key, "scope": scope}

    def supersede(
        self, key: str, scope: str, cancel_running: bool, local: list[str]
    ) -> dict[str, Any]:
        """SUPERSEDE's parameters; ``local``: this backend's own NOTIFY channels (skipped)."""
        keep = _ms(SUPERSEDE_KEEP)
        return {**self.scope(key, scope), "cancel": cancel_running, "keep_ms": keep, "local": local}

    def box(self, name: str, key: str) -> dict[str, Any]:
        return {"ns": self.namespace, "mailbox": name, "key": key}

    def locked_box(self, name: str, key: str) -> dict[str, Any]:
        return {**self.box(name, key), "lock": mailbox_hash(self.namespace, name, key)}

    def begin(self, lease: float, lock_timeout: float | None) -> str:
        return q.render(
            q.BEGIN,
            app=self.app,
            lease_ms=_ms(lease),
            lock_timeout_ms=0 if lock_timeout is None else _ms(lock_timeout),
        )

    def try_lock(self, key: str, lease: float) -> str:
        return (
            self.begin(lease, None)
            + " "
            + q.render(q.TRY, schema=self.schema, key_hash=self.hash(key))
        )

    def acquire(self, key: str, lease: float, lock_timeout: float | None, *, begun: bool) -> str:
        lock = q.render(q.ACQUIRE, key_hash=self.hash(key))
        if begun:  # the transaction of a failed TRY: only the lock wait's bound changes
            bound = 0 if lock_timeout is None else _ms(lock_timeout)
            return f"SELECT set_config('lock_timeout', '{bound}', true); {lock}"
        return self.begin(lease, lock_timeout) + " " + lock

    def release(self, fence: int | None) -> str:
        if self.audit and fence is not None:
            return q.render(q.RELEASE_AUDITED, schema=self.schema, fence=int(fence))
        return q.RELEASE

    def hash(self, key: str) -> int:
        return key_hash(self.namespace, key)

    def audit_row(self, key: str, token: str, fence: int, conn: Any, at: Any) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "key": key,
            "fence": fence,
            "holder": token,
            "host": self.host,
            "pid": os.getpid(),
            "backend_pid": conn.info.backend_pid,
            "acquired_at": at,
        }

    def migrations(self, applied: int) -> list[str]:
        """The statements that bring a schema at version ``applied`` up to date."""
        todo = []
        for version in range(applied + 1, q.SCHEMA_VERSION + 1):
            todo.append(q.render(q.MIGRATIONS[version], schema=self.schema))
            todo.append(q.render(q.MIGRATE_DONE, schema=self.schema, version=version))
        if not todo:
            return []
        start = q.render(q.MIGRATE_BEGIN, schema=self.schema, lock=q.MIGRATION_LOCK)
        return [s.strip().rstrip(";") for s in (start, *todo, "COMMIT")]


_STATEMENTS = (
    "DEDUP_CLAIM",
    "DEDUP_FINISH",
    "DEDUP_ABANDON",
    "DEDUP_ROWS",
    "SUPERSEDE",
    "IS_NEWEST",
    "START_RUNNING",
    "STOP_RUNNING",
    "MB_SUBMIT",
    "MB_TAKE",
    "MB_RETRY",
    "MB_CLAIM",
    "MB_RENEW",
    "MB_PENDING",
    "MB_DRAINING",
    "MB_HINTED",
    "MB_DEAD",
    "MB_DEAD_LETTERS",
    "MB_FOOTPRINT",
)
"""The statements of :mod:`._postgres_sql` rendered once per schema into ``_Config.sql``."""


def _claimed(row: Any) -> ClaimResult:
    state = str(row[0])
    if state == "done":
        return ClaimResult("done", row[1])
    return ClaimResult("new" if state == "new" else "in_progress")


def _taken(row: Any) -> Taken:
    status = int(row[0])
    if status == 1:
        return Taken(messages=tuple(row[2] or ()))
    if status == 2:
        return Taken(wait=float(row[1]))
    return Taken(lost_role=status == -1)


def _newest(row: Any, generation: int) -> bool:
    return row is None or int(row[0]) <= generation


def _last_row(cur: Any) -> Any:
    """The first row of a multi-statement query's last result."""
    while cur.nextset():
        pass
    return None if cur.description is None else cur.fetchone()


async def _alast(cur: Any) -> Any:
    """:func:`_last_row` for an async cursor."""
    while cur.nextset():
        pass
    return None if cur.description is None else await cur.fetchone()


def _connection_kwargs() -> dict[str, Any]:
    # prepare_threshold=None: no server-side prepared statements (PgBouncer in transaction
    # mode before 1.21 cannot route them); inturn's statements are tiny.
    return {
        "autocommit": True,
        "prepare_threshold": None,
        "connect_timeout": int(CONNECT_TIMEOUT),
        **TCP_KEEPALIVES,
    }


@dataclass(slots=True)
class _Listener:
    """A loop's LISTEN connection for cancels of its running calls ("cancel|<token>")."""

    channel: str
    cancels: dict[str, Callable[[], None]] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    broken: BaseException | None = None
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _LoopPool:
    pool: Any
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    keeper: asyncio.Task[None] | None = None


class PostgresBackend:
    """The async PostgreSQL backend. See the module docstring for what it guarantees.

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
            raise ConfigurationError("max_connections must be at least 2 (a holder and a head)")
        self._config = _Config(namespace, schema, audit)
        self._pool = pool
        self._sync_pool = sync_pool
        self._conninfo = conninfo
        self._max = max_connections
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopPool] = (
            weakref.WeakKeyDictionary()
        )
        self._twin: SyncPostgresBackend | None = None
        self._listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Listener] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "default") -> PostgresBackend:
        """Build the backend from a ``postgresql://`` URL (see the module docstring)."""
        conninfo, options = _parse_url(url)
        return cls(conninfo=conninfo, namespace=namespace, **options)

    # -- connections ------------------------------------------------------------------

    async def _pool_here(self) -> Any:
        if self._pool is not None:
            return self._pool
        loop = asyncio.get_running_loop()
        entry = self._pools.get(loop)
        if entry is None:
            pool = psycopg_pool.AsyncConnectionPool(
                self._conninfo or "",
                min_size=1,
                max_size=self._max,
                kwargs=_connection_kwargs(),
                timeout=CONNECT_TIMEOUT,
                open=False,
                name=f"inturn-{self._config.namespace}",
            )
            entry = self._pools[loop] = _LoopPool(pool)
            # The keeper closes the pool when the loop shuts down (asyncio.run cancels it)
            # while the loop still runs: its connections cannot outlive their loop.
            entry.keeper = asyncio.ensure_future(self._keep(loop, entry))
            try:
                await pool.open(wait=False)
            finally:
                entry.ready.set()
        elif not entry.ready.is_set():
            await entry.ready.wait()
        return entry.pool

    async def _keep(self, loop: asyncio.AbstractEventLoop, entry: _LoopPool) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            if self._pools.get(loop) is entry:
                del self._pools[loop]
            with contextlib.suppress(Exception):
                await asyncio.shield(entry.pool.close(timeout=1.0))

    async def _getconn(self) -> Any:
        pool = await self._pool_here()
        try:
            return await pool.getconn()
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "connect") from exc

    async def _putconn(self, conn: Any) -> None:
        """Give a connection back, out of any transaction (or discarded when dead)."""
        if not _dead(conn) and conn.info.transaction_status != _IDLE:
            try:
                await conn.execute(q.ROLLBACK)
            except Exception:
                await conn.close()
        pool = await self._pool_here()
        await pool.putconn(conn)

    async def _run(self, what: str, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """One statement on a pooled connection; returns the first row."""
        conn = await self._getconn()
        try:
            cur = await conn.execute(sql, params)
            return await _alast(cur)
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, what) from exc
        finally:
            await self._putconn(conn)

    async def migrate(self) -> None:
        """Create or update inturn's schema (idempotent; concurrent calls run one at a time)."""
        cfg = self._config
        exists = await self._run("migrate", q.render(q.HAS_MIGRATIONS, schema=cfg.schema))
        applied = 0
        if exists[0]:
            applied = (await self._run("migrate", q.render(q.APPLIED, schema=cfg.schema)))[0]
        todo = cfg.migrations(int(applied))
        if todo:
            try:
                await self._run("migrate", "; ".join(todo))
            except psycopg.errors.InsufficientPrivilege as exc:
                raise ConfigurationError(
                    f"cannot create inturn's schema {cfg.schema!r}: {exc}; run migrate() "
                    "once as a role that may, or grant CREATE on the database"
                ) from exc
        cfg.migrated = True

    async def _ready(self) -> None:
        if not self._config.migrated:
            await self.migrate()

    # -- granting ---------------------------------------------------------------------

    async def _fence(self, waiter: _Waiter) -> Grant:
        """The lock was granted on the waiter's connection: take the fence, become the holder."""
        cfg, conn = self._config, waiter.conn
        sent = time.monotonic()
        try:
            cur = await conn.execute(cfg.fence_sql, {"lease_ms": str(_ms(waiter.lease))})
            fence, _, at = await _alast(cur)
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "fence") from exc
        grant = Grant(fence=int(fence), granted_at=sent)
        waiter.conn = None
        cfg.core.granted(waiter, _Holding(waiter.key, conn, grant))
        await self._audit(waiter.key, waiter.token, grant.fence, conn, at)
        return grant

    async def _audit(self, key: str, token: str, fence: int, conn: Any, at: Any) -> None:
        cfg = self._config
        if cfg.audit:
            try:
                await self._run(
                    "audit", cfg.audit_grant, cfg.audit_row(key, token, fence, conn, at)
                )
            except Exception as exc:  # the turn is granted; a missing row must not undo it
                logger.warning(
                    "inturn: could not record the grant of key %r (fence %d): %r",
                    key,
                    fence,
                    exc,
                    extra={"inturn_key": key, "inturn_fence": fence},
                )

    async def _try(self, key: str, lease: float, conn: Any) -> tuple[int, Any] | None:
        """BEGIN + try-lock on ``conn``; (fence, server time) or None (transaction left open)."""
        try:
            cur = await conn.execute(self._config.try_lock(key, lease))
            fence, at = await _alast(cur)
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "try lock") from exc
        return None if fence is None else (int(fence), at)

    # -- the Backend protocol -----------------------------------------------------------

    async def join(self, key: str, token: str, lease: float) -> Grant | None:
        await self._ready()
        cfg = self._config
        waiter = _Waiter(key, token, lease, sync=False)
        if not cfg.core.enter(waiter):
            return None  # behind others of this process: only the head talks to PostgreSQL
        try:
            waiter.conn = await self._getconn()
            sent = time.monotonic()
            got = await self._try(key, lease, waiter.conn)
        except BaseException:
            await self._forget(waiter)
            raise
        if got is None:
            return None  # the head: wait() queues in PostgreSQL on this connection
        grant = Grant(fence=got[0], granted_at=sent)
        conn, waiter.conn = waiter.conn, None
        cfg.core.granted(waiter, _Holding(key, conn, grant))
        await self._audit(key, token, grant.fence, conn, got[1])
        return grant

    async def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        await self._ready()
        cfg = self._config
        holding = _Holding(key, None)
        if not cfg.core.claim(key, token, holding):
            return None
        try:
            holding.conn = await self._getconn()
            sent = time.monotonic()
            got = await self._try(key, lease, holding.conn)
        except BaseException:
            cfg.core.unhold(key, token)
            if holding.conn is not None:
                await self._putconn(holding.conn)
            raise
        if got is None:
            cfg.core.unhold(key, token)
            await self._putconn(holding.conn)
            return None
        holding.grant = Grant(fence=got[0], granted_at=sent)
        await self._audit(key, token, got[0], holding.conn, got[1])
        return holding.grant

    async def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        core = self._config.core
        with core.lock:
            waiter = core.waiters.get(token)
            holding = core.holds.get(token)
        if waiter is None:
            return holding.grant if holding is not None else None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            waiter.rearm()  # before the check: a wake from now on resolves the new future
            if core.is_head(waiter):
                return await self._acquire(waiter, left)
            await waiter.sleep(left)

    async def _acquire(self, waiter: _Waiter, left: float | None) -> Grant | None:
        """The head waits in PostgreSQL's lock queue, at most ``left`` seconds."""
        cfg = self._config
        if waiter.conn is None:
            waiter.conn = await self._getconn()
        conn = waiter.conn
        begun = conn.info.transaction_status == _INTRANS
        sql = cfg.acquire(waiter.key, waiter.lease, None, begun=begun)
        try:
            async with asyncio.timeout(left):
                await conn.execute(sql)
        except TimeoutError:
            # psycopg cancelled the wait; the lock may have come just before the cancel.
            if await self._settle(waiter):
                return await self._fence(waiter)
            return None
        except _TRANSPORT_ERRORS as exc:
            if _dead(conn):
                waiter.conn = None
                await self._putconn(conn)
            raise _unavailable(exc, "lock") from exc
        return await self._fence(waiter)

    async def _settle(self, waiter: _Waiter) -> bool:
        """After an interrupted lock wait: True if the waiter's connection holds the lock.

        Otherwise the connection is back out of its (aborted) transaction, or
        dropped when dead, ready for the next wait.
        """
        conn = waiter.conn
        if conn is None:
            return False
        try:
            if not _dead(conn) and conn.info.transaction_status == _INTRANS:
                cur = await conn.execute(q.HELD, _halves(self._config.hash(waiter.key)))
                if (await _alast(cur))[0]:
                    return True
            if not _dead(conn):
                await conn.execute(q.ROLLBACK)
        except _TRANSPORT_ERRORS:
            pass
        if _dead(conn):
            waiter.conn = None
            await self._putconn(conn)
        return False

    async def _forget(self, waiter: _Waiter) -> None:
        self._config.core.remove(waiter)
        conn, waiter.conn = waiter.conn, None
        if conn is not None:
            await self._putconn(conn)

    async def renew(self, key: str, token: str, lease: float) -> bool:
        holding = self._config.core.holds.get(token)
        if holding is None or holding.conn is None:
            return False
        params = {"lease_ms": str(_ms(lease)), **_halves(self._config.hash(key))}
        try:
            cur = await holding.conn.execute(q.RENEW, params)
            return bool((await _alast(cur))[1])
        except psycopg.Error as exc:
            # The session is gone (and its lock with it), or its transaction broke.
            logger.debug("inturn: renewal of key %r found the session lost: %r", key, exc)
            return False

    async def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        holding = self._config.core.unhold(key, token)
        if holding is None or holding.conn is None:
            return
        conn = holding.conn
        fence = holding.grant.fence if holding.grant is not None else None
        try:
            if conn.info.transaction_status == _INERROR:
                await conn.execute(q.ROLLBACK)
                await self._close_audit(fence, "released")
            else:
                await conn.execute(self._config.release(fence))
        except _TRANSPORT_ERRORS as exc:
            # A dead session holds nothing: the server released the lock when it ended.
            logger.debug("inturn: release of key %r found the session gone: %r", key, exc)
            await self._close_audit(fence, "lost")
        finally:
            await self._putconn(conn)

    async def _close_audit(self, fence: int | None, outcome: str) -> None:
        if self._config.audit and fence is not None:
            with contextlib.suppress(Exception):
                await self._run(
                    "audit", self._config.audit_close, {"fence": fence, "outcome": outcome}
                )

    async def leave(self, key: str, token: str) -> Grant | None:
        core = self._config.core
        with core.lock:
            waiter = core.waiters.get(token)
            holding = core.holds.get(token)
        if waiter is None:
            return holding.grant if holding is not None else None
        if waiter.conn is not None and await self._settle(waiter):
            try:
                return await self._fence(waiter)
            except BackendUnavailable:
                pass
        await self._forget(waiter)
        return None

    async def is_held(self, key: str, token: str) -> bool:
        holding = self._config.core.holds.get(token)
        if holding is None or holding.conn is None:
            return False
        try:
            cur = await holding.conn.execute(q.HELD, _halves(self._config.hash(key)))
            return bool((await _alast(cur))[0])
        except psycopg.Error:
            return False

    async def is_busy(self, key: str) -> bool:
        if key in self._config.core.lines:
            return True
        row = await self._run("is_busy", q.BUSY, _halves(self._config.hash(key)))
        return bool(row[0])

    async def footprint(self) -> int:
        """Local lines, waiters and holders + locks held or awaited by this namespace's
        sessions + audit rows still open."""
        cfg = self._config
        count = cfg.core.footprint()
        count += int((await self._run("footprint", q.FOOTPRINT, {"app": cfg.app}))[0])
        if cfg.audit and cfg.migrated:
            count += int((await self._run("footprint", cfg.open_rows, {"ns": cfg.namespace}))[0])
        if cfg.migrated:
            ns = {"ns": cfg.namespace}
            count += int((await self._run("footprint", cfg.sql["MB_FOOTPRINT"], ns))[0])
        return count

    async def _rows(self, what: str, sql: str, params: Mapping[str, Any]) -> list[Any]:
        """One statement on a pooled connection; returns every row."""
        await self._ready()
        conn = await self._getconn()
        try:
            cur = await conn.execute(sql, params)
            return list(await cur.fetchall())
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, what) from exc
        finally:
            await self._putconn(conn)

    async def _call(self, what: str, params: Mapping[str, Any]) -> Any:
        """Run the named statement of ``_postgres_sql`` (schema ready); returns its first row."""
        await self._ready()
        return await self._run(what, self._config.sql[what], params)

    # -- dedup marks (DedupBackend) -----------------------------------------------------

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
        cfg = self._config
        params = cfg.claim(key, scope, id, token, fence, lease, window)
        found = _claimed(await self._call("DEDUP_CLAIM", params))
        if cfg.purge_due():
            await self.purge()
        return found

    async def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None:
        await self._call("DEDUP_FINISH", self._config.finish(key, scope, id, token, result, window))

    async def abandon(self, key: str, scope: str, id: str, token: str) -> None:
        await self._call("DEDUP_ABANDON", self._config.mark(key, scope, id, token))

    async def purge(self) -> None:
        """Delete expired dedup marks and supersede rows (up to PURGE_LIMIT of each).

        Claims call it by themselves at most every PURGE_INTERVAL seconds per
        process; a failure is logged and left for the next time.
        """
        try:
            await self._ready()
            await self._run("purge", self._config.sql["PURGE"])
        except Exception as exc:
            logger.debug("inturn: purging expired dedup rows failed: %r", exc)

    # -- newest call wins (SupersedeBackend) ---------------------------------------------

    async def supersede(self, key: str, scope: str, *, cancel_running: bool) -> int:
        """Raise (key, scope)'s generation; with ``cancel_running``, NOTIFY its running call.

        Not when that call runs in this backend (any of its loops): the gate's own
        registry cancels it, and a second cancel of one task would turn its
        ``Superseded`` into a bare ``CancelledError``.
        """
        local = [listener.channel for listener in list(self._listeners.values())]
        params = self._config.supersede(key, scope, cancel_running, local)
        return int((await self._call("SUPERSEDE", params))[0])

    async def is_newest(self, key: str, scope: str, generation: int) -> bool:
        params = self._config.scope(key, scope)
        return _newest(await self._call("IS_NEWEST", params), generation)

    async def start_running(
        self, key: str, scope: str, token: str, on_cancel: Callable[[], None]
    ) -> None:
        """Record the running call with this loop's NOTIFY channel; a newer call's
        ``supersede(cancel_running=True)``, in any process, calls ``on_cancel``."""
        listener = await self._listening()
        listener.cancels[token] = on_cancel
        params = {
            "ns": self._config.namespace,
            "key": key,
            "scope": scope,
            "token": token,
            "channel": listener.channel,
            "keep_ms": _ms(SUPERSEDE_KEEP),
        }
        try:
            await self._call("START_RUNNING", params)
        except BaseException:
            listener.cancels.pop(token, None)
            raise

    async def stop_running(self, key: str, scope: str, token: str) -> None:
        listener = self._listeners.get(asyncio.get_running_loop())
        if listener is not None:
            listener.cancels.pop(token, None)
        params = {"ns": self._config.namespace, "key": key, "scope": scope, "token": token}
        await self._call("STOP_RUNNING", params)

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
                raise _unavailable(broken, "listen") from broken
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
                conn = await psycopg.AsyncConnection.connect(conninfo, **_connection_kwargs())
                await conn.execute(f'LISTEN "{listener.channel}"')  # our own [a-z0-9_] name
                listener.broken = None
                listener.ready.set()
                backoff = 0.05
                async for note in conn.notifies():
                    token = note.payload.removeprefix("cancel|")
                    on_cancel = listener.cancels.get(token)
                    if on_cancel is not None:
                        on_cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                listener.ready.clear()
                listener.broken = exc
                logger.warning(
                    "inturn: the PostgreSQL cancel listener lost its connection (%r); "
                    "retrying in %.2fs",
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, LISTEN_RETRY_MAX)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close())

    # -- mailboxes (MailboxBackend) -----------------------------------------------------

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
    ) -> tuple[int, int]:
        params = {
            **self._config.locked_box(name, key),
            "body": message,
            "max_pending": max_pending,
            "drop_oldest": drop_oldest,
            "token": token,
            "lease_ms": _ms(lease),
        }
        status, dropped = await self._call("MB_SUBMIT", params)
        return int(status), int(dropped)

    async def mb_take(
        self, name: str, key: str, token: str, *, limit: int, lease: float, ack: bool
    ) -> Taken:
        params = {
            **self._config.locked_box(name, key),
            "token": token,
            "limit": limit,
            "lease_ms": _ms(lease),
            "ack": ack,
            "now": time.time(),
        }
        return _taken(await self._call("MB_TAKE", params))

    async def mb_done(self, name: str, key: str, token: str) -> None:
        await self.mb_retry(name, key, token, [])

    async def mb_retry(self, name: str, key: str, token: str, messages: list[str]) -> None:
        params = {**self._config.locked_box(name, key), "token": token, "bodies": messages}
        await self._call("MB_RETRY", params)

    async def mb_claim(self, name: str, key: str, token: str, *, lease: float) -> int:
        params = {**self._config.locked_box(name, key), "token": token, "lease_ms": _ms(lease)}
        return int((await self._call("MB_CLAIM", params))[0])

    async def mb_renew(self, name: str, key: str, token: str, *, lease: float) -> bool:
        params = {**self._config.box(name, key), "token": token, "lease_ms": _ms(lease)}
        return await self._call("MB_RENEW", params) is not None

    async def mb_pending(self, name: str, key: str) -> int:
        return int((await self._call("MB_PENDING", self._config.box(name, key)))[0])

    async def mb_draining(self, name: str, key: str) -> bool:
        return bool((await self._call("MB_DRAINING", self._config.box(name, key)))[0])

    async def mb_hint(self, name: str, key: str, present: bool) -> None:
        """Nothing to do: the roles and queues themselves are the index (see mb_hinted)."""

    async def mb_hinted(self, name: str) -> list[str]:
        params = {"ns": self._config.namespace, "mailbox": name}
        return [
            str(r[0]) for r in await self._rows("mb_hinted", self._config.sql["MB_HINTED"], params)
        ]

    async def mb_dead(self, name: str, entries: list[str]) -> None:
        if entries:
            params = {"ns": self._config.namespace, "mailbox": name, "entries": entries}
            await self._call("MB_DEAD", params)

    async def mb_dead_letters(self, name: str, limit: int) -> list[str]:
        params = {"ns": self._config.namespace, "mailbox": name, "limit": limit}
        sql = self._config.sql["MB_DEAD_LETTERS"]
        return [str(r[0]) for r in await self._rows("mb_dead_letters", sql, params)]

    def sync_twin(self) -> SyncPostgresBackend:
        if self._twin is None:
            self._twin = SyncPostgresBackend(
                self._config,
                pool=self._sync_pool,
                conninfo=self._conninfo,
                max_connections=self._max,
            )
        return self._twin

    async def aclose(self) -> None:
        """Close this loop's pool and cancel listener (those of other loops close when
        their loop ends)."""
        listener = self._listeners.pop(asyncio.get_running_loop(), None)
        if listener is not None and listener.task is not None:
            listener.task.cancel()
            with contextlib.suppress(BaseException):
                await listener.task
        entry = self._pools.pop(asyncio.get_running_loop(), None)
        if entry is not None and entry.keeper is not None:
            entry.keeper.cancel()
            with contextlib.suppress(BaseException):
                await entry.keeper
        if self._twin is not None:
            self._twin.close()


class SyncPostgresBackend:
    """The sync twin of :class:`PostgresBackend`; get it with ``PostgresBackend.sync_twin()``.

    It shares the async backend's local lines, so tasks and threads of one
    process wait in one FIFO line per key. A waiting thread blocks in
    PostgreSQL's lock queue itself (bounded by ``lock_timeout``) when it is
    the head of its line, and on a ``threading.Event`` otherwise.
    """

    def __init__(
        self,
        config: _Config,
        *,
        pool: Any = None,
        conninfo: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._config = config
        self._owned = pool is None
        self._pool = pool
        self._conninfo = conninfo
        self._max = max_connections
        self._lock = threading.Lock()

    def _pool_here(self) -> Any:
        with self._lock:
            if self._pool is None:
                self._pool = psycopg_pool.ConnectionPool(
                    self._conninfo or "",
                    min_size=1,
                    max_size=self._max,
                    kwargs=_connection_kwargs(),
                    timeout=CONNECT_TIMEOUT,
                    open=True,
                    name=f"inturn-{self._config.namespace}-sync",
                )
            return self._pool

    def _getconn(self) -> Any:
        try:
            return self._pool_here().getconn()
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "connect") from exc

    def _putconn(self, conn: Any) -> None:
        if not _dead(conn) and conn.info.transaction_status != _IDLE:
            try:
                conn.execute(q.ROLLBACK)
            except Exception:
                conn.close()
        self._pool_here().putconn(conn)

    def _run(self, what: str, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        conn = self._getconn()
        try:
            return _last_row(conn.execute(sql, params))
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, what) from exc
        finally:
            self._putconn(conn)

    def migrate(self) -> None:
        """Create or update inturn's schema (idempotent; concurrent calls run one at a time)."""
        cfg = self._config
        applied = 0
        if self._run("migrate", q.render(q.HAS_MIGRATIONS, schema=cfg.schema))[0]:
            applied = self._run("migrate", q.render(q.APPLIED, schema=cfg.schema))[0]
        todo = cfg.migrations(int(applied))
        if todo:
            try:
                self._run("migrate", "; ".join(todo))
            except psycopg.errors.InsufficientPrivilege as exc:
                raise ConfigurationError(
                    f"cannot create inturn's schema {cfg.schema!r}: {exc}; run migrate() "
                    "once as a role that may, or grant CREATE on the database"
                ) from exc
        cfg.migrated = True

    def _ready(self) -> None:
        if not self._config.migrated:
            self.migrate()

    def _fence(self, waiter: _Waiter) -> Grant:
        cfg, conn = self._config, waiter.conn
        sent = time.monotonic()
        try:
            fence, _, at = _last_row(
                conn.execute(cfg.fence_sql, {"lease_ms": str(_ms(waiter.lease))})
            )
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "fence") from exc
        grant = Grant(fence=int(fence), granted_at=sent)
        waiter.conn = None
        cfg.core.granted(waiter, _Holding(waiter.key, conn, grant))
        self._audit(waiter.key, waiter.token, grant.fence, conn, at)
        return grant

    def _audit(self, key: str, token: str, fence: int, conn: Any, at: Any) -> None:
        cfg = self._config
        if cfg.audit:
            try:
                self._run("audit", cfg.audit_grant, cfg.audit_row(key, token, fence, conn, at))
            except Exception as exc:
                logger.warning(
                    "inturn: could not record the grant of key %r (fence %d): %r",
                    key,
                    fence,
                    exc,
                    extra={"inturn_key": key, "inturn_fence": fence},
                )

    def _try(self, key: str, lease: float, conn: Any) -> tuple[int, Any] | None:
        try:
            fence, at = _last_row(conn.execute(self._config.try_lock(key, lease)))
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "try lock") from exc
        return None if fence is None else (int(fence), at)

    def join(self, key: str, token: str, lease: float) -> Grant | None:
        self._ready()
        cfg = self._config
        waiter = _Waiter(key, token, lease, sync=True)
        if not cfg.core.enter(waiter):
            return None
        try:
            waiter.conn = self._getconn()
            sent = time.monotonic()
            got = self._try(key, lease, waiter.conn)
        except BaseException:
            self._forget(waiter)
            raise
        if got is None:
            return None
        grant = Grant(fence=got[0], granted_at=sent)
        conn, waiter.conn = waiter.conn, None
        cfg.core.granted(waiter, _Holding(key, conn, grant))
        self._audit(key, token, grant.fence, conn, got[1])
        return grant

    def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        self._ready()
        cfg = self._config
        holding = _Holding(key, None)
        if not cfg.core.claim(key, token, holding):
            return None
        try:
            holding.conn = self._getconn()
            sent = time.monotonic()
            got = self._try(key, lease, holding.conn)
        except BaseException:
            cfg.core.unhold(key, token)
            if holding.conn is not None:
                self._putconn(holding.conn)
            raise
        if got is None:
            cfg.core.unhold(key, token)
            self._putconn(holding.conn)
            return None
        holding.grant = Grant(fence=got[0], granted_at=sent)
        self._audit(key, token, got[0], holding.conn, got[1])
        return holding.grant

    def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        core = self._config.core
        with core.lock:
            waiter = core.waiters.get(token)
            holding = core.holds.get(token)
        if waiter is None:
            return holding.grant if holding is not None else None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            waiter.rearm()
            if core.is_head(waiter):
                return self._acquire(waiter, left)
            waiter.sleep_sync(left)

    def _acquire(self, waiter: _Waiter, left: float | None) -> Grant | None:
        cfg = self._config
        if waiter.conn is None:
            waiter.conn = self._getconn()
        conn = waiter.conn
        begun = conn.info.transaction_status == _INTRANS
        try:
            conn.execute(cfg.acquire(waiter.key, waiter.lease, left, begun=begun))
        except psycopg.errors.LockNotAvailable:
            self._settle(waiter)
            return None
        except _TRANSPORT_ERRORS as exc:
            if _dead(conn):
                waiter.conn = None
                self._putconn(conn)
            raise _unavailable(exc, "lock") from exc
        return self._fence(waiter)

    def _settle(self, waiter: _Waiter) -> bool:
        conn = waiter.conn
        if conn is None:
            return False
        try:
            halves = _halves(self._config.hash(waiter.key))
            if (
                not _dead(conn)
                and conn.info.transaction_status == _INTRANS
                and _last_row(conn.execute(q.HELD, halves))[0]
            ):
                return True
            if not _dead(conn):
                conn.execute(q.ROLLBACK)
        except _TRANSPORT_ERRORS:
            pass
        if _dead(conn):
            waiter.conn = None
            self._putconn(conn)
        return False

    def _forget(self, waiter: _Waiter) -> None:
        self._config.core.remove(waiter)
        conn, waiter.conn = waiter.conn, None
        if conn is not None:
            self._putconn(conn)

    def renew(self, key: str, token: str, lease: float) -> bool:
        holding = self._config.core.holds.get(token)
        if holding is None or holding.conn is None:
            return False
        params = {"lease_ms": str(_ms(lease)), **_halves(self._config.hash(key))}
        with holding.lock:
            if self._config.core.holds.get(token) is not holding:
                return False  # released meanwhile: the connection may serve someone else now
            try:
                return bool(_last_row(holding.conn.execute(q.RENEW, params))[1])
            except psycopg.Error as exc:
                logger.debug("inturn: renewal of key %r found the session lost: %r", key, exc)
                return False

    def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        holding = self._config.core.holds.get(token)
        if holding is None:
            return
        with holding.lock:
            if self._config.core.unhold(key, token) is None or holding.conn is None:
                return
            conn = holding.conn
            fence = holding.grant.fence if holding.grant is not None else None
            try:
                if conn.info.transaction_status == _INERROR:
                    conn.execute(q.ROLLBACK)
                    self._close_audit(fence, "released")
                else:
                    conn.execute(self._config.release(fence))
            except _TRANSPORT_ERRORS as exc:
                logger.debug("inturn: release of key %r found the session gone: %r", key, exc)
                self._close_audit(fence, "lost")
            finally:
                self._putconn(conn)

    def _close_audit(self, fence: int | None, outcome: str) -> None:
        if self._config.audit and fence is not None:
            with contextlib.suppress(Exception):
                self._run("audit", self._config.audit_close, {"fence": fence, "outcome": outcome})

    def leave(self, key: str, token: str) -> Grant | None:
        core = self._config.core
        with core.lock:
            waiter = core.waiters.get(token)
            holding = core.holds.get(token)
        if waiter is None:
            return holding.grant if holding is not None else None
        if waiter.conn is not None and self._settle(waiter):
            try:
                return self._fence(waiter)
            except BackendUnavailable:
                pass
        self._forget(waiter)
        return None

    def is_held(self, key: str, token: str) -> bool:
        holding = self._config.core.holds.get(token)
        if holding is None or holding.conn is None:
            return False
        with holding.lock:
            if self._config.core.holds.get(token) is not holding:
                return False
            try:
                return bool(
                    _last_row(holding.conn.execute(q.HELD, _halves(self._config.hash(key))))[0]
                )
            except psycopg.Error:
                return False

    def is_busy(self, key: str) -> bool:
        if key in self._config.core.lines:
            return True
        return bool(self._run("is_busy", q.BUSY, _halves(self._config.hash(key)))[0])

    def footprint(self) -> int:
        cfg = self._config
        count = cfg.core.footprint()
        count += int(self._run("footprint", q.FOOTPRINT, {"app": cfg.app})[0])
        if cfg.audit and cfg.migrated:
            count += int(self._run("footprint", cfg.open_rows, {"ns": cfg.namespace})[0])
        if cfg.migrated:
            ns = {"ns": cfg.namespace}
            count += int(self._run("footprint", cfg.sql["MB_FOOTPRINT"], ns)[0])
        return count

    def _call(self, what: str, params: Mapping[str, Any]) -> Any:
        self._ready()
        return self._run(what, self._config.sql[what], params)

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
        cfg = self._config
        params = cfg.claim(key, scope, id, token, fence, lease, window)
        found = _claimed(self._call("DEDUP_CLAIM", params))
        if cfg.purge_due():
            self.purge()
        return found

    def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None:
        self._call("DEDUP_FINISH", self._config.finish(key, scope, id, token, result, window))

    def abandon(self, key: str, scope: str, id: str, token: str) -> None:
        self._call("DEDUP_ABANDON", self._config.mark(key, scope, id, token))

    def purge(self) -> None:
        """See :meth:`PostgresBackend.purge`."""
        try:
            self._ready()
            self._run("purge", self._config.sql["PURGE"])
        except Exception as exc:
            logger.debug("inturn: purging expired dedup rows failed: %r", exc)

    def supersede(self, key: str, scope: str, *, cancel_running: bool) -> int:
        params = self._config.supersede(key, scope, cancel_running, [])
        return int(self._call("SUPERSEDE", params)[0])

    def is_newest(self, key: str, scope: str, generation: int) -> bool:
        params = self._config.scope(key, scope)
        return _newest(self._call("IS_NEWEST", params), generation)

    def close(self) -> None:
        """Close the pool this twin made (an injected pool is its owner's to close)."""
        with self._lock:
            pool, self._pool = (self._pool, None) if self._owned else (None, self._pool)
        if pool is not None:
            pool.close()


# -- URLs -------------------------------------------------------------------------------


def _parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """Split a URL into the libpq conninfo and inturn's own options."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a PostgreSQL URL: {url!r}")
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in pairs if k in _OPTIONS}
    rest = [(k, v) for k, v in pairs if k not in _OPTIONS]
    options: dict[str, Any] = {}
    if "audit" in ours:
        value = ours["audit"].lower()
        if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
            raise ConfigurationError(f"audit must be 1 or 0, not {ours['audit']!r}")
        options["audit"] = value in ("1", "true", "yes", "on")
    if "schema" in ours:
        options["schema"] = ours["schema"]
    if "max_connections" in ours:
        try:
            options["max_connections"] = int(ours["max_connections"])
        except ValueError as exc:
            raise ConfigurationError("max_connections must be an integer") from exc
    conninfo = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    try:
        psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"bad PostgreSQL URL {url!r}: {exc}") from exc
    return conninfo, options


def from_url(url: str, *, namespace: str) -> PostgresBackend:
    """Build the backend for a PostgreSQL URL (the gate's scheme registry calls this)."""
    return PostgresBackend.from_url(url, namespace=namespace)
