"""inturn's schema in PostgreSQL: the migrations, one per version, each idempotent.

``inturn migrate URL`` (or the first call of a backend) applies those not yet
recorded in ``<schema>.migrations``, one migration run at a time per database.
Placeholders are filled by :func:`._sql.render` (see there).
"""

from __future__ import annotations

__all__ = [
    "APPLIED",
    "HAS_MIGRATIONS",
    "MIGRATE_BEGIN",
    "MIGRATE_DONE",
    "MIGRATIONS",
    "MIGRATION_LOCK",
    "SCHEMA_VERSION",
]

MIGRATION_LOCK = 0x696E7475726E0001
"""The advisory lock id that serializes concurrent ``migrate()`` calls ("inturn" + 1)."""

# -- versions -------------------------------------------------------------------------

SCHEMA_VERSION = 6
"""The newest migration: 1 fences and audit, 2 dedup marks and supersede generations,
3 mailboxes, 4 the retry time in its own column and submit-and-take, 5 mb_retry and 6
dead letters safe to run twice."""

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
    4: """
-- The retry time of a message is its own column (the message text is opaque to the engine):
-- mb_retry stores it, mb_take compares the head's with the caller's clock. Messages retried
-- under version 3 carried it as "nb" in their JSON text: it is copied once, here.
ALTER TABLE {schema}.mb_messages
    ADD COLUMN IF NOT EXISTS not_before double precision NOT NULL DEFAULT 0;
DO $$
DECLARE
    m record;
BEGIN
    FOR m IN SELECT ctid, body FROM {schema}.mb_messages WHERE body LIKE '%"nb"%' LOOP
        BEGIN
            UPDATE {schema}.mb_messages
               SET not_before = coalesce((m.body::jsonb ->> 'nb')::double precision, 0)
             WHERE ctid = m.ctid;
        EXCEPTION WHEN others THEN
            NULL;  -- not JSON (not written by inturn): no retry time
        END;
    END LOOP;
END
$$;
DROP FUNCTION IF EXISTS {schema}.mb_submit(
    bigint, text, text, text, text, integer, boolean, text, bigint);
DROP FUNCTION IF EXISTS {schema}.mb_retry(bigint, text, text, text, text, text[]);
DROP FUNCTION IF EXISTS {schema}.mb_claim(bigint, text, text, text, text, bigint);

-- mb_take: renew the role, acknowledge the in-flight rows (p_ack), then hand back the
-- in-flight rows, or take up to p_limit from the head, or give the role up when empty.
-- p_now: the caller's clock (epoch seconds), compared with the head's not_before.
-- returns: (o_status 1 taken | 0 empty, role given up | 2 head waits | -1 not the drainer,
--           o_wait seconds for status 2, o_messages oldest first for status 1)
CREATE OR REPLACE FUNCTION {schema}.mb_take(
    p_lock bigint, p_namespace text, p_mailbox text, p_key text, p_token text,
    p_limit integer, p_lease_ms bigint, p_ack boolean, p_now double precision,
    OUT o_status integer, OUT o_wait double precision, OUT o_messages text[])
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    head_not_before double precision;
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
    SELECT m.not_before INTO head_not_before FROM {schema}.mb_messages m
     WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox AND m.key = p_key
     ORDER BY m.seq LIMIT 1;
    IF NOT FOUND THEN
        DELETE FROM {schema}.mb_roles r
         WHERE r.namespace = p_namespace AND r.mailbox = p_mailbox AND r.key = p_key;
        o_status := 0;
        RETURN;
    END IF;
    IF head_not_before > p_now THEN
        o_status := 2;
        o_wait := head_not_before - p_now;
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

-- mb_submit: store a message; become the drainer if there is none (or its lease lapsed).
-- With p_take > 0, a caller that became the drainer also takes (mb_take, no ack) in the
-- same call: one round trip for the first message of an idle key.
-- returns: (o_status 1 stored, caller drains | 0 stored | -1 full, o_dropped 0 | 1,
--           o_take, o_wait, o_messages: mb_take's answer, or NULLs when nothing was taken)
CREATE OR REPLACE FUNCTION {schema}.mb_submit(
    p_lock bigint, p_namespace text, p_mailbox text, p_key text, p_body text,
    p_max_pending integer, p_drop_oldest boolean, p_token text, p_lease_ms bigint,
    p_take integer, p_now double precision,
    OUT o_status integer, OUT o_dropped integer,
    OUT o_take integer, OUT o_wait double precision, OUT o_messages text[])
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
    IF o_status = 1 AND p_take > 0 THEN
        SELECT k.o_status, k.o_wait, k.o_messages INTO o_take, o_wait, o_messages
          FROM {schema}.mb_take(p_lock, p_namespace, p_mailbox, p_key, p_token, p_take,
                                p_lease_ms, false, p_now) k;
    END IF;
END
$$;

-- mb_retry: replace the in-flight rows by p_bodies at the queue's head (oldest first), not
-- to be taken before p_not_before (epoch seconds). An empty p_bodies acknowledges (mb_done).
-- returns: 1 | 0 another live drainer owns the queue (nothing changed)
CREATE OR REPLACE FUNCTION {schema}.mb_retry(
    p_lock bigint, p_namespace text, p_mailbox text, p_key text, p_token text,
    p_bodies text[], p_not_before double precision)
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
    INSERT INTO {schema}.mb_messages (namespace, mailbox, key, seq, body, not_before)
    SELECT p_namespace, p_mailbox, p_key, low - cardinality(p_bodies) - 1 + b.n, b.body,
           p_not_before
      FROM unnest(p_bodies) WITH ORDINALITY AS b(body, n);
    RETURN 1;
END
$$;

-- mb_resume: the sweeper takes a queue whose drainer died; its in-flight rows go back to
-- the head (they have the smallest seqs), so they are delivered first.
-- returns: 1 resumed | 0 a live drainer exists | -1 nothing to drain (a lapsed role row
--          is deleted)
CREATE OR REPLACE FUNCTION {schema}.mb_resume(
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
    5: """
