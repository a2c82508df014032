"""The PostgreSQL engine's operators' calls (``AdminBackend``), as flows (see :mod:`._plan`).

A turn is a transaction holding an advisory lock, so a forced release ends the
holder's session (``pg_terminate_backend``): the server releases the lock and
grants it to the next session in its lock queue, whose fence is taken after
(greater); the old holder's next renewal or check fails, and it counts the
turn lost. ``forget`` and ``sweep`` delete rows of the namespace, each call in
one statement (one transaction). Placeholders as in :mod:`._sql`: ``{schema}``
only is rendered, every value is bound.
"""

from __future__ import annotations

from typing import Any, TypeVar

import psycopg
import psycopg.errors

from inturn._backends.admin import Forgotten, Released, SweepReport, refuse_busy
from inturn._backends.base import BoxState
from inturn._errors import ConfigurationError

from . import _sql as q
from ._plan import Plan
from ._sql import halves, stored, unstored
from ._steps import Flow, Run

__all__ = ["PostgresAdmin"]

T = TypeVar("T")

TERMINATE_WAIT_MS = 5000
"""How long a forced release waits for the holder's session to end (its lock goes with it)."""

UNDRAINED_LIMIT = 1000
"""At most this many undrained queues are listed by one sweep."""

TERMINATE_HOLDER = (
    "SELECT l.pid, pg_catalog.pg_terminate_backend(l.pid, {wait})"
    " FROM pg_catalog.pg_locks l"
    " WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted"
    " AND l.classid::bigint = %(classid)s AND l.objid::bigint = %(objid)s"
    " AND l.database = (SELECT oid FROM pg_catalog.pg_database"
    " WHERE datname = current_database())"
).replace("{wait}", str(TERMINATE_WAIT_MS))
"""End the session holding the key's turn lock, and wait for it to end. The lock id is the
key's hash, namespace included (see ``_sql.key_hash``); ``pg_locks`` shows every role's
locks, where ``pg_stat_activity`` hides other roles' session details.
returns: (pid, ended) per session ended, no row when none held it."""

AUDIT_HOLDER = (
    "SELECT holder, fence FROM {schema}.grants WHERE namespace = %(ns)s AND key = %(key)s"
    " AND released_at IS NULL ORDER BY fence DESC LIMIT 1"
)
"""returns: the key's open audit row (holder, fence), if any."""

AUDIT_LOST = (
    "UPDATE {schema}.grants SET released_at = clock_timestamp(), outcome = 'lost'"
    " WHERE namespace = %(ns)s AND key = %(key)s AND released_at IS NULL AND fence <= %(fence)s"
)
"""Close the audit rows of a turn ended by force (up to its fence)."""

LIVE_ROLES = (
    "SELECT mailbox FROM {schema}.mb_roles WHERE namespace = %(ns)s AND key = %(key)s"
    " AND lease_until > clock_timestamp()"
)
"""returns: the mailboxes whose live drainer works on the key's queue, one per row."""

FORGET = (
    "WITH m AS (DELETE FROM {schema}.mb_messages WHERE namespace = %(ns)s AND key = %(key)s"
    " RETURNING 1),"
    " r AS (DELETE FROM {schema}.mb_roles WHERE namespace = %(ns)s AND key = %(key)s"
    " RETURNING 1),"
    " d AS (DELETE FROM {schema}.dedup WHERE namespace = %(ns)s AND key = %(key)s RETURNING 1),"
    " s AS (DELETE FROM {schema}.supersede WHERE namespace = %(ns)s AND key = %(key)s"
    " RETURNING 1),"
    " g AS (DELETE FROM {schema}.grants WHERE namespace = %(ns)s AND key = %(key)s"
    " RETURNING 1)"
    " SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM d),"
    " (SELECT count(*) FROM r) + (SELECT count(*) FROM s) + (SELECT count(*) FROM g)"
)
"""Delete every row of one key in the namespace, in one transaction.
returns: (messages, dedup marks, other rows: drainer roles, supersede rows, audit rows)."""

