"""What an operator asks of the PostgreSQL engine: ``statistics()`` and ``diagnose()``.

Both are flows (see :mod:`._plan`) that the twins drive like any other call.

What ``statistics`` can say about turns: PostgreSQL knows the advisory locks
held or awaited by this namespace's sessions, but only by their 64-bit hash.
A key's name is known when this process has a line for it, when it is asked
for (``key=``), or when an open audit row names it (``audit=1`` anywhere in
the namespace); any other busy key is listed as ``#<lock id>``. Holder and
fence come from this process's lines or the audit row; ``held_since`` from
the audit row only; ``lease_left`` only for a holder in this process (the
server enforces the lease as ``idle_in_transaction_session_timeout`` and
does not expose what is left of it).
"""

from __future__ import annotations

import time
from typing import Any

from inturn._backends.base import BoxState, Diagnostics, Finding, KeyState, Statistics
from inturn._errors import BackendUnavailable

from . import _schema as v
from . import _sql as q
from ._lines import LineView
from ._plan import Plan
from ._sql import stored, unstored, whole
from ._steps import Flow, Run

__all__ = ["MIN_SERVER_VERSION", "diagnose", "statistics"]

MIN_SERVER_VERSION = 140000
"""PostgreSQL 14: the turn's transaction sets ``client_connection_check_interval``."""
SHORT_STATEMENT_TIMEOUT_MS = 60_000
"""A role-level ``statement_timeout`` below this is named (turns set their own)."""


def statistics(plan: Plan, key: str | None, limit: int) -> Flow[Statistics]:
    s = plan.sql
    locks = yield Run("statistics", q.STAT_LOCKS, {"app": s.app}, rows=True)
    applied = 0
    if (yield Run("statistics", s.has_migrations))[0]:
        applied = int((yield Run("statistics", s.applied))[0])
    ns = {"ns": s.ns}
    opened: list[Any] = []
    boxes: list[Any] = []
    dead: list[Any] = []
    if applied >= 1:
        opened = yield Run("statistics", s["STAT_OPEN_GRANTS"], ns, rows=True)
    if applied >= 3:
        params = {**ns, "key": None if key is None else stored(key), "limit": limit + 1}
        boxes = yield Run("statistics", s["STAT_BOXES"], params, rows=True)
        dead = yield Run("statistics", s["STAT_DEAD"], ns, rows=True)

    # What this process knows: its lines (holder, fence, lease, waiters) and its sessions.
    now = time.monotonic()
    local = {line.key: line for line in plan.lines.view()}
    ours = {pid for line in local.values() for pid in line.sessions}
    audited = {unstored(r[0]): (str(r[1]), int(r[2]), float(r[3])) for r in opened}
    names = {s.hash(k): k for k in (*audited, *local, *([key] if key is not None else []))}

    held: dict[int, bool] = {}
    waiting: dict[int, int] = {}
    for classid, objid, granted, pid in locks:
        h = whole(int(classid), int(objid))
        held[h] = held.get(h, False) or bool(granted)
        if not granted and int(pid) not in ours:  # our own head counts as a local waiter
            waiting[h] = waiting.get(h, 0) + 1
    for name in local:
        held.setdefault(s.hash(name), False)

    keys: list[KeyState] = []
    for h, is_held in held.items():
        name = names.get(h, f"#{h}")
        if key is None or name == key:
            audit = audited.get(name) if is_held else None
            state = _key_state(name, local.get(name), audit, waiting.get(h, 0), now)
            if state.holder is not None or is_held or state.waiting:
                keys.append(state)
    keys.sort(key=lambda k: k.key)
    return Statistics(
        namespace=s.namespace,
        keys=tuple(keys[:limit]),
        boxes=tuple(
            BoxState(unstored(box), unstored(k), int(queued), int(taken), bool(draining))
            for box, k, queued, taken, draining in boxes[:limit]
        ),
        dead_letters={unstored(m): int(n) for m, n in dead},
        truncated=len(keys) > limit or len(boxes) > limit,
    )


