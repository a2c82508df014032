"""The Celery side of `bench_mailbox.py`: one task that does its work under a per-user lock.

`bench_mailbox.py` starts `celery -A _celery_app worker` with this directory on the path and
the URLs in the environment. The task takes a python-redis-lock per user (blocking acquire,
the way a Celery app keeps one user's work from running twice at once), then appends
`user|seq|started|sent` to a list, so the benchmark can count completions and check each
user's order. Arguments travel as JSON (Celery's default); nothing is pickled.
"""

from __future__ import annotations

import os
import time

import redis
import redis_lock
from celery import Celery

BROKER_URL = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/1")
STORE_URL = os.environ.get("BENCH_CELERY_STORE", BROKER_URL)
RECORDS = "bench:celery:records"

app = Celery("bench_mailbox", broker=BROKER_URL)
app.conf.update(
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_store: tuple[int, redis.Redis] | None = None


def _client() -> redis.Redis:
    """One client per worker process (a prefork child must not reuse its parent's sockets)."""
    global _store
    if _store is None or _store[0] != os.getpid():
        _store = (os.getpid(), redis.Redis.from_url(STORE_URL))
    return _store[1]


@app.task(name="bench.locked")
def locked(user: str, seq: int, sent: float = 0.0, sleep: float = 0.0) -> None:
    """The body runs under `user`'s lock; `sent` is the producer's `time.monotonic()`."""
    conn = _client()
    with redis_lock.Lock(conn, f"user:{user}", expire=30):
        started = time.monotonic()
        if sleep:
            time.sleep(sleep)
        conn.rpush(RECORDS, f"{user}|{seq}|{started!r}|{sent!r}")
