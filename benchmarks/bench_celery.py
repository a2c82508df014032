"""Four ways to keep each user's Celery tasks in order, side by side, in one run.

    python benchmarks/bench_celery.py [--quick] [--users 50] [--messages 20] [--work 0.01]

The script starts its own `redis-server` on a free 127.0.0.1 port (db 0: inturn, db 1: the
broker, db 2: the records), then, for each pipeline, sends the same burst workload (each
user's messages back to back, user after user) from one producer and waits until every
body ran:

1. `lock`: Celery prefork x4, each task holds python-redis-lock's per-user lock (blocking).
2. `mailbox`: Celery prefork x4, `SerializedTask` in mailbox mode.
3. `turn`: Celery prefork x4, `SerializedTask` in turn mode (a busy key is retried).
4. `keyed`: `KeyedRouter(queues=4)`, four workers with concurrency 1, one per shard queue;
   a plain task, no lock.
5. `keyed_mailbox`: the same router and workers, the task in mailbox mode (a safety net).

Reported per pipeline: messages/s (messages / (last body end - first send)), how many
messages ran before an earlier-sent message of their user ("out of order"), worker-slot
seconds spent outside a body (waiting for a lock or a turn, enqueueing), and the p99 of
send -> body end per message. Prints a Markdown table with the command and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(HERE), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

from _facts import command, cpu_model, version  # noqa: E402
from _procs import start_redis  # noqa: E402

MODES = ("lock", "mailbox", "turn", "keyed", "keyed_mailbox")


def _progress(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


class Worker:
    """A `celery worker` of `_celery_modes_app` in its own process group, killed on stop."""

    def __init__(self, env: dict[str, str], log: Path, queues: str, concurrency: int) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "_celery_modes_app",
                "worker",
                "--pool=prefork",
                f"--concurrency={concurrency}",
                "-Q",
                queues,
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"{queues}-{os.getpid()}@localhost",
            ],
            cwd=HERE,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self._out.close()


@dataclass
class Row:
    mode: str
    messages: int
    per_second: float
    out_of_order: int
    slot_seconds: float
    waiting_seconds: float
    p99_ms: float
    error: str = ""


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


def run_mode(mode: str, app: object, store: object, users: int, messages: int) -> Row:
    import redis
    from _celery_modes_app import RECORDS, SLOTS

    assert isinstance(store, redis.Redis)
    store.delete(RECORDS, SLOTS)
    total = users * messages
    first_send = time.monotonic()
    for u in range(users):
        for seq in range(messages):
            # The task's own apply_async, as an application sends it: in mailbox mode it
            # stores the call in the user's mailbox before the message goes out.
            task = app.tasks[f"bench.{mode}"]  # type: ignore[attr-defined]
            task.apply_async(kwargs={"user": f"u{u}", "seq": seq, "sent": time.monotonic()})
    deadline = time.monotonic() + max(120.0, total * 0.2)
    while store.llen(RECORDS) < total:
        if time.monotonic() > deadline:
            return Row(mode, store.llen(RECORDS), 0, 0, 0, 0, 0, "timed out")
        time.sleep(0.05)
    time.sleep(0.3)  # the last tasks' slot records
    records = [r.decode().split("|") for r in store.lrange(RECORDS, 0, -1)]
    runs: dict[str, list[tuple[float, int]]] = {}
    latencies: list[float] = []
    last_end = first_send
    for _, user, seq, start, end, sent in records:
        runs.setdefault(user, []).append((float(start), int(seq)))
        latencies.append(float(end) - float(sent))
        last_end = max(last_end, float(end))
    out_of_order = 0
    for ran in runs.values():
        highest = -1
        for _, seq in sorted(ran):
            if seq < highest:
                out_of_order += 1
            highest = max(highest, seq)
    slots = [r.decode().split("|") for r in store.lrange(SLOTS, 0, -1)]
    return Row(
        mode=mode,
        messages=len(records),
        per_second=len(records) / (last_end - first_send),
        out_of_order=out_of_order,
        slot_seconds=sum(float(s[1]) for s in slots),
        waiting_seconds=sum(float(s[2]) for s in slots),
        p99_ms=_p99(latencies) * 1000,
    )


def table(rows: list[Row], args: argparse.Namespace) -> str:
    names = {
        "lock": "Celery + python-redis-lock",
        "mailbox": "inturn mailbox mode",
        "turn": "inturn turn mode",
        "keyed": "KeyedRouter (4 shards x 1)",
        "keyed_mailbox": "KeyedRouter + mailbox mode",
    }
    lock = next((r for r in rows if r.mode == "lock" and not r.error), None)
    lines = [
        f"`{command()}` — {args.users} users x {args.messages} messages, "
        f"{args.work * 1000:g} ms of work per message, 4 worker slots",
        "",
        "| pipeline | msgs/s | x lock | out of order | slot s outside a body | p99 send→done ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {names[r.mode]} | {r.error} ({r.messages} done) | | | | |")
            continue
        ratio = f"{r.per_second / lock.per_second:.2f}" if lock else "-"
        lines.append(
            f"| {names[r.mode]} | {r.per_second:.0f} | {ratio} | {r.out_of_order} | "
            f"{r.waiting_seconds:.1f} of {r.slot_seconds:.1f} | {r.p99_ms:.0f} |"
        )
    lines += [
        "",
        f"Python {sys.version.split()[0]}, celery {version('celery')}, "
        f"kombu {version('kombu')}, redis-py {version('redis')}, "
        f"python-redis-lock {version('python-redis-lock')}, inturn {version('inturn')}; "
        f"{cpu_model()}, {os.cpu_count()} CPUs",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 users x 10 messages")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--work", type=float, default=0.01, help="seconds of work per body")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    if args.quick:
        args.users, args.messages = 20, 10
    server = start_redis()
    base = server.url.rsplit("/", 1)[0]
    env = {
        **os.environ,
        "BENCH_BROKER": f"{base}/1",
        "BENCH_STORE": f"{base}/2",
        "INTURN_URL": f"{base}/0",
        "BENCH_WORK": str(args.work),
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT / "src"), str(ROOT)]),
    }
    os.environ.update({k: env[k] for k in ("BENCH_BROKER", "BENCH_STORE", "INTURN_URL")})
    import redis
    from _celery_modes_app import ROUTER, app

    workdir = Path(tempfile.mkdtemp(prefix="bench-celery-"))
    workers = [Worker(env, workdir / "main.log", "bench", 4)]
    workers += [
        Worker(env, workdir / f"shard{n}.log", queue, 1)
        for n, queue in enumerate(ROUTER.queue_names)
    ]
    rows: list[Row] = []
    try:
        time.sleep(3.0)  # the workers connect
        for worker in workers:
            if not worker.alive():
                raise RuntimeError(f"a worker exited:\n{worker.tail()}")
        store = redis.Redis.from_url(env["BENCH_STORE"])
        for mode in args.modes.split(","):
            _progress(f"{mode}: {args.users * args.messages} tasks")
            rows.append(run_mode(mode, app, store, args.users, args.messages))
    finally:
        for worker in workers:
            worker.stop()
        server.stop()
    print(table(rows, args))


if __name__ == "__main__":
    main()
