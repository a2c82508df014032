"""A session the server ends for idling in a transaction past its lease is a lost connection.

PostgreSQL enforces a turn's lease as ``idle_in_transaction_session_timeout`` and ends a
session that overstays it with an error whose class is not an ``OperationalError``. A
waiter whose process stalled between the lock's grant and its next statement meets it:
it must reach the caller as ``BackendUnavailable``, as a lost connection does, not as
psycopg's own exception (a chat bot's worker crashed on it under load).
"""

from __future__ import annotations

import time

import psycopg
import psycopg.errors
import pytest

from inturn import BackendUnavailable
from inturn._backends.postgres._steps import map_errors


def test_a_session_ended_for_idling_in_a_transaction_is_backend_unavailable(
    postgres_dsn: str,
) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("SET idle_in_transaction_session_timeout = 100")
        conn.execute("SELECT 1")  # a transaction is open now, and idles
        time.sleep(0.5)
        with (
            pytest.raises(BackendUnavailable, match="did not answer") as caught,
            map_errors("fence"),
        ):
            conn.execute("SELECT 1")
    assert isinstance(caught.value.__cause__, psycopg.errors.IdleInTransactionSessionTimeout)
    assert caught.value.transient is True
