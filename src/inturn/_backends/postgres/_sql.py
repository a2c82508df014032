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
    "DELETE FROM {schema}.dedup WHERE ctid = ANY (ARRAY("
    "SELECT ctid FROM {schema}.dedup WHERE expires_at <= clock_timestamp()"
    " LIMIT {limit} FOR UPDATE SKIP LOCKED));"
    " DELETE FROM {schema}.supersede WHERE ctid = ANY (ARRAY("
    "SELECT ctid FROM {schema}.supersede WHERE expires_at <= clock_timestamp()"
    " LIMIT {limit} FOR UPDATE SKIP LOCKED))"
)
"""Delete up to {limit} expired dedup marks and supersede rows each (every namespace).

Rows another session is changing are skipped, never waited for.
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
    "SELECT o_status, o_dropped FROM {schema}.mb_submit(%(lock)s, %(ns)s, %(mailbox)s,"
    " %(key)s, %(body)s, %(max_pending)s, %(drop_oldest)s, %(token)s, %(lease_ms)s)"
)
"""returns: (status 1 | 0 | -1, dropped 0 | 1): see mb_submit in migration 3."""

MB_TAKE = (
    "SELECT o_status, o_wait, o_messages FROM {schema}.mb_take(%(lock)s, %(ns)s,"
    " %(mailbox)s, %(key)s, %(token)s, %(limit)s, %(lease_ms)s, %(ack)s, %(now)s)"
)
"""returns: (status 1 | 0 | 2 | -1, wait seconds, messages): see mb_take in migration 3."""

MB_RETRY = (
    "SELECT {schema}.mb_retry(%(lock)s, %(ns)s, %(mailbox)s, %(key)s, %(token)s,"
    " %(bodies)s::text[])"
)
"""returns: 1 | 0 not the drainer: see mb_retry in migration 3."""

MB_CLAIM = (
    "SELECT {schema}.mb_claim(%(lock)s, %(ns)s, %(mailbox)s, %(key)s, %(token)s, %(lease_ms)s)"
)
"""returns: 1 claimed | 0 a live drainer exists | -1 nothing to drain."""

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
    "INSERT INTO {schema}.mb_dead (namespace, mailbox, entry)"
    " SELECT %(ns)s, %(mailbox)s, e.entry FROM unnest(%(entries)s::text[])"
    " WITH ORDINALITY AS e(entry, n) ORDER BY e.n"
)
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
    2: """
CREATE TABLE IF NOT EXISTS {schema}.dedup (
    namespace    text NOT NULL,
    key          text NOT NULL,
    scope        text NOT NULL,
    id           text NOT NULL,
    done         boolean NOT NULL,
    token        text NOT NULL,
    fence        bigint,
    lease_until  timestamptz,
    result       text,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (namespace, key, scope, id)
);
CREATE INDEX IF NOT EXISTS dedup_expiry ON {schema}.dedup (expires_at);
CREATE SEQUENCE IF NOT EXISTS {schema}.generation AS bigint CACHE 1;
CREATE TABLE IF NOT EXISTS {schema}.supersede (
    namespace   text NOT NULL,
    key         text NOT NULL,
    scope       text NOT NULL,
    generation  bigint NOT NULL,
    running     text,
    channel     text,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (namespace, key, scope)
);
CREATE INDEX IF NOT EXISTS supersede_expiry ON {schema}.supersede (expires_at);

-- dedup_claim: start processing a message id unless it is done or in progress elsewhere.
-- An expired row counts as absent. An in-progress row is taken over when its lease lapsed,
-- by its own token, or by a claim with a greater fence.
-- returns: (o_state 'new' | 'done' | 'in_progress', o_result: the stored JSON text or NULL)
CREATE OR REPLACE FUNCTION {schema}.dedup_claim(
    p_namespace text, p_key text, p_scope text, p_id text, p_token text, p_fence bigint,
    p_lease_ms bigint, p_window_ms bigint, OUT o_state text, OUT o_result text)
LANGUAGE plpgsql AS $$
DECLARE
    m record;
    t timestamptz;
