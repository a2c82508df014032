"""The PostgreSQL backend's SQL, shared by the async backend and its sync twin.

Every statement runs on an ``autocommit`` connection. A turn is one
transaction that holds a transaction-level advisory lock on the key's 64-bit
hash (see the package docstring for why): ``BEGIN`` + settings + the lock, the
fence, renewals, then ``COMMIT`` (or the server ending the session).

Placeholders written ``{name}`` are filled by :func:`render` with values this
library produced itself and validated: the schema (an identifier matching
``SCHEMA_PATTERN``), integers (the key hash, milliseconds, a fence) and the
application name (printable ASCII without quotes). User data (keys, holder
ids, hosts) only ever travels as bound parameters (``%(name)s``). The
functions at the end make those values: lock ids from keys, milliseconds.
"""

from __future__ import annotations

import hashlib
import math
import re
import string

__all__ = [
    "ACQUIRE",
    "AUDIT_CLOSE",
    "AUDIT_GRANT",
    "AUDIT_OPEN",
    "BEGIN",
    "BUSY",
    "DEDUP_ABANDON",
    "DEDUP_CLAIM",
    "DEDUP_FINISH",
    "DEDUP_ROWS",
    "DIAGNOSE_RIGHTS",
    "DIAGNOSE_SERVER",
    "FOOTPRINT",
    "HELD",
    "IS_NEWEST",
    "LEASE",
    "MB_DEAD",
    "MB_DEAD_LETTERS",
    "MB_DRAINING",
    "MB_FOOTPRINT",
    "MB_HINTED",
    "MB_PENDING",
    "MB_RENEW",
    "MB_RESUME",
    "MB_RETRY",
    "MB_SUBMIT",
    "MB_TAKE",
    "PURGE",
    "RELEASE",
    "RELEASE_AUDITED",
    "RENEW",
    "ROLLBACK",
    "SCHEMA_PATTERN",
    "SESSION",
    "START_RUNNING",
    "STAT_BOXES",
    "STAT_DEAD",
    "STAT_LOCKS",
    "STAT_OPEN_GRANTS",
    "STOP_RUNNING",
    "SUPERSEDE",
    "TRY",
    "render",
]

SCHEMA_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
"""The schema name: a lower-case identifier, so it never needs quoting."""

# -- a turn's transaction --------------------------------------------------------------

BEGIN = (
    "BEGIN;"
    " SELECT set_config('application_name', '{app}', true),"
    " set_config('idle_in_transaction_session_timeout', '{lease_ms}', true),"
    " set_config('client_connection_check_interval', '1000', true),"
    " set_config('lock_timeout', '{lock_timeout_ms}', true),"
    " set_config('statement_timeout', '0', true);"
    " SELECT set_config(name, '0', true) FROM pg_catalog.pg_settings"
    " WHERE name = 'transaction_timeout';"
)
"""Open a turn's transaction (simple protocol, no result needed).

{app}: application name that tags the session in pg_stat_activity while it
waits or holds (reverted at COMMIT). {lease_ms}: the lease; a holder that
sends nothing for that long is disconnected by the server, which releases its
lock. {lock_timeout_ms}: bound of a blocking lock wait (0 = none).

Every timeout that could end the turn is set here, whatever the role's or the
database's defaults (managed databases often set ``statement_timeout``): the lock
wait is one statement, bounded by ``lock_timeout`` alone; the turn is one
transaction, bounded by the lease alone (``transaction_timeout``, PostgreSQL 17+,
is switched off where it exists).
"""

SESSION = "SET idle_session_timeout = 0"
"""Run once on every connection inturn opens: a role's ``idle_session_timeout`` would
otherwise close pooled connections between uses (the next call on one would fail)."""