DEAD_REMOVE = (
    "WITH x AS (DELETE FROM {schema}.mb_dead WHERE namespace = %(ns)s"
    " AND mailbox = %(mailbox)s AND entry = ANY (%(entries)s::text[]) RETURNING 1)"
    " SELECT count(*) FROM x"
)
"""returns: how many of these dead letters were deleted."""

SWEEP = (
    "WITH d AS (DELETE FROM {schema}.dedup WHERE namespace = %(ns)s"
    " AND expires_at <= clock_timestamp() RETURNING 1),"
    " s AS (DELETE FROM {schema}.supersede WHERE namespace = %(ns)s"
    " AND expires_at <= clock_timestamp() RETURNING 1),"
    " r AS (DELETE FROM {schema}.mb_roles r WHERE r.namespace = %(ns)s"
    " AND r.lease_until <= clock_timestamp() AND NOT EXISTS (SELECT 1 FROM"
    " {schema}.mb_messages m WHERE m.namespace = r.namespace AND m.mailbox = r.mailbox"
    " AND m.key = r.key) RETURNING 1),"
    " g AS (UPDATE {schema}.grants g SET released_at = clock_timestamp(), outcome = 'lost'"
    " WHERE g.namespace = %(ns)s AND g.released_at IS NULL AND NOT EXISTS (SELECT 1 FROM"
    " pg_catalog.pg_stat_activity a WHERE a.pid = g.backend_pid"
    " AND (a.backend_start IS NULL OR a.backend_start <= g.acquired_at)) RETURNING 1)"
    " SELECT (SELECT count(*) FROM g), (SELECT count(*) FROM d) + (SELECT count(*) FROM s),"
    " (SELECT count(*) FROM r)"
)
"""Delete the namespace's expired dedup marks and supersede rows and its lapsed drainer
roles of empty queues; close the audit rows of sessions that ended without releasing.
returns: (audit rows closed, marks and supersede rows deleted, roles deleted)."""

UNDRAINED = (
    "SELECT m.mailbox, m.key, count(*) FILTER (WHERE NOT m.in_flight),"
    " count(*) FILTER (WHERE m.in_flight) FROM {schema}.mb_messages m"
    " WHERE m.namespace = %(ns)s AND NOT EXISTS (SELECT 1 FROM {schema}.mb_roles r"
    " WHERE r.namespace = m.namespace AND r.mailbox = m.mailbox AND r.key = m.key"
    " AND r.lease_until > clock_timestamp())"
    " GROUP BY m.mailbox, m.key ORDER BY m.mailbox, m.key LIMIT {limit}"
).replace("{limit}", str(UNDRAINED_LIMIT))
"""returns: (mailbox, key, queued, in flight) per queue with messages and no live drainer."""