BEGIN
    LOOP
        t := clock_timestamp();
        SELECT d.done, d.token, d.fence, d.lease_until, d.result, d.expires_at INTO m
          FROM {schema}.dedup d
         WHERE d.namespace = p_namespace AND d.key = p_key AND d.scope = p_scope
           AND d.id = p_id
           FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO {schema}.dedup AS d
                (namespace, key, scope, id, done, token, fence, lease_until, expires_at)
            VALUES (p_namespace, p_key, p_scope, p_id, false, p_token, p_fence,
                    t + p_lease_ms * interval '1 millisecond',
                    t + p_window_ms * interval '1 millisecond')
            ON CONFLICT DO NOTHING;
            IF FOUND THEN
                o_state := 'new';
                RETURN;
            END IF;
            CONTINUE;  -- a concurrent claim inserted the row first: read it (fresh snapshot)
        END IF;
        IF m.expires_at > t THEN
            IF m.done THEN
                o_state := 'done';
                o_result := m.result;
                RETURN;
            END IF;
            IF NOT (t >= m.lease_until OR m.token = p_token
                    OR (p_fence IS NOT NULL AND m.fence IS NOT NULL AND p_fence > m.fence)) THEN
                o_state := 'in_progress';
                RETURN;
            END IF;
        END IF;
        UPDATE {schema}.dedup d
           SET done = false, token = p_token, fence = p_fence, result = NULL,
               lease_until = t + p_lease_ms * interval '1 millisecond',
               expires_at = t + p_window_ms * interval '1 millisecond'
         WHERE d.namespace = p_namespace AND d.key = p_key AND d.scope = p_scope
           AND d.id = p_id;
        o_state := 'new';
        RETURN;
    END LOOP;
END
$$;

