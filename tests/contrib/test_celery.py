"""inturn.contrib.celery in a real Celery worker (prefork, 2 children) on a real Redis broker.

No eager mode: the test process sends tasks through the broker, the worker process runs
them, and each body writes its span to a history file and its effect to a fenced SQLite
sink (`tests/contrib/celery_app.py`); the test then checks what was written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery

import inturn
from inturn.testing import History, Span, check_history

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0


class Worker:
    """`celery -A tests.contrib.celery_app worker --pool=prefork -c N`, in its own group."""

    def __init__(self, env: dict[str, str], log: Path, concurrency: int = 2) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.contrib.celery_app",
                "worker",
                "--pool=prefork",
                f"-c{concurrency}",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"t{os.getpid()}-{time.monotonic_ns()}@localhost",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while " ready." not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the worker did not start:\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children left behind
        self._out.close()


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    base = redis_url.rsplit("/", 1)[0]
    return {
        **os.environ,
        "INTURN_TEST_BROKER": f"{base}/1",
        "INTURN_URL": f"{base}/0",
        "INTURN_TEST_DIR": str(tmp_path),
    }


@pytest.fixture
def start_worker(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(concurrency: int = 2, **extra: str) -> Worker:
        worker = Worker({**env, **extra}, tmp_path / f"worker{len(workers)}.log", concurrency)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def producer(env: dict[str, str]) -> Iterator[Celery]:
    """A plain Celery app in the test process that sends by task name (JSON, as usual)."""
    app = Celery("producer", broker=env["INTURN_TEST_BROKER"])
    app.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    yield app
    app.close()


def effects(tmp_path: Path) -> dict[tuple[str, int], tuple[int, int]]:
    """(user, seq) -> (fence, writes) from the fenced sink."""
    path = tmp_path / "sink.db"
    if not path.exists():
        return {}
    with (
        contextlib.closing(sqlite3.connect(path, timeout=30)) as conn,
        contextlib.suppress(sqlite3.OperationalError),
    ):
        rows = conn.execute("SELECT user, seq, fence, writes FROM effects").fetchall()
        return {(u, s): (f, w) for u, s, f, w in rows}
    return {}


def wait_for(tmp_path: Path, count: int, timeout: float) -> dict[tuple[str, int], tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while True:
        done = effects(tmp_path)
        if len(done) >= count or time.monotonic() > deadline:
            return done
        time.sleep(0.1)


def spans(tmp_path: Path) -> list[Span]:
    return History.load(*sorted(tmp_path.glob("history-*.jsonl")))


def mailbox_call(producer: Celery, user: str, seq: int, sleep: float = 0.0) -> None:
    producer.send_task(
        "t.mailbox", kwargs={"user": user, "seq": seq, "msg_id": f"{user}:{seq}", "sleep": sleep}
    )


def order_by_run(history: list[Span], mode: str) -> dict[str, list[int]]:
    """user -> the seqs of `mode`'s bodies, in the order they ran."""
    runs: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for span in history:
        kind, seq, _ = span.worker.split(":")
        if kind == mode:
            runs[span.key].append((span.start, int(seq)))
    return {user: [seq for _, seq in sorted(r)] for user, r in runs.items()}