def _key_state(
    name: str,
    line: LineView | None,
    audit: tuple[str, int, float] | None,
    remote_waiters: int,
    now: float,
) -> KeyState:
    """A busy key from this process's line (if any) and its holder's open audit row (if any)."""
    holder, fence, lease_left, since, queued = None, None, None, None, 0
    if line is not None:
        holder, fence, queued = line.holder, line.fence, line.waiting
        if line.lease_until is not None:
            lease_left = max(0.0, line.lease_until - now)
    if audit is not None:
        holder, fence, since = holder or audit[0], fence or audit[1], audit[2]
    return KeyState(name, holder, fence, lease_left, since, remote_waiters + queued)


def diagnose(plan: Plan, server: str) -> Flow[Diagnostics]:
    s = plan.sql
    try:
        row = yield Run("diagnose", s["DIAGNOSE_SERVER"])
    except BackendUnavailable as exc:
        finding = Finding("error", "connection", f"cannot reach PostgreSQL: {exc}")
        return Diagnostics("postgresql", server, findings=(finding,))
    number, version, statement, statement_ms, idle, lock_timeout, role, db, create, exists = row
    facts = {
        "server_version": str(version),
        "statement_timeout": str(statement),
        "idle_in_transaction_session_timeout": str(idle),
        "lock_timeout": str(lock_timeout),
        "role": str(role),
        "database": str(db),
        "schema": s.schema,
    }
    found = [_version(int(number), str(version)), _statement_timeout(int(statement_ms), facts)]
    if not exists:
        found.append(Finding("error", "schema", f"no schema {s.schema!r}: {_MIGRATE}"))
        if create:
            found.append(Finding("ok", "rights", f"role {role} may create the schema"))
        else:
            grant = f"GRANT CREATE ON DATABASE {db} TO {role}"
            message = f"role {role} may not create schema {s.schema!r}: {grant} (or migrate"
            found.append(Finding("error", "rights", f"{message} as a role that may)"))
    else:
        rights = yield Run("diagnose", s["DIAGNOSE_RIGHTS"])
        usage, tables, sequences, functions, migrations = rights
        sch, to = s.schema, f" TO {role}"
        missing = [
            grant + to
            for ok, grant in (
                (usage, f"GRANT USAGE ON SCHEMA {sch}"),
                (tables, f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {sch}"),
                (sequences, f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {sch}"),
                (functions, f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {sch}"),
            )
            if not ok
        ]
        if missing:
            needed = "; ".join(missing)
            found.append(Finding("error", "rights", f"role {role} lacks rights: {needed}"))
        else:
            found.append(Finding("ok", "rights", f"role {role} may use schema {s.schema!r}"))
        if usage and tables and migrations:
            applied = int((yield Run("diagnose", s.applied))[0])
            facts["schema_version"] = str(applied)
            found.append(_schema_version(applied))
        elif usage and tables:
            found.append(Finding("error", "schema", f"{s.schema!r} was never migrated: {_MIGRATE}"))
        else:
            found.append(Finding("warning", "schema", "cannot read the schema's version"))
    return Diagnostics("postgresql", server, str(version), "standalone", facts, tuple(found))


_MIGRATE = "run `inturn migrate URL`"


def _version(number: int, version: str) -> Finding:
    if number < MIN_SERVER_VERSION:
        need = MIN_SERVER_VERSION // 10000
        return Finding("error", "version", f"PostgreSQL {version} is too old: inturn needs {need}+")
    return Finding("ok", "version", f"PostgreSQL {version}")


def _statement_timeout(milliseconds: int, facts: dict[str, str]) -> Finding:
    setting, role = facts["statement_timeout"], facts["role"]
    if 0 < milliseconds < SHORT_STATEMENT_TIMEOUT_MS:
        return Finding(
            "ok",
            "statement_timeout",
            f"statement_timeout is {setting} for role {role}: a turn's transaction sets its "
            "own (its lock wait is bounded by the request's timeout); dedup and mailbox "
            "statements, all short, keep the role's",
        )
    return Finding("ok", "statement_timeout", f"statement_timeout is {setting}")


def _schema_version(applied: int) -> Finding:
    if applied < v.SCHEMA_VERSION:
        return Finding(
            "error",
            "schema",
            f"schema version {applied}, this inturn needs {v.SCHEMA_VERSION}: {_MIGRATE}",
        )
    if applied > v.SCHEMA_VERSION:
        return Finding(
            "warning",
            "schema",
            f"schema version {applied} is newer than this inturn's {v.SCHEMA_VERSION}",
        )
    return Finding("ok", "schema", f"schema version {applied} is current")
