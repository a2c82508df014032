"""The PostgreSQL engine (``postgresql://``, ``postgres://``): advisory-lock turns, fences
from a sequence, an optional audit table, dedup marks and durable mailboxes.

URLs: ``postgresql://`` or ``postgres://`` (any libpq URL), with inturn's own
query options ``audit=1``, ``schema=<name>`` (default ``inturn``) and
``max_connections=<n>`` (per event loop, and for the threads). Or inject
psycopg pools: ``PostgresBackend(pool, sync_pool=...)``. Create or upgrade the
schema with ``inturn migrate URL`` (or let the first call do it).

Layout: :mod:`._plan` holds every operation once, as a sans-I/O flow;
:mod:`._async` and :mod:`._sync` only run those flows; :mod:`._lines` is the
process-local lines, :mod:`._sql`/:mod:`._schema` the SQL, :mod:`._doctor`
``statistics()``/``diagnose()``, :mod:`._urls` URL parsing.

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
- **A busy pool is waited for.** Turns share all but an eighth of a pool (:mod:`._slots`),
  in FIFO order, so dedup, mailbox and audit statements always find a connection; a turn
  that finds the share in use waits until one comes free or its deadline passes (then
  the wait runs out like any other), as long as the server answers; and the waiters
  behind a key's head share the head's outcome when the server cannot be reached.
- **Across processes** each process has one head in PostgreSQL's lock queue,
  which grants in arrival order (``tests/postgres/test_lock_queue.py``
  measures it): the heads of the processes alternate, and a process's second
  waiter queues in PostgreSQL only once its head got the turn. So grants are
  FIFO within a process and fair but not strictly FIFO across processes;
  nobody starves.
- **Fences** come from one ``CACHE 1`` sequence taken after the lock was
  granted: strictly increasing across keys, processes and restarts.
- **Waits are bounded by the server**: the head's lock wait carries a
  ``lock_timeout`` of the time left (a cancelled task also cancels it); a
  wait that was interrupted is resolved by asking the server whether the lock
  came first, so a grant is never lost.
- **Audit** (opt-in): a row per grant in ``<schema>.grants``, written on
  another connection so it survives the holder; closed in the same COMMIT
  that releases the turn, or as ``lost`` by the next grant of the key.

What it does not promise: a holder whose session the server ended (lease
lapsed, ``pg_terminate_backend``, failover) learns it at its next renewal or
check (``renew`` returns False); until then it may run beside the next holder,
as with any lease. Pass ``turn.fence`` to sinks that can refuse stale writes.
"""

from __future__ import annotations

from inturn._errors import ConfigurationError

try:
    import psycopg  # noqa: F401 - imported here first, for the install hint
    import psycopg_pool  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "the PostgreSQL backend needs psycopg 3 and psycopg-pool: pip install 'inturn[postgres]'"
    ) from exc

from ._async import PostgresBackend
from ._sync import SyncPostgresBackend

__all__ = ["PostgresBackend", "SyncPostgresBackend", "from_url"]


def from_url(url: str, *, namespace: str) -> PostgresBackend:
    """Build the backend for a PostgreSQL URL (the gate's scheme registry calls this)."""
    return PostgresBackend.from_url(url, namespace=namespace)