NEXT_FENCE = (
    "setval('{schema}.fence', greatest(nextval('{schema}.fence'),"
    " (extract(epoch FROM clock_timestamp()) * 1000000)::bigint))"
)
"""The expression of a grant's fence: the sequence's next value, floored by the server's
clock in microseconds (and the sequence moved up to it).

Taken inside the turn's transaction, a sequence value may not reach the disk before a
server crash, and the sequence then rewinds; the clock does not: fences keep growing
across crashes and restarts without a WAL flush per grant (as on Redis), unless the
server's clock steps back while the sequence also rewound. Two grants of one key are
always more than a microsecond apart (the first one's COMMIT lies between them).
"""

TRY = (
    "SELECT t.taken, clock_timestamp(), CASE WHEN t.taken THEN "
    + NEXT_FENCE
    + " END FROM (SELECT pg_try_advisory_xact_lock('{key_hash}'::bigint) AS taken) t"
)
"""Take the lock only if it is free, and then its fence. Appended to BEGIN.

returns: one row (taken, server time, fence or NULL).
"""

ACQUIRE = "SELECT pg_advisory_xact_lock('{key_hash}'::bigint)"
"""Wait in PostgreSQL's lock queue for the key (inside the turn's transaction).

returns: one row, once granted. Ends with lock_timeout (55P03) or a cancel
(57014), which abort the transaction.
"""

