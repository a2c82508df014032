"""What the PostgreSQL engine does, once, as sans-I/O flows; the twins only run them.

A flow is a generator: it yields a step (run this statement on a pooled
connection, on this turn's connection, take or give back a connection, sleep
until woken), receives the step's answer (a row, rows, a connection) or has
the step's exception thrown in at the ``yield``, and returns the result of
the call. :class:`~._async.PostgresBackend` drives the flows with ``await``,
:class:`~._sync.SyncPostgresBackend` by blocking; so both twins share every
decision: the statements, the local lines, how a lock wait is bounded (the
server's ``lock_timeout``; a cancelled task also ends it), how an interrupted
wait is resolved, and when a turn's connection may go back to the pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import psycopg
import psycopg.errors

from inturn._backends._wakeup import closed_while_waiting
from inturn._backends.base import ClaimResult, Grant, ResumeStatus, SubmitStatus, Submitted, Taken
from inturn._errors import BackendUnavailable, ConfigurationError

from . import _sql as q
from ._lines import Holding, LocalLines, Waiter
from ._sql import halves, ms, stored, unstored
from ._statements import PURGE_LIMIT, Statements
from ._steps import (
    INERROR,
    INTRANS,
    TRANSPORT_ERRORS,
    Connect,
    Exhausted,
    Flow,
    On,
    PutBack,
    Run,
    Sleep,
    dead,
    map_errors,
)

__all__ = ["MAX_CONNECTIONS", "Plan"]

logger = logging.getLogger("inturn")

MAX_CONNECTIONS = 32
"""Pooled connections per event loop (and one pool for threads) made by from_url.

