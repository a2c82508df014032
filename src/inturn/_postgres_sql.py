"""The PostgreSQL backend's SQL, shared by the async backend and its sync twin.

Every statement runs on an ``autocommit`` connection. A turn is one
transaction that holds a transaction-level advisory lock on the key's 64-bit
hash (see :mod:`._postgres` for why): ``BEGIN`` + settings + the lock, the
fence, renewals, then ``COMMIT`` (or the server ending the session).

Placeholders written ``{name}`` are filled by :func:`render` with values this
library produced itself and validated: the schema (an identifier matching
``SCHEMA_PATTERN``), integers (the key hash, milliseconds, a fence) and the
application name (printable ASCII without quotes). User data (keys, holder
ids, hosts) only ever travels as bound parameters (``%(name)s``).
"""

from __future__ import annotations

import re

__all__ = [
    "ACQUIRE",
    "APPLIED",
    "AUDIT_CLOSE",
    "AUDIT_GRANT",
    "AUDIT_OPEN",
    "BEGIN",
    "BUSY",
    "FENCE",
    "FOOTPRINT",
    "HAS_MIGRATIONS",
    "HELD",
    "MIGRATE_BEGIN",
    "MIGRATE_DONE",
    "MIGRATIONS",
    "MIGRATION_LOCK",
    "RELEASE",
    "RELEASE_AUDITED",
    "RENEW",
    "ROLLBACK",
    "SCHEMA_PATTERN",
    "SCHEMA_VERSION",
    "TRY",
    "render",
]

SCHEMA_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
"""The schema name: a lower-case identifier, so it never needs quoting."""

MIGRATION_LOCK = 0x696E7475726E0001
"""The advisory lock id that serializes concurrent ``migrate()`` calls ("inturn" + 1)."""

# -- a turn's transaction --------------------------------------------------------------

BEGIN = (
    "BEGIN;"
    " SELECT set_config('application_name', '{app}', true),"
    " set_config('idle_in_transaction_session_timeout', '{lease_ms}', true),"
    " set_config('client_connection_check_interval', '1000', true),"
    " set_config('lock_timeout', '{lock_timeout_ms}', true);"
)
"""Open a turn's transaction (simple protocol, no result needed).

{app}: application name that tags the session in pg_stat_activity while it
waits or holds (reverted at COMMIT). {lease_ms}: the lease; a holder that
sends nothing for that long is disconnected by the server, which releases its
lock. {lock_timeout_ms}: bound of a blocking lock wait (0 = none).
"""

TRY = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock('{key_hash}'::bigint)"
    " THEN nextval('{schema}.fence') END, clock_timestamp()"
)
"""Take the lock only if it is free. Appended to BEGIN.

returns: one row (fence or NULL when the lock is taken, server time). The CASE
evaluates nextval only after the lock was granted, so fences follow grants.
"""

ACQUIRE = "SELECT pg_advisory_xact_lock('{key_hash}'::bigint)"
"""Wait in PostgreSQL's lock queue for the key (inside the turn's transaction).

returns: one row, once granted. Ends with lock_timeout (55P03) or a cancel
(57014), which abort the transaction.
"""

FENCE = (
    "SELECT nextval('{schema}.fence'),"
    " set_config('idle_in_transaction_session_timeout', %(lease_ms)s, true),"
    " clock_timestamp()"
)
"""After ACQUIRE: the grant's fence, and the lease counted from this statement.

%(lease_ms)s: text. returns: (fence, _, server time).
"""

RENEW = (
    "SELECT set_config('idle_in_transaction_session_timeout', %(lease_ms)s, true),"
    " EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
    " AND pid = pg_backend_pid() AND granted AND objsubid = 1"
    " AND classid::bigint = %(classid)s AND objid::bigint = %(objid)s)"
)
"""Extend the lease to %(lease_ms)s (text) from now; say whether this session holds the lock.

returns: (_, held). A dead session raises instead (the lock died with it).
"""

HELD = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
    " AND pid = pg_backend_pid() AND granted AND objsubid = 1"
    " AND classid::bigint = %(classid)s AND objid::bigint = %(objid)s)"
)
"""returns: whether this session holds the key's lock."""

RELEASE = "COMMIT"
"""End the turn: the lock is released and PostgreSQL grants it to its next waiter."""