-- mb_retry, safe to run twice: a drainer retries a step whose answer was lost, and the
-- first run may have committed. The batch it replaces is the in-flight rows; once they are
-- gone (replaced by that first run, acknowledged, or put back by a sweeper) there is
-- nothing to replace, and storing p_bodies again would duplicate them.
-- returns: 1 | 0 another live drainer owns the queue (nothing changed)
CREATE OR REPLACE FUNCTION {schema}.mb_retry(
    p_lock bigint, p_namespace text, p_mailbox text, p_key text, p_token text,
    p_bodies text[], p_not_before double precision)
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
    IF NOT FOUND THEN
        RETURN 1;  -- already replaced or acknowledged: a repeated call changes nothing
    END IF;
    SELECT coalesce(min(m.seq), 0) INTO low FROM {schema}.mb_messages m
     WHERE m.namespace = p_namespace AND m.mailbox = p_mailbox AND m.key = p_key;
    INSERT INTO {schema}.mb_messages (namespace, mailbox, key, seq, body, not_before)
    SELECT p_namespace, p_mailbox, p_key, low - cardinality(p_bodies) - 1 + b.n, b.body,
           p_not_before
      FROM unnest(p_bodies) WITH ORDINALITY AS b(body, n);
    RETURN 1;
END
$$;

-- The mailbox functions wait for their key's advisory lock: a role's lock_timeout must not
-- turn that short wait into an error.
ALTER FUNCTION {schema}.mb_take(bigint, text, text, text, text, integer, bigint, boolean,
    double precision) SET lock_timeout = 0;
ALTER FUNCTION {schema}.mb_submit(bigint, text, text, text, text, integer, boolean, text,
    bigint, integer, double precision) SET lock_timeout = 0;
ALTER FUNCTION {schema}.mb_retry(bigint, text, text, text, text, text[], double precision)
    SET lock_timeout = 0;
ALTER FUNCTION {schema}.mb_resume(bigint, text, text, text, text, bigint) SET lock_timeout = 0;
""",
    6: """
-- A dead letter is stored once per failed message: ``once`` names the message (its unique
-- tag and attempt), so a dead-lettering retried after a lost reply adds nothing.
ALTER TABLE {schema}.mb_dead ADD COLUMN IF NOT EXISTS once text;
CREATE UNIQUE INDEX IF NOT EXISTS mb_dead_once ON {schema}.mb_dead (namespace, mailbox, once);
""",
}
"""version -> DDL (idempotent). The fence sequence has CACHE 1: with a cache,
sessions would hand out values out of order."""

MIGRATE_BEGIN = (
    "BEGIN; SELECT set_config('statement_timeout', '0', true),"
    " set_config('lock_timeout', '0', true);"
    " SELECT pg_advisory_xact_lock('{lock}'::bigint);"
    " CREATE SCHEMA IF NOT EXISTS {schema};"
    " CREATE TABLE IF NOT EXISTS {schema}.migrations"
    " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());"
)
"""Start a migration: one at a time per database (an advisory lock), then the bookkeeping.
Neither the wait for a concurrent migration nor the DDL is cut short by a role's timeouts."""

MIGRATE_DONE = "INSERT INTO {schema}.migrations (version) VALUES ({version}) ON CONFLICT DO NOTHING"

HAS_MIGRATIONS = "SELECT to_regclass('{schema}.migrations') IS NOT NULL"
"""returns: whether the schema was ever migrated."""

APPLIED = "SELECT coalesce(max(version), 0) FROM {schema}.migrations"
"""returns: the newest applied migration."""
