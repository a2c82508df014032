"""The steps a flow of :mod:`._plan` yields, which the executors (:mod:`._async`,
:mod:`._sync`) carry out; and :func:`map_errors`, the one place driver errors are mapped.

A flow yields a step, receives its answer (a row, rows, a connection, None),
or has the step's exception thrown in at the ``yield``; it returns the call's
result. Executors add no policy: how to run SQL, how to wait, nothing else.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import psycopg
import psycopg_pool
from psycopg.pq import TransactionStatus

from inturn._errors import BackendUnavailable

from ._lines import LocalLines, Waiter

__all__ = [
    "ACTIVE",
    "CLOSE_STEP",
    "CLOSE_WAIT",
    "IDLE",
    "INERROR",
    "INTRANS",
    "TRANSPORT_ERRORS",
    "Connect",
    "Exhausted",
    "Flow",
    "On",
    "PutBack",
    "Run",
    "Sleep",
    "Step",
    "closed_lock_waits",
    "cut",
    "dead",
    "map_errors",
    "quiet",
]

IDLE, INTRANS, INERROR, ACTIVE = (
    TransactionStatus.IDLE,
    TransactionStatus.INTRANS,
    TransactionStatus.INERROR,
    TransactionStatus.ACTIVE,
)
TRANSPORT_ERRORS = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg_pool.PoolTimeout,
    # The server ended a session idle in a transaction past its lease (how it enforces one):
    # a lost connection, though its class is not an OperationalError.
    psycopg.errors.IdleInTransactionSessionTimeout,
)
"""What says "the server did not answer" (a lost connection, no free connection, a cancel)."""


def dead(conn: Any) -> bool:
    return bool(conn.closed or conn.broken)


def quiet(conn: Any) -> bool:
    """True when nothing arrived on an idle pooled connection since its last use.

    A server that restarted, or ended the session (``pg_terminate_backend``, a role's
    ``idle_session_timeout``), left a FATAL message or EOF on the socket: then the
    pool's check makes a round trip, and a dead connection is replaced before a
    statement is sent on it. Statements are never retried (a reply lost after the
    commit leaves the outcome unknown); this is how a restart costs no call an error.
    A quiet connection costs one ``select()``, no round trip.
    """
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable


@contextlib.contextmanager
def map_errors(what: str) -> Iterator[None]:
    """Raise the driver's transport errors as :class:`~inturn.BackendUnavailable`, chained.

    A plain context manager: it wraps an ``await``, a blocking call or a
    flow's ``yield`` alike. Errors that are not about reaching the server
    (a constraint, a privilege) pass unchanged.
    """
    try:
        yield
    except TRANSPORT_ERRORS as exc:
        raise BackendUnavailable(f"PostgreSQL did not answer ({what}): {exc}") from exc


# -- steps ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """Run ``sql`` on a pooled connection (errors mapped as ``what``); answers the last
    result's first row, or every row with ``rows``."""

    what: str
    sql: str
    params: Mapping[str, Any] | None = None
    rows: bool = False


@dataclass(frozen=True, slots=True)
class On:
    """Run ``sql`` on ``conn`` (a turn's own connection); answers the last result's first
    row. Errors come back unmapped: the flow decides what they mean.

    ``first``: ``params`` are bound on the client, so ``sql`` may hold several statements
    sent in one round trip; answers the *first* result's first row."""

    conn: Any
    sql: str
    params: Mapping[str, Any] | None = None
    first: bool = False


@dataclass(frozen=True, slots=True)
class Connect:
    """Take a connection for a turn (a holder's or a head's) from the pool; answers it.

    Turns take their connections in FIFO order from a share of the pool that leaves
    room for the pooled statements (:class:`Run`), so those always make progress. A
    turn waits for a connection while the server answers: until ``until`` (a
    ``time.monotonic()``; None: as long as it takes), then :class:`Exhausted`; with
    ``quick``, only when one is free at once. A server that cannot be reached raises
    BackendUnavailable naming libpq's reason (errors mapped)."""

    until: float | None = None
    quick: bool = False


class Exhausted(Exception):
    """No connection came free for a turn in time, and the server answers: the pool is
    busy (every connection in use by this process), not broken."""


@dataclass(frozen=True, slots=True)
class PutBack:
    """Give ``conn`` back to the pool, out of any transaction (or discarded when dead)."""

    conn: Any


@dataclass(frozen=True, slots=True)
class Sleep:
    """Sleep until ``waiter`` is woken or ``seconds`` passed (None: no limit)."""

    waiter: Waiter
    seconds: float | None


Step: TypeAlias = Run | On | Connect | PutBack | Sleep
T = TypeVar("T")
Flow: TypeAlias = Generator[Step, Any, T]


def cut(conn: Any) -> None:
    """Shut ``conn``'s socket down both ways: whatever waits on it fails at once.

    For a statement that must not outlive its caller's deadline over a dead link (a
    partition, a half-open connection), where psycopg would wait for the server's answer
    forever; PostgreSQL rolls the connection's transaction back when it notices.
    """
    with contextlib.suppress(Exception):
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


CLOSE_WAIT = 1.0
"""Longest time (seconds) closing a face waits for its waiters to leave their lines."""


CLOSE_STEP = 0.01
"""Seconds between two looks at the closed waiters while they leave."""


def closed_lock_waits(lines: LocalLines, closing: list[Waiter]) -> Iterator[list[Any]]:
    """While a closed waiter is still in its line (at most CLOSE_WAIT seconds: the caller
    sleeps CLOSE_STEP between two rounds), the connections to cancel now: those of
    closed heads that wait in PostgreSQL's lock queue (the statement then fails at once
    and the server drops the lock request, so waiters of other processes are not held
    up behind a closed one). Each connection once."""
    sent: set[str] = set()
    for _ in range(round(CLOSE_WAIT / CLOSE_STEP)):
        left = lines.still_waiting(closing)
        if not left:
            return
        conns = []
        for waiter in left:
            conn = waiter.conn
            if waiter.token in sent or conn is None or dead(conn):
                continue
            if conn.info.transaction_status == ACTIVE:
                sent.add(waiter.token)
                conns.append(conn)
        yield conns