RELEASE_AUDITED = (
    "UPDATE {schema}.grants SET released_at = clock_timestamp(), outcome = 'released'"
    " WHERE fence = {fence} AND released_at IS NULL; COMMIT"
)
"""End an audited turn: the audit row is closed in the same commit that releases the lock."""

ROLLBACK = "ROLLBACK"

BUSY = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
    " AND objsubid = 1 AND classid::bigint = %(classid)s AND objid::bigint = %(objid)s"
    " AND database = (SELECT oid FROM pg_catalog.pg_database"
    " WHERE datname = current_database()))"
)
"""returns: whether any session holds or waits for the key's lock in this database."""

FOOTPRINT = (
    "SELECT count(*) FROM pg_catalog.pg_locks l"
    " JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.objsubid = 1"
    " AND a.application_name = %(app)s"
)
"""returns: advisory locks held or awaited by sessions tagged with this namespace's name."""

# -- audit --------------------------------------------------------------------------

AUDIT_GRANT = (
    "WITH lost AS ("
    " UPDATE {schema}.grants SET released_at = clock_timestamp(), outcome = 'lost'"
    " WHERE namespace = %(namespace)s AND key = %(key)s AND released_at IS NULL"
    " AND fence < %(fence)s)"
    " INSERT INTO {schema}.grants"
    " (fence, namespace, key, holder, host, pid, backend_pid, acquired_at)"
    " VALUES (%(fence)s, %(namespace)s, %(key)s, %(holder)s, %(host)s, %(pid)s,"
    " %(backend_pid)s, %(acquired_at)s)"
)
"""Record a grant (on another connection, autocommit, so it survives the holder).

Earlier rows of the key still open belong to holders that died or lost the
turn: the new holder holds the lock, so they are closed as 'lost'.
"""

AUDIT_CLOSE = (
    "UPDATE {schema}.grants SET released_at = clock_timestamp(), outcome = %(outcome)s"
    " WHERE fence = %(fence)s AND released_at IS NULL"
)
"""Close an audit row outside the turn's transaction (after a lost session)."""

AUDIT_OPEN = "SELECT count(*) FROM {schema}.grants WHERE namespace = %(ns)s AND released_at IS NULL"
"""returns: audit rows of the namespace still open (held turns, or holders not yet replaced)."""

# -- schema -------------------------------------------------------------------------

SCHEMA_VERSION = 3
"""The newest migration: 1 fences and audit, 2 dedup marks and supersede generations,
3 mailboxes."""

MIGRATIONS: dict[int, str] = {
    1: """
CREATE SEQUENCE IF NOT EXISTS {schema}.fence AS bigint CACHE 1;
CREATE TABLE IF NOT EXISTS {schema}.grants (
    fence        bigint PRIMARY KEY,
    namespace    text NOT NULL,
    key          text NOT NULL,
    holder       text NOT NULL,
    host         text NOT NULL,
    pid          integer NOT NULL,
    backend_pid  integer NOT NULL,
    acquired_at  timestamptz NOT NULL,
    released_at  timestamptz,
    outcome      text NOT NULL DEFAULT 'held'
                 CHECK (outcome IN ('held', 'released', 'lost'))
);
CREATE INDEX IF NOT EXISTS grants_key_time ON {schema}.grants (namespace, key, acquired_at);
CREATE INDEX IF NOT EXISTS grants_open ON {schema}.grants (namespace, key)
    WHERE released_at IS NULL;
""",
}
"""version -> DDL (idempotent). The fence sequence has CACHE 1: with a cache,
sessions would hand out values out of order."""

MIGRATE_BEGIN = (
    "BEGIN; SELECT pg_advisory_xact_lock('{lock}'::bigint);"
    " CREATE SCHEMA IF NOT EXISTS {schema};"
    " CREATE TABLE IF NOT EXISTS {schema}.migrations"
    " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());"
)
"""Start a migration: one at a time per database (an advisory lock), then the bookkeeping."""

MIGRATE_DONE = "INSERT INTO {schema}.migrations (version) VALUES ({version}) ON CONFLICT DO NOTHING"

HAS_MIGRATIONS = "SELECT to_regclass('{schema}.migrations') IS NOT NULL"
"""returns: whether the schema was ever migrated."""

APPLIED = "SELECT coalesce(max(version), 0) FROM {schema}.migrations"
"""returns: the newest applied migration."""


def render(template: str, **values: object) -> str:
    """Fill a ``{name}`` template with values validated by the caller (never user data)."""
    return template.format(**values)