def test_bursts_run_in_turn_per_user_in_both_modes(
    start_worker: Callable[..., Worker], producer: Celery, tmp_path: Path
) -> None:
    worker = start_worker()
    hot = [f"hot{i}" for i in range(3)]
    cold = [f"cold{i}" for i in range(20)]
    sent = 0
    for seq in range(12):  # a burst of 12 for each hot user, interleaved
        for user in hot:
            mailbox_call(producer, user, seq, sleep=0.005)
            producer.send_task("t.turn", kwargs={"user": f"t{user}", "seq": seq, "sleep": 0.005})
            sent += 2
    for user in cold:
        mailbox_call(producer, user, 0)
        producer.send_task("t.async", kwargs={"user": f"a{user}", "seq": 0})
        sent += 2
    for seq in range(6):  # a quick burst for a debounced batch task: one body or two
        producer.send_task(
            "t.batch", kwargs={"user": "batcher", "seq": seq, "msg_id": f"batcher:{seq}"}
        )
        sent += 1
    done = wait_for(tmp_path, sent, timeout=40)
    assert len(done) == sent, f"{len(done)}/{sent} done; worker log:\n{worker.text()[-3000:]}"
    assert all(writes == 1 for _, writes in done.values())
    batches = [
        line.split(" | ")
        for path in tmp_path.glob("batches-*.txt")
        for line in path.read_text().splitlines()
    ]
    assert 1 <= len(batches) < 6, batches  # coalesced
    for seqs, newest in batches:  # each body got the newest call's arguments
        assert seqs.split()[-1] == newest
    history = spans(tmp_path)
    # No two bodies of one user overlap, and fences grow in the order they ran: every mode.
    check_history(history, fifo=False)
    # Sent by name, each call is stored by the worker that runs it: the order they reach the
    # mailbox is not the send order (the .delay() test checks that order exactly), and the
    # time recorded in a message is taken just before its store, so no FIFO check here.
    runs = order_by_run(history, "mailbox")
    assert all(sorted(runs[u]) == list(range(12)) for u in hot)
    assert "WARNING" not in worker.text().replace("WorkerLostError", "")


def test_delay_stores_the_call_first_so_each_user_keeps_the_send_order(
    start_worker: Callable[..., Worker], env: dict[str, str], tmp_path: Path
) -> None:
    """Through the task's own .delay() (the sender has the task class), mailbox mode stores
    each call before its message is sent: two prefork children picking up one user's
    consecutive messages at once cannot reorder them. Every user's calls run in exactly the
    order they were sent, each once."""
    worker = start_worker(concurrency=4)
    users, per_user = 8, 15
    sender = (
        "from tests.contrib.celery_app import mailbox_task as mailbox\n"
        f"for seq in range({per_user}):\n"
        f"    for u in range({users}):\n"
        "        mailbox.delay(user=f'd{u}', seq=seq, msg_id=f'd{u}:{seq}', sleep=0.002)\n"
    )
    subprocess.run([sys.executable, "-c", sender], env=env, check=True, timeout=60)
    done = wait_for(tmp_path, users * per_user, timeout=40)
    assert len(done) == users * per_user, worker.text()[-3000:]
    assert all(writes == 1 for _, writes in done.values())
    runs = order_by_run(spans(tmp_path), "mailbox")
    assert {u: runs[f"d{u}"] for u in range(users)} == {
        u: list(range(per_user)) for u in range(users)
    }


@pytest.mark.parametrize("sweeper", ["timer", "task"])
def test_a_killed_worker_child_is_attempted_again_and_its_effect_written_once(
    start_worker: Callable[..., Worker], producer: Celery, tmp_path: Path, sweeper: str
) -> None:
    # "timer": each worker process sweeps every 0.5 s; "task": only `inturn.sweep`, sent
    # by the test as beat would, resumes the queue the killed process was draining.
    worker = start_worker(**({"INTURN_TEST_NO_SWEEPER": "1"} if sweeper == "task" else {}))
    mailbox_call(producer, "kill1", 0)  # stalls on its first attempt
    deadline = time.monotonic() + 20
    marker = tmp_path / "stall-kill1-0"
    while not marker.exists():
        assert time.monotonic() < deadline, "the stalling task never started"
        time.sleep(0.05)
    for seq in range(1, 4):  # the user's later calls queue behind it
        mailbox_call(producer, "kill1", seq)
    time.sleep(0.3)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    if sweeper == "task":
        deadline = time.monotonic() + 30
        while len(effects(tmp_path)) < 4 and time.monotonic() < deadline:
            producer.send_task("inturn.sweep")
            time.sleep(0.5)
    done = wait_for(tmp_path, 4, timeout=30)
    assert sorted(done) == [("kill1", s) for s in range(4)], worker.text()[-6000:]
    assert all(writes == 1 for _, writes in done.values()), done
    with contextlib.closing(sqlite3.connect(tmp_path / "sink.db")) as conn:
        attempts = conn.execute(
            "SELECT pid FROM attempts WHERE user = 'kill1' AND seq = 0 ORDER BY rowid"
        ).fetchall()
    # Attempted again, by another process (the killed one never finished it).
    assert len(attempts) == 2, attempts
    assert attempts[0] != attempts[1]
    assert "resumed key 'kill1'" in worker.text()  # by a sweep, after the lease ran out
    assert order_by_run(spans(tmp_path), "mailbox")["kill1"] == [0, 1, 2, 3]
    check_history(spans(tmp_path), fifo=True)