class _Flows:
    """The operators' calls as flows over one :class:`Plan`."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        schema = plan.sql.schema
        self.sql = {
            name: q.render(text, schema=schema)
            for name, text in (
                ("AUDIT_HOLDER", AUDIT_HOLDER),
                ("AUDIT_LOST", AUDIT_LOST),
                ("LIVE_ROLES", LIVE_ROLES),
                ("FORGET", FORGET),
                ("DEAD_REMOVE", DEAD_REMOVE),
                ("SWEEP", SWEEP),
                ("UNDRAINED", UNDRAINED),
            )
        }

    def _ready(self) -> Flow[None]:
        if not self.plan.migrated:
            yield from self.plan.migrate()

    def _key(self, key: str) -> dict[str, Any]:
        return {"ns": self.plan.sql.ns, "key": stored(key)}

    def force_release(self, key: str) -> Flow[Released]:
        yield from self._ready()
        s = self.plan.sql
        lock = halves(s.hash(key))
        holder, fence = None, None
        for line in self.plan.lines.view():  # a holder in this process: known here
            if line.key == key:
                holder, fence = line.holder, line.fence
        audit = yield Run("force_release", self.sql["AUDIT_HOLDER"], self._key(key))
        if audit is not None and holder is None:
            holder, fence = str(audit[0]), int(audit[1])
        try:
            ended = yield Run("force_release", TERMINATE_HOLDER, lock, rows=True)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigurationError(
                f"PostgreSQL refused to end the holder's session ({str(exc).strip()}): run it "
                "as the role the workers use, or grant pg_signal_backend to this role"
            ) from exc
        if not ended:
            return Released(key, released=False)
        if audit is not None:
            params = {**self._key(key), "fence": int(audit[1])}
            yield Run("force_release", self.sql["AUDIT_LOST"], params)
        return Released(key, True, holder, fence)

    def dead_mailboxes(self) -> Flow[dict[str, int]]:
        yield from self._ready()
        rows = yield Run(
            "dead_mailboxes", self.plan.sql["STAT_DEAD"], {"ns": self.plan.sql.ns}, rows=True
        )
        return {unstored(mailbox): int(count) for mailbox, count in rows if count}

    def mb_dead_remove(self, name: str, entries: list[str]) -> Flow[int]:
        if not entries:
            return 0
        yield from self._ready()
        params = {**self.plan.sql.mailbox(name), "entries": [stored(e) for e in entries]}
        return int((yield Run("mb_dead_remove", self.sql["DEAD_REMOVE"], params))[0])

    def forget(self, key: str, force: bool) -> Flow[Forgotten]:
        yield from self._ready()
        params = self._key(key)
        if not force:
            busy = key in self.plan.lines.lines
            if not busy:
                lock = halves(self.plan.sql.hash(key))
                busy = bool((yield Run("forget", q.BUSY, lock))[0])
            roles = yield Run("forget", self.sql["LIVE_ROLES"], params, rows=True)
            if busy or roles:
                raise refuse_busy(key, turn=busy, draining=[unstored(r[0]) for r in roles])
        messages, marks, records = yield Run("forget", self.sql["FORGET"], params)
        return Forgotten(key, messages=int(messages), marks=int(marks), records=int(records))

    def sweep(self) -> Flow[SweepReport]:
        yield from self._ready()
        ns = {"ns": self.plan.sql.ns}
        lapsed, marks, roles = yield Run("sweep", self.sql["SWEEP"], ns)
        rows = yield Run("sweep", self.sql["UNDRAINED"], ns, rows=True)
        undrained = tuple(
            BoxState(unstored(mailbox), unstored(key), int(queued), int(taken))
            for mailbox, key, queued, taken in rows
        )
        return SweepReport(
            self.plan.sql.namespace,
            expired_leases=int(lapsed),
            expired_marks=int(marks),
            idle_rows=int(roles),
            undrained=undrained,
        )


class PostgresAdmin:
    """The ``AdminBackend`` face of :class:`~inturn._backends.postgres.PostgresBackend`."""

    _plan: Plan

    async def _drive(self, flow: Flow[T]) -> T:
        raise NotImplementedError

    @property
    def _admin(self) -> _Flows:
        return _Flows(self._plan)

    async def force_release(self, key: str) -> Released:
        """See :meth:`AdminBackend.force_release`: the holder's session is ended and the
        server grants the lock to the next session in its queue (a waiter of another
        process at once; a waiter of the holder's own process once that holder's turn
        ends, as it learns at its next renewal). Holder and fence are known from this
        process's lines or an open audit row; the next holder is not reported."""
        return await self._drive(self._admin.force_release(key))

    async def dead_mailboxes(self) -> dict[str, int]:
        """See :meth:`AdminBackend.dead_mailboxes`."""
        return await self._drive(self._admin.dead_mailboxes())

    async def mb_dead_remove(self, name: str, entries: list[str]) -> int:
        """See :meth:`AdminBackend.mb_dead_remove`."""
        return await self._drive(self._admin.mb_dead_remove(name, entries))

    async def forget(self, key: str, *, force: bool = False) -> Forgotten:
        """See :meth:`AdminBackend.forget`: every row of the key (messages, roles, dedup
        marks, supersede rows, audit rows) in one transaction."""
        return await self._drive(self._admin.forget(key, force))

    async def sweep(self) -> SweepReport:
        """See :meth:`AdminBackend.sweep`. The server ends the sessions of lapsed holders by
        itself; what is left: their audit rows, expired dedup marks and supersede rows
        (of this namespace: the hot path's purge caps and skips), and lapsed roles of
        empty queues."""
        return await self._drive(self._admin.sweep())