-- supersede: become the newest call of (key, scope); with p_cancel, NOTIFY the running
-- call's channel with 'cancel|<token>', unless it is one of p_local (the caller's own
-- process cancels its running calls itself).
-- returns: the new generation (from a sequence: strictly increasing, never reused)
CREATE OR REPLACE FUNCTION {schema}.supersede(
    p_namespace text, p_key text, p_scope text, p_cancel boolean, p_keep_ms bigint,
    p_local text[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    g bigint := nextval('{schema}.generation');
    r record;
BEGIN
    INSERT INTO {schema}.supersede AS s (namespace, key, scope, generation, expires_at)
    VALUES (p_namespace, p_key, p_scope, g,
            clock_timestamp() + p_keep_ms * interval '1 millisecond')
    ON CONFLICT (namespace, key, scope) DO UPDATE
       SET generation = greatest(s.generation, excluded.generation),
           expires_at = excluded.expires_at
    RETURNING s.running, s.channel INTO r;
    IF p_cancel AND r.running IS NOT NULL AND r.channel IS NOT NULL
       AND r.channel <> ALL (p_local) THEN
        PERFORM pg_notify(r.channel, 'cancel|' || r.running);
    END IF;
    RETURN g;
END
$$;
""",
    3: """
CREATE SEQUENCE IF NOT EXISTS {schema}.mb_seq AS bigint;
CREATE TABLE IF NOT EXISTS {schema}.mb_messages (
    namespace  text NOT NULL,
    mailbox    text NOT NULL,
    key        text NOT NULL,
    seq        bigint NOT NULL,
    body       text NOT NULL,
    in_flight  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (namespace, mailbox, key, seq)
);
CREATE TABLE IF NOT EXISTS {schema}.mb_roles (
    namespace    text NOT NULL,
    mailbox      text NOT NULL,
    key          text NOT NULL,
    token        text NOT NULL,
    lease_until  timestamptz NOT NULL,
    PRIMARY KEY (namespace, mailbox, key)
);
CREATE TABLE IF NOT EXISTS {schema}.mb_dead (
    namespace  text NOT NULL,
    mailbox    text NOT NULL,
    seq        bigserial,
    entry      text NOT NULL,
    PRIMARY KEY (namespace, mailbox, seq)
);

-- Every mb_* function first takes a transaction-level advisory lock on p_lock, the
-- (namespace, mailbox, key) hash: the operations of one key run one at a time, and each
-- statement after the lock reads fresh rows. Queue order is seq; the in-flight rows always
-- have the smallest seqs of their key (taken from the head; retries go below every row).

-- mb_submit: store a message; become the drainer if there is none (or its lease lapsed).
-- returns: (o_status 1 stored, caller drains | 0 stored | -1 full, o_dropped 0 | 1)
CREATE OR REPLACE FUNCTION {schema}.mb_submit(
    p_lock bigint, p_namespace text, p_mailbox text, p_key text, p_body text,
    p_max_pending integer, p_drop_oldest boolean, p_token text, p_lease_ms bigint,
    OUT o_status integer, OUT o_dropped integer)
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    t := clock_timestamp();
    o_dropped := 0;
    IF (SELECT count(*) FROM (SELECT 1 FROM {schema}.mb_messages m
          WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox AND m.key = p_key
            AND NOT m.in_flight LIMIT p_max_pending) n) >= p_max_pending THEN
        IF NOT p_drop_oldest THEN
            o_status := -1;
            RETURN;
        END IF;
        DELETE FROM {schema}.mb_messages m
         WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox AND m.key = p_key
           AND m.seq = (SELECT min(h.seq) FROM {schema}.mb_messages h
                         WHERE h.namespace = p_namespace AND h.mailbox = p_mailbox
                           AND h.key = p_key AND NOT h.in_flight);
        o_dropped := 1;
    END IF;
    INSERT INTO {schema}.mb_messages (namespace, mailbox, key, seq, body)
    VALUES (p_namespace, p_mailbox, p_key, nextval('{schema}.mb_seq'), p_body);
    INSERT INTO {schema}.mb_roles AS r (namespace, mailbox, key, token, lease_until)
    VALUES (p_namespace, p_mailbox, p_key, p_token, t + p_lease_ms * interval '1 millisecond')
    ON CONFLICT (namespace, mailbox, key) DO UPDATE
       SET token = excluded.token, lease_until = excluded.lease_until
     WHERE r.lease_until <= t;
    o_status := CASE WHEN FOUND THEN 1 ELSE 0 END;
END
$$;

-- mb_take: renew the role, acknowledge the in-flight rows (p_ack), then hand back the
-- in-flight rows, or take up to p_limit from the head, or give the role up when empty.
-- p_now: the caller's clock (epoch seconds), compared with the head's "nb" (retry time).
-- returns: (o_status 1 taken | 0 empty, role given up | 2 head waits | -1 not the drainer,
--           o_wait seconds for status 2, o_messages oldest first for status 1)
CREATE OR REPLACE FUNCTION {schema}.mb_take(
    p_lock bigint, p_namespace text, p_mailbox text, p_key text, p_token text,
    p_limit integer, p_lease_ms bigint, p_ack boolean, p_now double precision,
    OUT o_status integer, OUT o_wait double precision, OUT o_messages text[])
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    head text;
    not_before double precision;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    t := clock_timestamp();
    UPDATE {schema}.mb_roles r SET lease_until = t + p_lease_ms * interval '1 millisecond'
     WHERE r.namespace = p_namespace AND r.mailbox = p_mailbox AND r.key = p_key
       AND r.token = p_token AND r.lease_until > t;
    IF NOT FOUND THEN
        o_status := -1;
        RETURN;
    END IF;
    IF p_ack THEN
        DELETE FROM {schema}.mb_messages m
         WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox AND m.key = p_key
           AND m.in_flight;
    END IF;
    SELECT array_agg(m.body ORDER BY m.seq) INTO o_messages FROM {schema}.mb_messages m
     WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox AND m.key = p_key
       AND m.in_flight;
    IF o_messages IS NOT NULL THEN
        o_status := 1;
        RETURN;
    END IF;
    SELECT m.body INTO head FROM {schema}.mb_messages m
     WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox AND m.key = p_key
     ORDER BY m.seq LIMIT 1;
    IF NOT FOUND THEN
        DELETE FROM {schema}.mb_roles r
         WHERE r.namespace = p_namespace AND r.mailbox = p_mailbox AND r.key = p_key;
        o_status := 0;
        RETURN;
    END IF;
    BEGIN
        not_before := coalesce((head::jsonb ->> 'nb')::double precision, 0);
    EXCEPTION WHEN others THEN
        not_before := 0;  -- not JSON (not written by inturn): no retry time
    END;
    IF not_before > p_now THEN
        o_status := 2;
        o_wait := not_before - p_now;
        RETURN;
    END IF;
    WITH taken AS (
        UPDATE {schema}.mb_messages m SET in_flight = true
         WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox AND m.key = p_key
           AND m.seq IN (SELECT h.seq FROM {schema}.mb_messages h
                          WHERE h.namespace = p_namespace AND h.mailbox = p_mailbox
                            AND h.key = p_key
                          ORDER BY h.seq LIMIT p_limit)
        RETURNING m.seq, m.body)
    SELECT array_agg(taken.body ORDER BY taken.seq) INTO o_messages FROM taken;
    o_status := 1;
END
$$;

-- mb_retry: replace the in-flight rows by p_bodies at the queue's head (oldest first).
-- An empty p_bodies acknowledges (mb_done).
-- returns: 1 | 0 another live drainer owns the queue (nothing changed)
CREATE OR REPLACE FUNCTION {schema}.mb_retry(
    p_lock bigint, p_namespace text, p_mailbox text, p_key text, p_token text,
    p_bodies text[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    low bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    IF EXISTS (SELECT 1 FROM {schema}.mb_roles r
                WHERE r.namespace = p_namespace AND r.mailbox = p_mailbox AND r.key = p_key
                  AND r.lease_until > clock_timestamp() AND r.token <> p_token) THEN
        RETURN 0;
    END IF;
    DELETE FROM {schema}.mb_messages m
     WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox AND m.key = p_key
       AND m.in_flight;
    SELECT coalesce(min(m.seq), 0) INTO low FROM {schema}.mb_messages m
     WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox AND m.key = p_key;
    INSERT INTO {schema}.mb_messages (namespace, mailbox, key, seq, body)
    SELECT p_namespace, p_mailbox, p_key, low - cardinality(p_bodies) - 1 + b.n, b.body
      FROM unnest(p_bodies) WITH ORDINALITY AS b(body, n);
    RETURN 1;
END
$$;

-- mb_claim: the sweeper takes a queue whose drainer died; its in-flight rows go back to
-- the head (they have the smallest seqs), so they are delivered first.
-- returns: 1 claimed | 0 a live drainer exists | -1 nothing to drain (a lapsed role row
--          is deleted)
CREATE OR REPLACE FUNCTION {schema}.mb_claim(
    p_lock bigint, p_namespace text, p_mailbox text, p_key text, p_token text,
    p_lease_ms bigint)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    t := clock_timestamp();
    IF EXISTS (SELECT 1 FROM {schema}.mb_roles r
                WHERE r.namespace = p_namespace AND r.mailbox = p_mailbox AND r.key = p_key
                  AND r.lease_until > t) THEN
        RETURN 0;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM {schema}.mb_messages m
                    WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox
                      AND m.key = p_key) THEN
        DELETE FROM {schema}.mb_roles r
         WHERE r.namespace = p_namespace AND r.mailbox = p_mailbox AND r.key = p_key;
        RETURN -1;
    END IF;
    UPDATE {schema}.mb_messages m SET in_flight = false
     WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox AND m.key = p_key
       AND m.in_flight;
    INSERT INTO {schema}.mb_roles AS r (namespace, mailbox, key, token, lease_until)
    VALUES (p_namespace, p_mailbox, p_key, p_token, t + p_lease_ms * interval '1 millisecond')
    ON CONFLICT (namespace, mailbox, key) DO UPDATE
       SET token = excluded.token, lease_until = excluded.lease_until;
    RETURN 1;
END
$$;
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
