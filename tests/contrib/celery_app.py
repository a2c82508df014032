"""The Celery app that tests/contrib/test_celery.py runs in a real worker process.

Configured from the environment the test sets: ``INTURN_TEST_BROKER`` (the broker, a Redis
URL), ``INTURN_URL`` (the gate), ``INTURN_TEST_DIR`` (where tasks write their histories and
the fenced SQLite sink), ``INTURN_TEST_UNSAFE`` (start with unsafe settings, to be warned),
``INTURN_TEST_NO_SWEEPER`` (no sweeping timer in the worker processes: only the
``inturn.sweep`` task resumes).

Each body appends its span (``inturn.testing.Span``) to a per-process JSON-lines file as
soon as it ends, so a killed process loses nothing it finished, and writes its effect to a
SQLite table that refuses a write with a fence not above the stored one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path

from celery import Celery

import inturn
from inturn.contrib.celery import SerializedTask
from inturn.testing import Span

DIR = Path(os.environ.get("INTURN_TEST_DIR", "."))

app = Celery("inturn_tests", broker=os.environ.get("INTURN_TEST_BROKER", "redis://127.0.0.1:1/0"))
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 3600},
    inturn_namespace="celery-tests",
    inturn_lease=2.0,
    inturn_sweep_interval=0.5,
)
if os.environ.get("INTURN_TEST_NO_SWEEPER"):
    app.conf.update(inturn_sweep_interval=None)  # only the inturn.sweep task resumes
if os.environ.get("INTURN_TEST_UNSAFE"):
    app.conf.update(
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=4,
        broker_transport_options={"visibility_timeout": 1},
    )

SINK_SCHEMA = """
PRAGMA journal_mode = WAL;
PRAGMA synchronous = OFF;
CREATE TABLE IF NOT EXISTS effects (
    user TEXT, seq INTEGER, fence INTEGER, writes INTEGER, PRIMARY KEY (user, seq));
CREATE TABLE IF NOT EXISTS attempts (user TEXT, seq INTEGER, attempt INTEGER, pid INTEGER);
"""


def sink() -> sqlite3.Connection:
    # synchronous=OFF: what a killed process wrote is in the OS's cache, and the tests kill
    # processes, not the machine; an fsync per write would only slow the bodies down.
    conn = sqlite3.connect(DIR / "sink.db", timeout=30, isolation_level=None)
    conn.executescript(SINK_SCHEMA)
    return conn


STORED_WITHIN = 0.05
"""A message's ``enqueued_at`` is read before its submit goes out. Two worker processes that
submit for one user at the same moment race to the queue, and the queue keeps the order of
arrival; so a message counts as in line only this long after it was made."""


def _record(mode: str, user: str, seq: int, fence: int, start: float, asked: float) -> None:
    _span(mode, user, seq, fence, start, asked)
    _effect(user, seq, fence)


def _span(mode: str, user: str, seq: int, fence: int, start: float, asked: float) -> None:
    end = time.monotonic()
    span = Span(
        key=user,
        fence=fence,
        asked=asked,
        joined=asked + STORED_WITHIN if mode in ("mailbox", "batch") else asked,
        start=start,
        end=end,
        worker=f"{mode}:{seq}:pid{os.getpid()}",
    )
    with open(DIR / f"history-{os.getpid()}.jsonl", "a", encoding="utf-8") as out:
        out.write(json.dumps(asdict(span)) + "\n")


def _effect(user: str, seq: int, fence: int) -> None:
    with sink() as conn:
        # The fenced write: a lower (stale) fence never overwrites, nor counts.
        conn.execute(
            "INSERT INTO effects VALUES (?, ?, ?, 1) ON CONFLICT (user, seq) DO UPDATE SET "
            "fence = excluded.fence, writes = writes + 1 WHERE excluded.fence > effects.fence",
            (user, seq, fence),
        )


def _maybe_die(user: str, seq: int, attempt: int) -> None:
    """Call 0 of a ``user`` whose name starts with "kill" stalls on its first attempt: the test
    SIGKILLs the process it runs in (it wrote its pid first)."""
    with sink() as conn:
        conn.execute("INSERT INTO attempts VALUES (?, ?, ?, ?)", (user, seq, attempt, os.getpid()))
    marker = DIR / f"stall-{user}-{seq}"
    if user.startswith("kill") and seq == 0 and not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(60)


@app.task(
    name="t.mailbox",
    base=SerializedTask,
    inturn={"key": "user", "mode": "mailbox", "dedup": "msg_id"},
)
def mailbox_task(
    user: str,
    seq: int,
    msg_id: str,
    sleep: float = 0.0,
    fence: int = 0,
    inturn_messages: list[inturn.Message] | None = None,
) -> None:
    start = time.monotonic()
    msg = inturn_messages[-1] if inturn_messages else None
    _maybe_die(user, seq, msg.attempt if msg else 0)
    time.sleep(sleep)
    # The call's arrival in the mailbox (wall clock, the same for every process).
    asked = msg.enqueued_at if msg else 0.0
    _record("mailbox", user, seq, fence, start, asked)


@app.task(
    name="t.turn",
    base=SerializedTask,
    inturn={"key": "user", "mode": "turn", "wait": 0.1, "countdown": 0.1},
)
def turn_task(user: str, seq: int, sleep: float = 0.0, fence: int = 0) -> None:
    start = time.monotonic()
    time.sleep(sleep)
    _record("turn", user, seq, fence, start, start)


@app.task(
    name="t.async",
    base=SerializedTask,
    inturn={"key": "user", "mode": "mailbox"},
)
async def async_task(user: str, seq: int, fence: int = 0) -> None:
    import asyncio

    from inturn.contrib.celery import current_gate

    start = time.monotonic()
    gate = current_gate(app)  # this loop's gate: its async connections belong here
    await asyncio.sleep(0.001)
    assert gate is current_gate(app)
    _record("async", user, seq, fence, start, start)


@app.task(
    name="t.batch",
    base=SerializedTask,
    inturn={"key": "user", "batch": True, "debounce": 0.3, "dedup": "msg_id"},
)
def batch_task(
    user: str,
    seq: int,
    msg_id: str,
    fence: int = 0,
    inturn_messages: list[inturn.Message] | None = None,
) -> None:
    """One body per batch: the newest call's arguments, and every call in the batch."""
    start = time.monotonic()
    messages = inturn_messages or []
    with open(DIR / f"batches-{os.getpid()}.txt", "a", encoding="utf-8") as out:
        out.write(" ".join(str(m.payload["kwargs"]["seq"]) for m in messages) + f" | {seq}\n")
    for m in messages:
        _effect(user, m.payload["kwargs"]["seq"], fence)
    _span("batch", user, seq, fence, start, messages[0].enqueued_at if messages else start)
