"""The worker side of `bench_celery.py`: one task per way of keeping a user's work in order.

- `bench.lock`: python-redis-lock per user around the body (a blocking acquire).
- `bench.mailbox`: `SerializedTask`, mailbox mode.
- `bench.turn`: `SerializedTask`, turn mode.
- `bench.keyed`: a plain task; `KeyedRouter` sends each user to one of 4 shard queues,
  each consumed by a worker with concurrency 1.
- `bench.keyed_mailbox`: mailbox mode behind the same router (the mailbox as a safety net).

Every body sleeps `BENCH_WORK` seconds, then appends `mode|user|seq|start|end|sent` to a
Redis list (times on `time.monotonic()`, one clock for the machine's processes). Each task
execution appends `mode|slot seconds|seconds not in a body` (task_prerun/task_postrun), so
the script can tell how much worker-slot time went to waiting.
"""

from __future__ import annotations

import os
import time

import redis
import redis_lock
from celery import Celery, signals

from inturn.contrib.celery import KeyedRouter, SerializedTask

BROKER_URL = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/1")
STORE_URL = os.environ.get("BENCH_STORE", "redis://127.0.0.1:6379/2")
WORK = float(os.environ.get("BENCH_WORK", "0.01"))
RECORDS = "bench:celery:records"
SLOTS = "bench:celery:slots"
ROUTER = KeyedRouter(queues=4, key="user", tasks=["bench.keyed", "bench.keyed_mailbox"])

app = Celery("bench_celery", broker=BROKER_URL)
app.conf.update(
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue="bench",
    task_routes=(ROUTER,),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    inturn_namespace="bench",
    inturn_lease=30.0,
)

_store: tuple[int, redis.Redis] | None = None
_slot: dict[str, float] = {}


def _client() -> redis.Redis:
    """One client per worker process (a prefork child must not reuse its parent's sockets)."""
    global _store
    if _store is None or _store[0] != os.getpid():
        _store = (os.getpid(), redis.Redis.from_url(STORE_URL))
    return _store[1]


def _body(mode: str, user: str, seq: int, sent: float) -> None:
    start = time.monotonic()
    time.sleep(WORK)
    end = time.monotonic()
    _slot["body"] = _slot.get("body", 0.0) + (end - start)
    _client().rpush(RECORDS, f"{mode}|{user}|{seq}|{start!r}|{end!r}|{sent!r}")


@signals.task_prerun.connect
def _prerun(**_: object) -> None:
    _slot["start"] = time.monotonic()
    _slot["body"] = 0.0


@signals.task_postrun.connect
def _postrun(task: object = None, **_: object) -> None:
    name = str(getattr(task, "name", ""))
    if not name.startswith("bench.") or "start" not in _slot:
        return
    took = time.monotonic() - _slot["start"]
    _client().rpush(SLOTS, f"{name[6:]}|{took!r}|{took - _slot['body']!r}")


@app.task(name="bench.lock")
def locked(user: str, seq: int, sent: float) -> None:
    with redis_lock.Lock(_client(), f"user:{user}", expire=30):
        _body("lock", user, seq, sent)


@app.task(name="bench.mailbox", base=SerializedTask, inturn={"key": "user"})
def mailbox(user: str, seq: int, sent: float) -> None:
    _body("mailbox", user, seq, sent)


@app.task(name="bench.turn", base=SerializedTask, inturn={"key": "user", "mode": "turn"})
def turn(user: str, seq: int, sent: float) -> None:
    _body("turn", user, seq, sent)


@app.task(name="bench.keyed")
def keyed(user: str, seq: int, sent: float) -> None:
    _body("keyed", user, seq, sent)


@app.task(name="bench.keyed_mailbox", base=SerializedTask, inturn={"key": "user"})
def keyed_mailbox(user: str, seq: int, sent: float) -> None:
    _body("keyed_mailbox", user, seq, sent)