LEASE = (
    "SELECT set_config('idle_in_transaction_session_timeout', %(lease_ms)s, true),"
    " clock_timestamp(), " + NEXT_FENCE
)
"""After ACQUIRE, on the turn's connection: the lease counted from this statement, and
the grant's fence (see NEXT_FENCE).

%(lease_ms)s: text. returns: (_, server time, fence).
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

# -- dedup marks and supersede generations (migration 2) -------------------------------

DEDUP_CLAIM = (
    "SELECT o_state, o_result FROM {schema}.dedup_claim(%(ns)s, %(key)s, %(scope)s, %(id)s,"
    " %(token)s, %(fence)s, %(lease_ms)s, %(window_ms)s)"
)
"""Claim a message id (see the function's header in migration 2).

returns: (state 'new' | 'done' | 'in_progress', result JSON text or NULL).
"""

DEDUP_FINISH = (
    "UPDATE {schema}.dedup SET done = true, lease_until = NULL, result = %(result)s,"
    " expires_at = clock_timestamp() + %(window_ms)s * interval '1 millisecond'"
    " WHERE namespace = %(ns)s AND key = %(key)s AND scope = %(scope)s AND id = %(id)s"
    " AND token = %(token)s AND NOT done AND expires_at > clock_timestamp()"
)
"""Mark our claim done for the window, with the result's JSON text (or NULL).

A no-op when the claim is not ours any more (taken over, or expired).
"""

DEDUP_ABANDON = (
    "DELETE FROM {schema}.dedup"
    " WHERE namespace = %(ns)s AND key = %(key)s AND scope = %(scope)s AND id = %(id)s"
    " AND token = %(token)s AND NOT done"
)
"""The run failed: forget our in-progress claim so a retry can run (no-op if not ours)."""

PURGE = (
    "WITH d AS (DELETE FROM {schema}.dedup WHERE ctid = ANY (ARRAY("
    "SELECT ctid FROM {schema}.dedup WHERE expires_at <= clock_timestamp()"
    " LIMIT {limit} FOR UPDATE SKIP LOCKED)) RETURNING 1),"
    " s AS (DELETE FROM {schema}.supersede WHERE ctid = ANY (ARRAY("
    "SELECT ctid FROM {schema}.supersede WHERE expires_at <= clock_timestamp()"
    " LIMIT {limit} FOR UPDATE SKIP LOCKED)) RETURNING 1)"
    " SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM s)"
)
"""Delete up to {limit} expired dedup marks and supersede rows each (every namespace).

Rows another session is changing are skipped, never waited for.
returns: (dedup rows deleted, supersede rows deleted).
"""

DEDUP_ROWS = "SELECT count(*) FROM {schema}.dedup WHERE namespace = %(ns)s"
"""returns: the namespace's dedup rows, expired or not (for tests and ``inturn status``)."""

SUPERSEDE = (
    "SELECT {schema}.supersede(%(ns)s, %(key)s, %(scope)s, %(cancel)s, %(keep_ms)s,"
    " %(local)s::text[])"
)
"""Become the newest call of (key, scope); returns its generation (see migration 2)."""

IS_NEWEST = (
    "SELECT generation FROM {schema}.supersede WHERE namespace = %(ns)s AND key = %(key)s"
    " AND scope = %(scope)s AND expires_at > clock_timestamp()"
)
"""returns: the newest generation of (key, scope), or no row (nothing newer is known)."""

START_RUNNING = (
    "INSERT INTO {schema}.supersede AS s"
    " (namespace, key, scope, generation, running, channel, expires_at)"
    " VALUES (%(ns)s, %(key)s, %(scope)s, 0, %(token)s, %(channel)s,"
    " clock_timestamp() + %(keep_ms)s * interval '1 millisecond')"
    " ON CONFLICT (namespace, key, scope) DO UPDATE"
    " SET running = excluded.running, channel = excluded.channel,"
    " expires_at = greatest(s.expires_at, excluded.expires_at)"
)
"""Record the running call: its token and its process's NOTIFY channel."""

STOP_RUNNING = (
    "UPDATE {schema}.supersede SET running = NULL, channel = NULL"
    " WHERE namespace = %(ns)s AND key = %(key)s AND scope = %(scope)s"
    " AND running = %(token)s"
)
"""Forget the running-call record if it is still ours."""

# -- mailboxes (migration 3) ----------------------------------------------------------

MB_SUBMIT = (
    "SELECT o_status, o_dropped, o_take, o_wait, o_messages FROM {schema}.mb_submit(%(lock)s,"
    " %(ns)s, %(mailbox)s, %(key)s, %(body)s, %(max_pending)s, %(drop_oldest)s, %(token)s,"
    " %(lease_ms)s, %(take)s, %(now)s)"
)
"""returns: (status 1 | 0 | -1, dropped 0 | 1, then the first take's status, wait and
messages as MB_TAKE's when the caller became the drainer and asked %(take)s > 0, else NULLs):
see mb_submit in migration 4."""

MB_TAKE = (
    "SELECT o_status, o_wait, o_messages FROM {schema}.mb_take(%(lock)s, %(ns)s,"
    " %(mailbox)s, %(key)s, %(token)s, %(limit)s, %(lease_ms)s, %(ack)s, %(now)s)"
)
"""returns: (status 1 | 0 | 2 | -1, wait seconds, messages): see mb_take in migration 4."""

MB_RETRY = (
    "SELECT {schema}.mb_retry(%(lock)s, %(ns)s, %(mailbox)s, %(key)s, %(token)s,"
    " %(bodies)s::text[], %(not_before)s)"
)
"""returns: 1 | 0 not the drainer: see mb_retry in migration 4."""

MB_RESUME = (
    "SELECT {schema}.mb_resume(%(lock)s, %(ns)s, %(mailbox)s, %(key)s, %(token)s, %(lease_ms)s)"
)
"""returns: 1 resumed | 0 a live drainer exists | -1 nothing to drain (migration 4)."""

MB_RENEW = (
    "UPDATE {schema}.mb_roles SET lease_until = clock_timestamp()"
    " + %(lease_ms)s * interval '1 millisecond'"
    " WHERE namespace = %(ns)s AND mailbox = %(mailbox)s AND key = %(key)s"
    " AND token = %(token)s AND lease_until > clock_timestamp() RETURNING 1"
)
"""Extend the drainer role if it is still ours. returns: a row when renewed."""

MB_PENDING = (
    "SELECT count(*) FROM {schema}.mb_messages"
    " WHERE namespace = %(ns)s AND mailbox = %(mailbox)s AND key = %(key)s AND NOT in_flight"
)
"""returns: messages waiting (not in flight)."""

MB_DRAINING = (
    "SELECT EXISTS (SELECT 1 FROM {schema}.mb_roles"
    " WHERE namespace = %(ns)s AND mailbox = %(mailbox)s AND key = %(key)s"
    " AND lease_until > clock_timestamp())"
)
"""returns: whether a live drainer owns the queue."""

MB_HINTED = (
    "SELECT key FROM {schema}.mb_roles WHERE namespace = %(ns)s AND mailbox = %(mailbox)s"
    " UNION SELECT key FROM {schema}.mb_messages"
    " WHERE namespace = %(ns)s AND mailbox = %(mailbox)s ORDER BY key"
)
"""returns: the keys that may need a sweeper, one per row: the roles and queues themselves
are the index (an idle key has neither), so there is no hint to write or to clean up."""

MB_DEAD = (
    "INSERT INTO {schema}.mb_dead (namespace, mailbox, entry, once)"
    " SELECT %(ns)s, %(mailbox)s, e.entry, e.once"
    " FROM unnest(%(entries)s::text[], %(onces)s::text[]) WITH ORDINALITY AS e(entry, once, n)"
    " ORDER BY e.n ON CONFLICT DO NOTHING"
)
"""Safe to run twice (schema version 6): a letter whose ``once`` is stored is not stored again."""
MB_DEAD_LETTERS = (
    "SELECT entry FROM {schema}.mb_dead WHERE namespace = %(ns)s AND mailbox = %(mailbox)s"
    " ORDER BY seq LIMIT %(limit)s"
)
"""returns: the oldest dead letters, one per row."""

MB_FOOTPRINT = (
    "SELECT (SELECT count(*) FROM {schema}.mb_roles WHERE namespace = %(ns)s)"
    " + (SELECT count(*) FROM {schema}.mb_messages WHERE namespace = %(ns)s)"
)
"""returns: the namespace's drainer roles and stored messages (0 when every queue is idle)."""

# -- statistics and diagnosis (operators' calls, off the hot paths) --------------------

STAT_LOCKS = (
    "SELECT l.classid::bigint, l.objid::bigint, l.granted, l.pid"
    " FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND a.application_name = %(app)s"
)
"""returns: one row per turn lock held or awaited by a session of this namespace
(classid, objid: the two halves of the key's hash; granted; the session's pid)."""

STAT_OPEN_GRANTS = (
    "SELECT key, holder, fence, extract(epoch FROM acquired_at) FROM {schema}.grants"
    " WHERE namespace = %(ns)s AND released_at IS NULL ORDER BY fence"
)
"""returns: the audit rows still open (key, holder, fence, epoch seconds granted)."""

STAT_BOXES = (
    "SELECT mailbox, key, sum(queued)::bigint, sum(in_flight)::bigint, bool_or(draining)"
    " FROM (SELECT mailbox, key, count(*) FILTER (WHERE NOT in_flight) AS queued,"
    " count(*) FILTER (WHERE in_flight) AS in_flight, false AS draining"
    " FROM {schema}.mb_messages WHERE namespace = %(ns)s"
    " AND (%(key)s::text IS NULL OR key = %(key)s) GROUP BY mailbox, key"
    " UNION ALL SELECT mailbox, key, 0, 0, lease_until > clock_timestamp()"
    " FROM {schema}.mb_roles WHERE namespace = %(ns)s"
    " AND (%(key)s::text IS NULL OR key = %(key)s)) b"
    " GROUP BY mailbox, key HAVING sum(queued) + sum(in_flight) > 0 OR bool_or(draining)"
    " ORDER BY mailbox, key LIMIT %(limit)s"
)
"""returns: (mailbox, key, queued, in flight, draining) per queue that is not empty or has
a live drainer, at most %(limit)s rows (pass one more than wanted to learn of the rest)."""

STAT_DEAD = (
    "SELECT mailbox, count(*) FROM {schema}.mb_dead WHERE namespace = %(ns)s"
    " GROUP BY mailbox ORDER BY mailbox"
)
"""returns: (mailbox, dead letters) per mailbox that has any."""

DIAGNOSE_SERVER = (
    "SELECT current_setting('server_version_num')::integer, current_setting('server_version'),"
    " current_setting('statement_timeout'),"
    " (SELECT setting::bigint FROM pg_catalog.pg_settings WHERE name = 'statement_timeout'),"
    " current_setting('idle_in_transaction_session_timeout'),"
    " current_setting('lock_timeout'), current_user, current_database(),"
    " has_database_privilege(current_database(), 'CREATE'),"
    " to_regnamespace('{schema}') IS NOT NULL"
)
"""returns: (version number, version, statement_timeout, the same in ms,
idle_in_transaction_session_timeout, lock_timeout, role, database, may create schemas,
schema exists), as a new session of this role sees them."""

DIAGNOSE_RIGHTS = (
    "SELECT has_schema_privilege(n.oid, 'USAGE'),"
    " (SELECT coalesce(bool_and(has_table_privilege(c.oid, 'SELECT')"
    " AND has_table_privilege(c.oid, 'INSERT') AND has_table_privilege(c.oid, 'UPDATE')"
    " AND has_table_privilege(c.oid, 'DELETE')), true)"
    " FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid AND c.relkind = 'r'),"
    " (SELECT coalesce(bool_and(has_sequence_privilege(c.oid, 'USAGE')), true)"
    " FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid AND c.relkind = 'S'),"
    " (SELECT coalesce(bool_and(has_function_privilege(p.oid, 'EXECUTE')), true)"
    " FROM pg_catalog.pg_proc p WHERE p.pronamespace = n.oid),"
    " EXISTS (SELECT 1 FROM pg_catalog.pg_class c"
    " WHERE c.relnamespace = n.oid AND c.relname = 'migrations')"
    " FROM pg_catalog.pg_namespace n WHERE n.nspname = '{schema}'"
)
"""returns: (USAGE on the schema, SELECT/INSERT/UPDATE/DELETE on all its tables, USAGE on
all its sequences, EXECUTE on all its functions, migrations table exists), or no row."""


def render(template: str, **values: object) -> str:
    """Fill a ``{name}`` template with values validated by the caller (never user data)."""
    return template.format(**values)


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


STATEMENTS = tuple(
    name
    for name, text in sorted(globals().items())
    if name.isupper()
    and isinstance(text, str)
    and _placeholders(text) in ({"schema"}, {"schema", "limit"})
)
"""The statements whose only placeholder is the schema (and PURGE's limit): rendered once
per backend, by name."""


# -- values bound or rendered into the statements ----------------------------------------


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


_ESCAPE = "\x01"


def stored(text: str) -> str:
    """A user's string (key, id, scope, mailbox, namespace, message, result) as a text column
    keeps it: PostgreSQL's text cannot hold NUL, which every other engine accepts.

    Injective, and the identity for text without NUL that does not start with U+0001
    (so rows written before this encoding keep their meaning): otherwise U+0001, then the
    text with U+0001 doubled and NUL written as U+0001 "0". :func:`unstored` reverses it.
    """
    if "\x00" not in text and not text.startswith(_ESCAPE):
        return text
    return _ESCAPE + text.replace(_ESCAPE, _ESCAPE * 2).replace("\x00", _ESCAPE + "0")


_ESCAPED = re.compile("\x01(.)", re.DOTALL)


def unstored(text: str) -> str:
    """The user's string that :func:`stored` made ``text`` of."""
    if not text.startswith(_ESCAPE):
        return text
    return _ESCAPED.sub(lambda m: "\x00" if m[1] == "0" else m[1], text[1:])


def halves(h: int) -> dict[str, int]:
    """How pg_locks shows a bigint advisory lock: classid (high 32 bits), objid (low 32)."""
    unsigned = h & 0xFFFFFFFFFFFFFFFF
    return {"classid": unsigned >> 32, "objid": unsigned & 0xFFFFFFFF}


def whole(classid: int, objid: int) -> int:
    """The signed 64-bit lock id whose :func:`halves` these are."""
    return int.from_bytes(((classid << 32) | objid).to_bytes(8, "big"), "big", signed=True)


def ms(seconds: float) -> int:
    """Whole milliseconds, at least 1 (0 would mean "no timeout" to PostgreSQL)."""
    return max(1, math.ceil(seconds * 1000))