def test_one_users_flood_does_not_hold_up_the_others(
    start_worker: Callable[..., Worker], producer: Celery, tmp_path: Path
) -> None:
    worker = start_worker()
    flood, work = 50, 0.1  # 5 s of one user's work
    for seq in range(flood):
        mailbox_call(producer, "flood", seq, sleep=work)
    others_sent = time.monotonic()
    for i in range(20):
        mailbox_call(producer, f"other{i}", 0, sleep=0.005)
    done = wait_for(tmp_path, flood + 20, timeout=40)
    assert len(done) == flood + 20
    history = spans(tmp_path)
    check_history(history, fifo=True)
    flood_end = max(s.end for s in history if s.key == "flood")
    others_end = max(s.end for s in history if s.key != "flood")
    # The flood's drain holds one of the two slots; every other user goes through the
    # other one: the head-of-line bound is one slot per drained user, not the flood. (Its
    # other calls only pass through that slot to be stored: Celery's per-task overhead.)
    assert others_end - others_sent < flood * work / 2, worker.text()[-4000:]
    assert others_end < flood_end - 1.0


def test_an_unsafe_configuration_is_warned_about_at_worker_start(
    start_worker: Callable[..., Worker],
) -> None:
    worker = start_worker(INTURN_TEST_UNSAFE="1")
    log = worker.text()
    for setting in (
        "task_acks_late",
        "task_reject_on_worker_lost",
        "worker_prefetch_multiplier",
        "visibility_timeout",
    ):
        assert any("WARNING" in line and setting in line for line in log.splitlines()), setting


def test_pickle_is_refused() -> None:
    from inturn.contrib.celery import SerializedTask

    app = Celery("pickled", broker="memory://")
    app.conf.update(task_serializer="pickle", accept_content=["pickle"], inturn_url="memory://")

    @app.task(base=SerializedTask, inturn={"key": "user"})
    def job(user: str) -> None: ...

    with pytest.raises(inturn.ConfigurationError, match="JSON"):
        app.finalize()
        job.name  # noqa: B018 - binds the task


def test_options_are_checked() -> None:
    from inturn.contrib.celery import SerializedTask

    app = Celery("opts", broker="memory://")
    app.conf.update(inturn_url="memory://")

    @app.task(base=SerializedTask, inturn={"key": "uid"})
    def job(user: str) -> None: ...

    with pytest.raises(inturn.ConfigurationError, match="'uid'"):
        job.name  # noqa: B018


def test_the_keyed_router_is_stable_and_spreads_keys() -> None:
    from inturn.contrib.celery import KeyedRouter, shard_of

    router = KeyedRouter(queues=4, key="user_id")
    assert router("t", (), {"user_id": 42}, {}) == {"queue": f"inturn.shard.{shard_of(42, 4)}"}
    assert shard_of(42, 4) == shard_of("42", 4)
    # Fixed values: the hash must be the same in every process, run and release
    # (Python's own `hash` of a str changes with each process).
    assert [shard_of(k, 8) for k in ("a", "b", 1, 2, "user-42")] == [7, 5, 6, 4, 6]
    counts: dict[int, int] = defaultdict(int)
    for user in range(4000):
        counts[shard_of(user, 4)] += 1
    assert all(800 < n < 1200 for n in counts.values()), counts
    assert router("t", (), {"other": 1}, {}) is None


def test_a_direct_call_runs_the_body_here_async_def_and_bind_included() -> None:
    from inturn.contrib.celery import SerializedTask

    app = Celery("direct", broker="memory://")
    app.conf.update(inturn_url="memory://")

    @app.task(base=SerializedTask, inturn={"key": "user"})
    async def double(user: int) -> int:
        return user * 2

    @app.task(bind=True, base=SerializedTask, inturn={"key": "user", "dedup": "msg"})
    def bound(self: object, user: int, msg: str) -> str:
        return f"{user}:{msg}"

    assert double(4) == 8
    assert bound(1, "m") == "1:m"
