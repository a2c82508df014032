"""The SQL of one PostgreSQL namespace, built once: every statement with the schema and
namespace filled in, and the parameters of each kind of row (see :class:`Statements`)."""

from __future__ import annotations

import os
import socket
from typing import Any

from inturn._errors import ConfigurationError

from . import _schema as v
from . import _sql as q
from ._sql import key_hash, mailbox_hash, ms, stored

__all__ = ["PURGE_LIMIT", "Statements"]

PURGE_LIMIT = 1000
"""Expired rows of each table deleted by one purge."""


class Statements:
    """The SQL of one (namespace, schema), rendered once, and the parameters it takes.

    ``statements["NAME"]`` is :data:`._sql.NAME` rendered for the schema (any name
    of ``_sql.STATEMENTS``).
    """

    def __init__(self, namespace: str, schema: str, audit: bool) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ConfigurationError("namespace must be a non-empty str")
        if not q.SCHEMA_PATTERN.match(schema):
            raise ConfigurationError(
                f"schema must be a lower-case SQL identifier (a-z, 0-9, _), not {schema!r}"
            )
        self.namespace = namespace
        self.ns = stored(namespace)
        """The namespace as its rows keep it (see ``_sql.stored``)."""
        self.schema = schema
        self.audit = audit
        safe = "".join(
            c if c.isascii() and c.isprintable() and c not in "'\\" else "?" for c in namespace
        )
        self.app = f"inturn:{safe}"[:63]
        """The session tag while waiting or holding: printable ASCII, no quotes, <= 63 bytes."""
        self.host = socket.gethostname()
        self.named = {
            name: q.render(getattr(q, name), schema=schema, limit=PURGE_LIMIT)
            for name in q.STATEMENTS
        }
        self.has_migrations = q.render(v.HAS_MIGRATIONS, schema=schema)
        self.applied = q.render(v.APPLIED, schema=schema)

    def __getitem__(self, name: str) -> str:
        return self.named[name]

    def hash(self, key: str) -> int:
        return key_hash(self.namespace, key)

    def begin(self, lease: float, lock_timeout: float | None) -> str:
        return q.render(
            q.BEGIN,
            app=self.app,
            lease_ms=ms(lease),
            lock_timeout_ms=0 if lock_timeout is None else ms(lock_timeout),
        )

    def try_lock(self, key: str, lease: float) -> str:
        lock = q.render(q.TRY, schema=self.schema, key_hash=self.hash(key))
        return f"{self.begin(lease, None)} {lock}"

    def acquire(self, key: str, lease: float, lock_timeout: float | None, *, begun: bool) -> str:
        lock = q.render(q.ACQUIRE, key_hash=self.hash(key))
        if begun:  # the transaction of a failed TRY: only the lock wait's bound changes
            bound = 0 if lock_timeout is None else ms(lock_timeout)
            return f"SELECT set_config('lock_timeout', '{bound}', true); {lock}"
        return f"{self.begin(lease, lock_timeout)} {lock}"

    def release(self, fence: int | None) -> str:
        if self.audit and fence is not None:
            return q.render(q.RELEASE_AUDITED, schema=self.schema, fence=int(fence))
        return q.RELEASE

    def audit_row(self, key: str, token: str, fence: int, conn: Any, at: Any) -> dict[str, Any]:
        return {
            "namespace": self.ns,
            "key": stored(key),
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
        for version in range(applied + 1, v.SCHEMA_VERSION + 1):
            todo.append(q.render(v.MIGRATIONS[version], schema=self.schema))
            todo.append(q.render(v.MIGRATE_DONE, schema=self.schema, version=version))
        if not todo:
            return []
        start = q.render(v.MIGRATE_BEGIN, schema=self.schema, lock=v.MIGRATION_LOCK)
        return [s.strip().rstrip(";") for s in (start, *todo, "COMMIT")]

    def mark(self, key: str, scope: str, id: str, token: str) -> dict[str, Any]:
        return {
            "ns": self.ns,
            "key": stored(key),
            "scope": stored(scope),
            "id": stored(id),
            "token": token,
        }

    def scope(self, key: str, scope: str) -> dict[str, Any]:
        """A (key, scope) pair of the supersede table."""
        return {"ns": self.ns, "key": stored(key), "scope": stored(scope)}

    def mailbox(self, name: str) -> dict[str, Any]:
        return {"ns": self.ns, "mailbox": stored(name)}

    def box(self, name: str, key: str) -> dict[str, Any]:
        return {"ns": self.ns, "mailbox": stored(name), "key": stored(key)}

    def locked_box(self, name: str, key: str, token: str) -> dict[str, Any]:
        """A box and the lock id that serializes its operations, for the mb_* functions."""
        lock = mailbox_hash(self.namespace, name, key)
        return {**self.box(name, key), "lock": lock, "token": token}
