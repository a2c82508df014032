"""What each engine keeps for one user key, counted straight from its storage.

For the erasure tests: Redis keys are found by SCAN (every key of the namespace whose
name holds the user's hash tag, hint-set memberships, dead letters naming the user),
PostgreSQL rows by counting each of inturn's tables, memory entries from its state.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg

import inturn
from inturn._backends.redis._keys import KeySpace


def _names_user(entry: str, key: str) -> bool:
    try:
        return bool(json.loads(entry)["m"]["k"] == key)
    except (ValueError, KeyError, TypeError):
        return False


def redis_kept(client: Any, namespace: str, key: str) -> int:
    """Keys of the user, hint memberships and dead letters that name it (a SCAN of every
    master, with a Cluster client)."""
    space = KeySpace(namespace)
    kept = 0
    for raw in client.scan_iter(match=space.prefix + "*", count=1000):
        name = raw.decode()
        parsed = space.parse(name)
        if parsed is None:
            continue
        if parsed.key == key:
            kept += 1
        elif parsed.kind == "hint":
            kept += int(client.sismember(name, key))
        elif parsed.kind == "dead":
            kept += sum(_names_user(e.decode(), key) for e in client.lrange(name, 0, -1))
    return kept


_TABLES = ("mb_messages", "mb_roles", "dedup", "supersede", "grants")


def postgres_kept(dsn: str, namespace: str, key: str) -> int:
    """Rows of the user in every table of inturn's schema, and dead letters naming it."""
    dsn = dsn.split("?")[0]
    kept = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in _TABLES:
            row = conn.execute(
                f"SELECT count(*) FROM inturn.{table} WHERE namespace = %s AND key = %s",
                (namespace, key),
            ).fetchone()
            assert row is not None
            kept += int(row[0])
        entries = conn.execute(
            "SELECT entry FROM inturn.mb_dead WHERE namespace = %s", (namespace,)
        ).fetchall()
        kept += sum(_names_user(e[0], key) for e in entries)
    return kept


def memory_kept(gate: inturn.Gate, key: str) -> int:
    """Turn entries, mailbox queues, dedup marks and dead letters of the user in a memory gate."""
    core: Any = gate.backend._core  # type: ignore[attr-defined]
    kept = int(key in core._keys)
    kept += sum(1 for _, name in core._boxes if name == key)
    kept += sum(1 for mark in core._marks if mark[0] == key)
    kept += sum(_names_user(e, key) for entries in core._dead.values() for e in entries)
    return kept