A key with activity in this process uses at most two at a time (its holder's
and its head waiter's), whatever the number of waiters; turns share all but an
eighth of them (see :mod:`._slots`).
"""
SUPERSEDE_KEEP = 3600.0
"""Seconds a (key, function) generation and running-call record outlive their last use."""
PURGE_INTERVAL = 30.0
"""At most this often (seconds) a process's dedup claims also delete expired rows."""


# -- rows ---------------------------------------------------------------------------


def _claimed(row: Any) -> ClaimResult:
    state = str(row[0])
    if state == "done":
        return ClaimResult("done", None if row[1] is None else unstored(row[1]))
    return ClaimResult("new" if state == "new" else "in_progress")


def _taken(status: int, wait: Any, messages: Any) -> Taken:
    """mb_take's answer: 1 taken, 0 empty (role given up), 2 head waits, -1 not the drainer."""
    if status == 1:
        return Taken(messages=tuple(unstored(m) for m in messages or ()))
    if status == 2:
        return Taken(retry_in=float(wait))
    return Taken(lost_role=status == -1)


def _submitted(row: Any) -> Submitted:
    status, dropped, take, wait, messages = row
    first = None if take is None else _taken(int(take), wait, messages)
    return Submitted(SubmitStatus(int(status)), int(dropped), first)


def _raise_outage(outage: BackendUnavailable | None) -> None:
    """Raise a copy of a line's outage (each waiter gets an exception of its own)."""
    if outage is not None:
        raise BackendUnavailable(str(outage), transient=outage.transient) from outage.__cause__


def _once(entry: str) -> str:
    """What makes a dead letter the same as another: the failed message it carries (its
    unique tag and attempt count; not the failure time, which a redelivery changes), or
    the whole text when it is not a letter of inturn's mailboxes."""
    try:
        letter = json.loads(entry)
        same = json.dumps(letter["m"], sort_keys=True) if isinstance(letter, dict) else entry
    except (ValueError, KeyError):
        same = entry
    return hashlib.sha256(same.encode("utf-8", "surrogatepass")).hexdigest()


# -- flows ----------------------------------------------------------------------------


class Plan:
    """Every operation of the engine as a flow, and what both twins share: the statements,
    the process-local lines, whether the schema is known current, the purge clock."""

    def __init__(self, namespace: str, schema: str, audit: bool) -> None:
        self.sql = Statements(namespace, schema, audit)
        self.lines = LocalLines()
        self.migrated = False
        self.next_purge = 0.0

    def purge_due(self) -> bool:
        """True at most once per PURGE_INTERVAL (whichever twin asks first), or at once
        after a purge that found a full batch (expired rows are piling up)."""
        now = time.monotonic()
        with self.lines.lock:
            if now < self.next_purge:
                return False
            self.next_purge = now + PURGE_INTERVAL
            return True

    # -- the schema ----------------------------------------------------------------

    def migrate(self) -> Flow[None]:
        """Create or update inturn's schema (idempotent; concurrent calls run one at a time)."""
        s = self.sql
        applied = 0
        if (yield Run("migrate", s.has_migrations))[0]:
            applied = int((yield Run("migrate", s.applied))[0])
        todo = s.migrations(applied)
        if todo:
            try:
                yield Run("migrate", "; ".join(todo))
            except psycopg.errors.InsufficientPrivilege as exc:
                raise ConfigurationError(
                    f"cannot create inturn's schema {s.schema!r}: {exc}; run `inturn migrate "
                    "URL` once as a role that may, or grant CREATE on the database"
                ) from exc
        self.migrated = True

    def _ready(self) -> Flow[None]:
        if not self.migrated:
            yield from self.migrate()

    def _call(
        self, name: str, params: Mapping[str, Any] | None, *, rows: bool = False
    ) -> Flow[Any]:
        """Run the named statement (schema ready); answers its first row, or every row."""
        yield from self._ready()
        return (yield Run(name, self.sql[name], params, rows))

    # -- turns --------------------------------------------------------------------

    def join(self, key: str, token: str, lease: float, *, sync: bool) -> Flow[Grant | None]:
        """Backend.join. Only a key idle in this process talks to PostgreSQL: the head.

        The call takes its place in the key's local line before its first step (before
        any await of the async twin): calls made in order are in line in that order,
        whatever their first use of the schema or the pool costs. A join retried with a
        token already in line (or already holding) keeps its place (idempotent).
        """
        known, holding = self.lines.find(token)
        if holding is not None:
            return holding.grant
        if known is not None:
            return None  # still in line from the first attempt: wait() goes on from there
        waiter = Waiter(key, token, lease, sync=sync)
        if not self.lines.enter(waiter):
            return None  # behind others of this process: only the head talks to PostgreSQL
        try:
            yield from self._ready()
            try:
                waiter.conn = yield Connect(quick=True)
            except Exhausted:
                return None  # the pool is busy: wait() takes a connection, within its deadline
            sent = time.monotonic()
            got = yield from self._try_lock(key, lease, waiter.conn)
        except BackendUnavailable as exc:
            self.lines.failed(key, exc)  # those who joined behind it hear of it too
            if not exc.transient:  # refused outright: the caller will not leave the line
                yield from self._forget(waiter)
                raise
            # An outage: the head keeps its place; a retried join, or wait(), goes on from
            # there (the caller leaves the line if it gives up).
            conn, waiter.conn = waiter.conn, None
            if conn is not None:
                yield PutBack(conn)
            raise
        except BaseException:
            yield from self._forget(waiter)
            raise
        self.lines.answered(key)
        if got is None:
            return None  # the head: wait() queues in PostgreSQL on this connection
        grant = Grant(fence=got[0], granted_at=sent)
        conn, waiter.conn = waiter.conn, None
        self.lines.granted(waiter, Holding(key, conn, grant, sent + lease))
        yield from self._audit(key, token, grant.fence, conn, got[1])
        return grant

    def try_acquire(self, key: str, token: str, lease: float) -> Flow[Grant | None]:
        holding = Holding(key, None)
        if not self.lines.hold_if_idle(key, token, holding):
            return None
        got = None
        try:
            yield from self._ready()
            holding.conn = yield Connect(quick=True)
            sent = time.monotonic()
            got = yield from self._try_lock(key, lease, holding.conn)
        except Exhausted:
            pass  # every connection of the pool is in use: the turn cannot be taken now
        finally:
            if got is None:  # not taken (or failed): nothing is held
                self.lines.unhold(key, token)
                yield from self._give_back(holding)
        if got is None:
            return None
        holding.grant = Grant(fence=got[0], granted_at=sent)
        holding.lease_until = sent + lease
        yield from self._audit(key, token, got[0], holding.conn, got[1])
        return holding.grant

    def _try_lock(self, key: str, lease: float, conn: Any) -> Flow[tuple[int, Any] | None]:
        """BEGIN + try-lock (and the fence, in the same statement) on ``conn``; (fence,
        server time) or None (transaction left open)."""
        with map_errors("try lock"):
            taken, at, fence = yield On(conn, self.sql.try_lock(key, lease))
        if not taken:
            return None
        return int(fence), at

    def wait(self, key: str, token: str, timeout: float | None) -> Flow[Grant | None]:
        waiter, holding = self.lines.find(token)
        if waiter is None:
            return holding.grant if holding is not None else None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if waiter.closed:  # the face it waits through was closed: leave, and say so
                yield from self._closed_wait(waiter)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                _raise_outage(self.lines.outage(key))  # the time ran out in an outage
                return None
            waiter.rearm()  # before the check: a wake from now on resolves the new sleep
            if self.lines.is_head(waiter):
                try:
                    grant = yield from self._lock_wait(waiter, deadline)
                except BackendUnavailable as exc:
                    if waiter.closed:  # its lock wait was cut by the close
                        yield from self._closed_wait(waiter)
                    self.lines.failed(key, exc)
                    raise
                if waiter.closed:  # granted as the face closed: nobody will hold it
                    yield from self._closed_wait(waiter)
                return grant
            # Only the head talks to the server; the others share its outcome: while its
            # tries fail, each wait reports the failure (the caller rides it out or gives up,
            # as the head does), without a connection of its own.
            _raise_outage(self.lines.outage(key))
            yield Sleep(waiter, left)

    def _closed_wait(self, waiter: Waiter) -> Flow[None]:
        """Leave the line (releasing a grant that came meanwhile), then raise."""
        if (yield from self.leave(waiter.key, waiter.token)) is not None:
            yield from self.release(waiter.key, waiter.token)
        raise closed_while_waiting(waiter.key)

    def _lock_wait(self, waiter: Waiter, deadline: float | None) -> Flow[Grant | None]:
        """The head waits in PostgreSQL's lock queue, bounded by the server's lock_timeout.

        A cancelled task ends the wait too (psycopg cancels the statement); the
        caller then leaves, and :meth:`leave` resolves whether the lock came first.
        """
        if waiter.conn is None:
            try:
                waiter.conn = yield Connect(until=deadline)
            except Exhausted:  # the deadline came first: no connection came free
                _raise_outage(self.lines.outage(waiter.key))  # nor did the server answer
                return None
        conn = waiter.conn
        with map_errors("lock"):
            try:
                if conn.info.transaction_status == INERROR:  # a wait that failed: retried
                    yield On(conn, q.ROLLBACK)
                if waiter.closed:  # not into the lock queue: wait() leaves the line
                    return None
                begun = conn.info.transaction_status == INTRANS
                # The server's lock_timeout counts from this statement: what is left now,
                # after taking a connection, not what was left when the wait began.
                left = None if deadline is None else max(0.001, deadline - time.monotonic())
                yield On(conn, self.sql.acquire(waiter.key, waiter.lease, left, begun=begun))
            except psycopg.errors.LockNotAvailable:
                self.lines.answered(waiter.key)
                yield from self._lock_outcome(waiter)  # rolls the aborted transaction back
                return None
            except BaseException:
                if dead(conn):
                    waiter.conn = None
                    yield PutBack(conn)
                raise
        self.lines.answered(waiter.key)
        return (yield from self._fence(waiter))

    def _lock_outcome(self, waiter: Waiter) -> Flow[bool]:
        """After an interrupted lock wait: True if the waiter's connection holds the lock.

        Otherwise the connection is back out of its (aborted) transaction, or
        dropped when dead, ready for the next wait.
        """
        conn = waiter.conn
        if conn is None:
            return False
        try:
            if (
                not dead(conn)
                and conn.info.transaction_status == INTRANS
                and (yield On(conn, q.HELD, halves(self.sql.hash(waiter.key))))[0]
            ):
                return True
            if not dead(conn):
                yield On(conn, q.ROLLBACK)
        except TRANSPORT_ERRORS:
            pass
        if dead(conn):
            waiter.conn = None
            yield PutBack(conn)
        return False

    def _fence(self, waiter: Waiter) -> Flow[Grant]:
        """The lock was granted on the waiter's connection: take the fence, become the holder."""
        conn = waiter.conn
        sent = time.monotonic()
        with map_errors("fence"):
            _, at, fence = yield On(conn, self.sql["LEASE"], {"lease_ms": str(ms(waiter.lease))})
        grant = Grant(fence=int(fence), granted_at=sent)
        waiter.conn = None
        self.lines.granted(waiter, Holding(waiter.key, conn, grant, sent + waiter.lease))
        yield from self._audit(waiter.key, waiter.token, grant.fence, conn, at)
        return grant

    def _audit(self, key: str, token: str, fence: int, conn: Any, at: Any) -> Flow[None]:
        if not self.sql.audit:
            return
        try:
            row = self.sql.audit_row(key, token, fence, conn, at)
            yield Run("audit", self.sql["AUDIT_GRANT"], row)
        except Exception as exc:  # the turn is granted; a missing row must not undo it
            logger.warning(
                "inturn: could not record the grant of key %r (fence %d): %r",
                key,
                fence,
                exc,
                extra={"inturn_key": key, "inturn_fence": fence},
            )

    def _close_audit(self, fence: int | None, outcome: str) -> Flow[None]:
        if self.sql.audit and fence is not None:
            with contextlib.suppress(Exception):
                params = {"fence": fence, "outcome": outcome}
                yield Run("audit", self.sql["AUDIT_CLOSE"], params)

    def _forget(self, waiter: Waiter) -> Flow[None]:
        self.lines.remove(waiter)
        conn, waiter.conn = waiter.conn, None
        if conn is not None:
            yield PutBack(conn)

    def _give_back(self, holding: Holding) -> Flow[None]:
        conn = self.lines.give_back(holding)
        if conn is not None:
            yield PutBack(conn)

    def renew(self, key: str, token: str, lease: float) -> Flow[bool]:
        holding = self.lines.borrow(token)
        if holding is None:
            return False
        params = {"lease_ms": str(ms(lease)), **halves(self.sql.hash(key))}
        sent = time.monotonic()
        try:
            renewed = bool((yield On(holding.conn, q.RENEW, params))[1])
            if renewed:
                holding.lease_until = sent + lease
            return renewed
        except psycopg.Error as exc:
            # The session is gone (and its lock with it), or its transaction broke.
            logger.debug("inturn: renewal of key %r found the session lost: %r", key, exc)
            return False
        finally:
            yield from self._give_back(holding)

    def is_held(self, key: str, token: str) -> Flow[bool]:
        holding = self.lines.borrow(token)
        if holding is None:
            return False
        try:
            return bool((yield On(holding.conn, q.HELD, halves(self.sql.hash(key))))[0])
        except psycopg.Error:
            return False
        finally:
            yield from self._give_back(holding)

    def release(self, key: str, token: str) -> Flow[None]:
        holding = self.lines.unhold(key, token)
        if holding is None:
            return
        conn = holding.conn
        fence = holding.grant.fence if holding.grant is not None else None
        try:
            if conn is None:
                return
            if conn.info.transaction_status == INERROR:
                yield On(conn, q.ROLLBACK)
                yield from self._close_audit(fence, "released")
            else:
                yield On(conn, self.sql.release(fence))
        except TRANSPORT_ERRORS as exc:
            # A dead session holds nothing: the server released the lock when it ended.
            logger.debug("inturn: release of key %r found the session gone: %r", key, exc)
            yield from self._close_audit(fence, "lost")
        finally:
            yield from self._give_back(holding)

    def leave(self, key: str, token: str) -> Flow[Grant | None]:
        waiter, holding = self.lines.find(token)
        if waiter is None:
            return holding.grant if holding is not None else None
        if waiter.conn is not None and (yield from self._lock_outcome(waiter)):
            try:
                return (yield from self._fence(waiter))
            except BackendUnavailable:
                pass
        yield from self._forget(waiter)
        return None

    def is_busy(self, key: str) -> Flow[bool]:
        if key in self.lines.lines:
            return True
        return bool((yield Run("is_busy", q.BUSY, halves(self.sql.hash(key))))[0])

    def footprint(self) -> Flow[int]:
        """Local lines, waiters and holders + locks held or awaited by this namespace's
        sessions + audit rows still open + mailbox roles and messages."""
        s = self.sql
        count = self.lines.footprint()
        count += int((yield Run("footprint", q.FOOTPRINT, {"app": s.app}))[0])
        if self.migrated:
            ns = {"ns": s.ns}
            if s.audit:
                count += int((yield Run("footprint", s["AUDIT_OPEN"], ns))[0])
            count += int((yield Run("footprint", s["MB_FOOTPRINT"], ns))[0])
        return count

    # -- dedup marks and newest-call-wins ------------------------------------------------

    def claim(
        self,
        key: str,
        scope: str,
        id: str,
        token: str,
        fence: int | None,
        lease: float,
        window: float,
    ) -> Flow[ClaimResult]:
        params = self.sql.mark(key, scope, id, token)
        params.update(fence=fence, lease_ms=ms(lease), window_ms=ms(window))
        found = _claimed((yield from self._call("DEDUP_CLAIM", params)))
        if self.purge_due():
            yield from self.purge()
        return found

    def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, window: float
    ) -> Flow[None]:
        params = {**self.sql.mark(key, scope, id, token)}
        params["result"] = None if result is None else stored(result)
        yield from self._call("DEDUP_FINISH", {**params, "window_ms": ms(window)})

    def abandon(self, key: str, scope: str, id: str, token: str) -> Flow[None]:
        yield from self._call("DEDUP_ABANDON", self.sql.mark(key, scope, id, token))

    def purge(self, *, every: bool = False) -> Flow[None]:
        """Delete expired dedup marks and supersede rows: up to PURGE_LIMIT of each, or
        with ``every``, batch after batch until none is left.

        Claims and supersedes call it by themselves at most every PURGE_INTERVAL
        seconds per process, and at once again after a full batch, so the purge keeps
        pace with any rate of new rows (each call deletes up to PURGE_LIMIT of each);
        a failure is logged and left for the next time.
        """
        try:
            while True:
                marks, records = yield from self._call("PURGE", None)
                full = max(int(marks), int(records)) >= PURGE_LIMIT
                if full and not every:
                    with self.lines.lock:
                        self.next_purge = 0.0  # a backlog: the next claim purges again
                if not (full and every):
                    return
        except Exception as exc:
            logger.debug("inturn: purging expired dedup rows failed: %r", exc)

    def supersede(self, key: str, scope: str, cancel_running: bool) -> Flow[int]:
        """Raise (key, scope)'s generation; with ``cancel_running``, NOTIFY its running call
        (in whatever process; the gate cancels a call at most once)."""
        params = {**self.sql.scope(key, scope), "cancel": cancel_running}
        params.update(keep_ms=ms(SUPERSEDE_KEEP), local=[])
        generation = int((yield from self._call("SUPERSEDE", params))[0])
        if self.purge_due():  # its rows expire too: also where no claim ever runs
            yield from self.purge()
        return generation

    def is_newest(self, key: str, scope: str, generation: int) -> Flow[bool]:
        row = yield from self._call("IS_NEWEST", self.sql.scope(key, scope))
        return row is None or int(row[0]) <= generation

    def start_running(self, key: str, scope: str, token: str, channel: str) -> Flow[None]:
        params = {**self.sql.scope(key, scope), "token": token, "channel": channel}
        yield from self._call("START_RUNNING", {**params, "keep_ms": ms(SUPERSEDE_KEEP)})

    def stop_running(self, key: str, scope: str, token: str) -> Flow[None]:
        yield from self._call("STOP_RUNNING", {**self.sql.scope(key, scope), "token": token})

    # -- mailboxes ------------------------------------------------------------------

    def mb_submit(
        self,
        name: str,
        key: str,
        message: str,
        max_pending: int,
        drop_oldest: bool,
        token: str,
        lease: float,
        take: int,
    ) -> Flow[Submitted]:
        """Store, maybe become the drainer, and with ``take`` also take: one round trip."""
        params = self.sql.locked_box(name, key, token)
        params.update(body=stored(message), max_pending=max_pending, drop_oldest=drop_oldest)
        params.update(lease_ms=ms(lease), take=take, now=time.time())
        return _submitted((yield from self._call("MB_SUBMIT", params)))

    def mb_take(
        self, name: str, key: str, token: str, limit: int, lease: float, ack: bool
    ) -> Flow[Taken]:
        params = self.sql.locked_box(name, key, token)
        params.update(limit=limit, lease_ms=ms(lease), ack=ack, now=time.time())
        status, wait, messages = yield from self._call("MB_TAKE", params)
        return _taken(int(status), wait, messages)

    def mb_release_take(
        self,
        name: str,
        key: str,
        token: str,
        turn_token: str,
        limit: int,
        lease: float,
        ack: bool,
    ) -> Flow[Taken]:
        """The take and the turn's release in one round trip: the take runs inside the
        turn's own transaction, and the COMMIT sent with it releases the turn (and the
        take's rows) at once, so the next holder never sees this batch unacknowledged.

        Where the turn's transaction broke (or this process holds no connection for it),
        the take alone, on a pooled connection, then the rollback that ends the turn. A lost
        answer raises BackendUnavailable: the take may or may not have committed, and the
        drainer takes again without acknowledging (a redelivery, never a loss)."""
        yield from self._ready()
        holding = self.lines.unhold(key, turn_token)
        if holding is None:
            return (yield from self.mb_take(name, key, token, limit, lease, ack))
        conn = holding.conn
        fence = holding.grant.fence if holding.grant is not None else None
        try:
            if conn is None or conn.info.transaction_status == INERROR:
                taken = yield from self.mb_take(name, key, token, limit, lease, ack)
                if conn is not None:
                    yield On(conn, q.ROLLBACK)
                    yield from self._close_audit(fence, "released")
                return taken
            params = self.sql.locked_box(name, key, token)
            params.update(limit=limit, lease_ms=ms(lease), ack=ack, now=time.time())
            sql = f"{self.sql['MB_TAKE']}; {self.sql.release(fence)}"
            try:
                status, wait, messages = yield On(conn, sql, params, first=True)
            except TRANSPORT_ERRORS as exc:
                # The session is gone (its lock with it); did the COMMIT make it? Unknown.
                yield from self._close_audit(fence, "lost")
                raise BackendUnavailable(
                    f"PostgreSQL did not answer (mb_release_take): {exc}"
                ) from exc
            return _taken(int(status), wait, messages)
        finally:
            yield from self._give_back(holding)

    def mb_retry(
        self, name: str, key: str, token: str, messages: list[str], not_before: float
    ) -> Flow[None]:
        params = self.sql.locked_box(name, key, token)
        params.update(bodies=[stored(m) for m in messages], not_before=not_before)
        yield from self._call("MB_RETRY", params)

    def mb_resume(self, name: str, key: str, token: str, lease: float) -> Flow[ResumeStatus]:
        params = {**self.sql.locked_box(name, key, token), "lease_ms": ms(lease)}
        return ResumeStatus(int((yield from self._call("MB_RESUME", params))[0]))

    def mb_renew(self, name: str, key: str, token: str, lease: float) -> Flow[bool]:
        params = {**self.sql.box(name, key), "token": token, "lease_ms": ms(lease)}
        return (yield from self._call("MB_RENEW", params)) is not None

    def mb_pending(self, name: str, key: str) -> Flow[int]:
        return int((yield from self._call("MB_PENDING", self.sql.box(name, key)))[0])

    def mb_draining(self, name: str, key: str) -> Flow[bool]:
        return bool((yield from self._call("MB_DRAINING", self.sql.box(name, key)))[0])

    def mb_hinted(self, name: str) -> Flow[list[str]]:
        """The roles and queues themselves are the index: ``mb_hint`` has nothing to do."""
        rows = yield from self._call("MB_HINTED", self.sql.mailbox(name), rows=True)
        return [unstored(r[0]) for r in rows]

    def mb_dead(self, name: str, entries: list[str]) -> Flow[None]:
        """Store dead letters, each once: a call retried after its reply was lost (or a
        message redelivered because of that, and failed again) adds no second letter."""
        if entries:
            params = {**self.sql.mailbox(name), "entries": [stored(e) for e in entries]}
            params["onces"] = [_once(e) for e in entries]
            yield from self._call("MB_DEAD", params)

    def mb_dead_letters(self, name: str, limit: int) -> Flow[list[str]]:
        params = {**self.sql.mailbox(name), "limit": limit}
        rows = yield from self._call("MB_DEAD_LETTERS", params, rows=True)
        return [unstored(r[0]) for r in rows]
