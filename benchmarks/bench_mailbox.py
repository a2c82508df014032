"""inturn's mailbox against Celery with a per-user lock, in one run on one redis-server.

    python benchmarks/bench_mailbox.py [--quick] [--markdown PATH]

The script starts its own `redis-server` on a free 127.0.0.1 port in a temp dir
(`tests.servers.RedisServer`), runs every scenario against it, prints the tables and ratios,
and stops the server (and the Celery worker it started).

Scenarios:
1. throughput: U users x M messages through one mailbox with a zero-work handler, from
   4 processes, each with its own event loop and `Gate.from_url`. Either each process submits
   for its own users (`user % 4 == p`: "partitioned") or every process submits for every user
   ("interleaved": the drainer of a user is often another process than the submitter). Wall
   time from the start barrier to the last handled message, messages/s, Redis commands per
   message counted in the client (every `execute_command` of the processes' redis-py clients
   and every command of inturn's pipelined script connection; the Pub/Sub listener is not
   one of them) and on the server (INFO commandstats, which also
   counts the commands that scripts run). Checked: every message handled exactly once, and in
   order for each (user, submitting process).
2. Celery baseline: the same messages as tasks to a Celery worker (`--concurrency 4`,
   prefork, Redis broker on another db of the same server); each task holds python-redis-lock's
   `Lock(conn, f"user:{user}", expire=30)` around a zero-work body. One producer sends them all
   with `task.delay`. Reports messages/s, inturn/Celery, and how many messages ran out of order.
3. head-of-line: one user floods F messages, then 100 other users send one each; handlers
   sleep 1 ms. The 100 users' latency (submit -> handler start) p50/p99, against the same 100
   users without the flood; for the mailbox (one process) and for the Celery worker.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import importlib
import importlib.metadata
import math
import multiprocessing
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis
from _facts import (  # benchmarks/ is sys.path[0]
    cleaned_up,
    fact_lines,
    machine_facts,
    percentile,
    redis_cpu,
    tree_cpu,
)
from _procs import BarrierLike, EventLike, Shared, start_redis

Spread = Literal["partitioned", "interleaved"]
# (user, seq, producer, handled at, submitted at, process, index in that process)
Record = tuple[str, int, int, float, float, int, int]

HERE = Path(__file__).resolve().parent
PROCESSES = 4
CELERY_DB = 1
OTHERS = 100  # users that each send one message in the head-of-line scenario
HOL_SLEEP = 0.001  # seconds each head-of-line handler works


# -- what to run --------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (`--quick` shrinks them)."""

    users: int
    per_user: int
    flood: int  # messages of the flooding user
    gap: float  # seconds between two of the other users' messages
    timeout: float  # cap on one scenario

    @classmethod
    def make(cls, args: argparse.Namespace) -> Plan:
        if args.quick:
            return cls(users=200, per_user=10, flood=300, gap=0.002, timeout=60.0)
        return cls(users=1000, per_user=20, flood=1000, gap=0.005, timeout=150.0)

    @property
    def total(self) -> int:
        return self.users * self.per_user


@dataclass(frozen=True)
class Variant:
    """One mailbox configuration of the throughput scenario."""

    spread: Spread
    batch: bool = False
    ids: bool = False  # submit with id= (dedup: the handler's effect is once)

    @property
    def name(self) -> str:
        extras = [x for x, on in (("batch=True", self.batch), ("id=", self.ids)) if on]
        return f"inturn mailbox, {self.spread}" + "".join(f", {x}" for x in extras)


VARIANTS = (Variant("partitioned"), Variant("interleaved"))
MORE_VARIANTS = (  # --all-variants
    Variant("interleaved", batch=True),
    Variant("interleaved", ids=True),  # the cost of dedup
)


@dataclass(frozen=True)
class WorkerSpec:
    """What one throughput process does; picklable."""

    url: str
    namespace: str
    variant: Variant
    index: int
    users: int
    per_user: int

    def sends(self) -> list[tuple[int, int]]:
        """(user, seq) in submit order: round by round over the users, as traffic arrives."""
        if self.variant.spread == "partitioned":
            mine = range(self.index, self.users, PROCESSES)
            return [(u, s) for s in range(self.per_user) for u in mine]
        return [
            (u, s) for s in range(self.index, self.per_user, PROCESSES) for u in range(self.users)
        ]


# -- statistics ---------------------------------------------------------------------------


@dataclass
class Check:
    """Exactly once and in order, from the handled records."""

    handled: int = 0
    missing: int = 0
    duplicates: int = 0
    out_of_order: int = 0  # handled after a later message of the same (user, producer)
    users_out_of_order: int = 0

    @classmethod
    def of(cls, records: Sequence[Record], expected: dict[str, list[tuple[int, int]]]) -> Check:
        """`expected`: per user, (producer, seq) in each producer's submit order."""
        check = cls(handled=len(records))
        by_user: dict[str, list[Record]] = collections.defaultdict(list)
        for record in sorted(records, key=lambda r: (r[3], r[5], r[6])):
            by_user[record[0]].append(record)
        for user, wanted in expected.items():
            got = by_user.pop(user, [])
            seen = collections.Counter((r[2], r[1]) for r in got)
            check.duplicates += sum(n - 1 for n in seen.values() if n > 1)
            check.missing += sum(1 for pair in wanted if pair not in seen)
            late = 0
            highest: dict[int, int] = {}
            for r in got:
                if r[1] < highest.get(r[2], -1):
                    late += 1
                highest[r[2]] = max(highest.get(r[2], -1), r[1])
            check.out_of_order += late
            check.users_out_of_order += late > 0
        check.duplicates += sum(len(rest) for rest in by_user.values())  # users never sent
        return check

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicates or self.out_of_order)

    def text(self) -> str:
        if self.ok:
            return "ok"
        return (
            f"missing {self.missing}, duplicates {self.duplicates}, "
            f"out of order {self.out_of_order} ({self.users_out_of_order} users)"
        )


def expected_sends(specs: Sequence[WorkerSpec]) -> dict[str, list[tuple[int, int]]]:
    expected: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for spec in specs:
        for user, seq in spec.sends():
            expected[f"u{user}"].append((spec.index, seq))
    return expected


# -- results ------------------------------------------------------------------------------


@dataclass
class Throughput:
    name: str
    messages: int = 0
    seconds: float = math.nan
    submit_seconds: float = math.nan  # until the last submit returned
    latency_p50: float = math.nan
    latency_p99: float = math.nan
    client_commands: collections.Counter[str] = field(default_factory=collections.Counter)
    server_calls: collections.Counter[str] = field(default_factory=collections.Counter)
    foreign: float = math.nan  # share handled by another process than the submitter
    client_cpu: float = math.nan  # CPU seconds of the client processes during the run
    server_cpu: float = math.nan  # CPU seconds of redis-server during the run
    check: Check | None = None
    note: str = ""
    error: str | None = None

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else math.nan

    def client_per_message(self) -> float:
        total = sum(self.client_commands.values())
        return total / self.messages if total and self.messages else math.nan

    def server_per_message(self) -> float:
        total = sum(self.server_calls.values())
        return total / self.messages if total and self.messages else math.nan

    def client_cpu_per_message(self) -> float:
        """Client CPU seconds per message (submitters, drainers, workers: all processes)."""
        return self.client_cpu / self.messages if self.messages else math.nan

    def server_cpu_per_message(self) -> float:
        return self.server_cpu / self.messages if self.messages else math.nan


@dataclass
class HeadOfLine:
    name: str
    alone: list[float] = field(default_factory=list)  # latencies without the flood
    flooded: list[float] = field(default_factory=list)  # with it
    flood_seconds: float = math.nan  # until the flooding user's last message was handled
    flood_order: list[int] = field(default_factory=list)  # the flood's seqs as handled
    error: str | None = None

    @property
    def flood_out_of_order(self) -> int:
        """Flood messages handled after a later one."""
        late, highest = 0, -1
        for seq in self.flood_order:
            late += seq < highest
            highest = max(highest, seq)
        return late


@dataclass
class Results:
    throughput: list[Throughput] = field(default_factory=list)
    head_of_line: list[HeadOfLine] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


_BEGAN = time.monotonic()


def _progress(message: str) -> None:
    print(f"  {time.monotonic() - _BEGAN:6.1f} s  {message}", file=sys.stderr, flush=True)


# -- server-side command counts -----------------------------------------------------------


def reset_commandstats(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.config_resetstat()
    finally:
        client.close()


def read_commandstats(url: str) -> collections.Counter[str]:
    """Calls per command since the last reset (commands run by scripts included)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    calls: collections.Counter[str] = collections.Counter()
    for name, value in stats.items():
        command = name.removeprefix("cmdstat_")
        if command not in ("info", "config|resetstat"):  # this script's own bookkeeping
            calls[command] = int(value["calls"])
    return calls


# -- scenario 1: mailbox throughput -------------------------------------------------------


def _install_command_counter(counter: collections.Counter[str]) -> None:
    """Count every command the process's async redis-py clients send, by name.

    `Redis.execute_command` is one request and one reply; so is each command inturn's
    pipelined script connection sends (`Mux._send`, private: patched only to count). The
    Pub/Sub listener goes through `PubSub.execute_command` and is not counted. EVALSHA is
    named by its script.
    """
    import redis.asyncio.client

    scripts: dict[str, str] = {}
    with contextlib.suppress(ImportError, AttributeError):
        # private: only to name the scripts in the breakdown
        from inturn._backends.redis import _shared as _redis

        scripts = {
            hashlib.sha1(lua.encode()).hexdigest(): name.upper()
            for name, lua in _redis.SCRIPTS.items()
        }
    original = redis.asyncio.client.Redis.execute_command

    def count(command: Sequence[Any]) -> None:
        name = str(command[0]).upper()
        if name == "EVALSHA":
            sha = str(command[1])
            name = f"EVALSHA {scripts.get(sha, sha[:8])}"
        counter[name] += 1

    async def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        count(args)
        return await original(self, *args, **options)

    redis.asyncio.client.Redis.execute_command = execute_command  # type: ignore[method-assign]

    with contextlib.suppress(ImportError, AttributeError):
        from inturn._backends.redis._mux import Mux

        send = Mux._send

        def counted_send(self: Any, link: Any, command: tuple[Any, ...], **options: Any) -> Any:
            count(command)
            return send(self, link, command, **options)

        Mux._send = counted_send  # type: ignore[method-assign]


@dataclass(frozen=True)
class _Sync:
    """What the parent and the throughput processes share."""

    ready: BarrierLike  # every process warmed up (parent included)
    go: EventLike
    at: Shared  # the start, on time.monotonic() (one clock for all processes on Linux)
    handled: Any  # Array('q'): messages handled, one slot per process
    finish: EventLike  # the parent has read the server's counters: close and report
    reports: Any  # Queue


def _throughput_process(spec: WorkerSpec, sync: _Sync) -> None:
    try:
        asyncio.run(_throughput_worker(spec, sync))
    except BaseException as exc:
        sync.ready.abort()  # nobody waits 60 s for a process that is gone
        sync.reports.put(("failed", spec.index, _error(exc)))


async def _throughput_worker(spec: WorkerSpec, sync: _Sync) -> None:
    import inturn

    counter: collections.Counter[str] = collections.Counter()
    _install_command_counter(counter)
    records: list[Record] = []
    me = spec.index

    async def handler(message: Any) -> None:
        now = time.monotonic()
        batch = message if isinstance(message, list) else [message]
        for m in batch:
            p = m.payload
            records.append((m.key, p["s"], p["p"], now, p["t"], me, len(records)))
        sync.handled[me] += len(batch)

    gate = inturn.Gate.from_url(spec.url, namespace=spec.namespace)
    try:
        mailbox = gate.mailbox("bench", handler=handler, batch=spec.variant.batch)
        # Warm up: scripts loaded, the wake-up channel subscribed, a few connections open.
        for i in range(8):
            await mailbox.submit(f"warm-{me}-{i}", {"s": 0, "p": me, "t": 0.0})
        if not await mailbox.drained(timeout=30):
            raise TimeoutError("the warm-up messages were not handled within 30 s")
        records.clear()
        sync.handled[me] = 0
        await asyncio.to_thread(sync.ready.wait, 60)
        await asyncio.to_thread(sync.go.wait, 60)
        await asyncio.sleep(max(0.0, sync.at.value - time.monotonic()))
        counter.clear()
        cpu = time.process_time()  # every thread of this process: submits, drains, listener
        ids = spec.variant.ids
        for user, seq in spec.sends():
            now = time.monotonic()
            await mailbox.submit(
                f"u{user}", {"s": seq, "p": me, "t": now}, id=f"{seq}.{me}" if ids else None
            )
        submitted = time.monotonic()
        # A process drains only what its own submits started (no sweeper runs here), so once
        # its submits are done and its drains are finished, it will handle nothing more.
        if not await mailbox.drained(timeout=spec_timeout(spec)):
            raise TimeoutError("drains still running after the time limit")
        sync.reports.put(("drained", me, (submitted, time.process_time() - cpu)))
        await asyncio.to_thread(sync.finish.wait, 120)
        commands = dict(counter)
        await mailbox.aclose(timeout=5)
    finally:
        await gate.aclose()
    sync.reports.put(("done", me, (records, commands)))


def spec_timeout(spec: WorkerSpec) -> float:
    return 30.0 + spec.users * spec.per_user / 200  # generous: 200 messages/s would be awful


def _process_context() -> Any:
    """Processes fork from a clean single-threaded server with the drivers loaded (as in
    bench_locks.py: forking this process is unsafe, a plain spawn is slow on few cores)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["redis", "redis.asyncio", "inturn"])
    return ctx


def leftover_mailbox_keys(url: str, namespace: str) -> int:
    """Queue, in-flight and role keys, and hint-set members, still there after a run."""
    client = redis.Redis.from_url(url)
    try:
        keys = sum(1 for _ in client.scan_iter(match=f"inturn:{namespace}:*:m:*", count=1000))
        hints = sum(client.scard(k) for k in client.scan_iter(match=f"inturn:{namespace}:mb:*"))
        return keys + hints
    finally:
        client.close()


def run_throughput(url: str, plan: Plan, variant: Variant) -> Throughput:
    result = Throughput(variant.name)
    namespace = f"bench-{secrets.token_hex(3)}"
    specs = [
        WorkerSpec(url, namespace, variant, i, plan.users, plan.per_user) for i in range(PROCESSES)
    ]
    ctx = _process_context()
    sync = _Sync(
        ready=ctx.Barrier(PROCESSES + 1),
        go=ctx.Event(),
        at=ctx.Value("d", 0.0),
        handled=ctx.Array("q", PROCESSES, lock=False),
        finish=ctx.Event(),
        reports=ctx.Queue(),
    )
    procs = [
        ctx.Process(target=_throughput_process, args=(spec, sync), daemon=True) for spec in specs
    ]
    for proc in procs:
        proc.start()
    try:
        _drive_throughput(url, plan, specs, sync, result)
        if result.error is None:
            left = leftover_mailbox_keys(url, namespace)
            if left:
                result.note = f"{left} mailbox keys left behind"
    except Exception as exc:
        result.error = _error(exc)
    finally:
        sync.finish.set()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return result


def _drive_throughput(
    url: str, plan: Plan, specs: Sequence[WorkerSpec], sync: _Sync, result: Throughput
) -> None:
    def report(timeout: float) -> tuple[str, int, Any]:
        kind, index, payload = sync.reports.get(timeout=max(0.01, timeout))
        if kind == "failed":
            raise RuntimeError(f"process {index}: {payload}")
        return kind, index, payload

    try:
        sync.ready.wait(timeout=120)
    except Exception:
        kind, index, payload = report(5)  # the reason a process gave up
        raise RuntimeError(f"process {index} did not start: {kind} {payload}") from None
    reset_commandstats(url)
    server_cpu = redis_cpu(url)
    sync.at.value = time.monotonic() + 0.05  # every process is awake before the start
    sync.go.set()
    deadline = sync.at.value + plan.timeout
    drained: dict[int, tuple[float, float]] = {}  # process -> (last submit returned, its CPU)
    while sum(sync.handled) < plan.total or len(drained) < len(specs):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{sum(sync.handled)} of {plan.total} messages handled after {plan.timeout:g} s"
            )
        try:
            kind, index, payload = report(0.002)
        except queue.Empty:
            continue
        drained[index] = payload
    result.server_calls = read_commandstats(url)
    result.server_cpu = redis_cpu(url) - server_cpu
    sync.finish.set()
    records: list[Record] = []
    done = 0
    while done < len(specs):
        kind, index, payload = report(30)
        if kind == "done":
            done += 1
            recs, commands = payload
            records += recs
            result.client_commands.update(commands)
    start = sync.at.value
    result.messages = len(records)
    result.seconds = max(r[3] for r in records) - start if records else math.nan
    result.submit_seconds = max(d[0] for d in drained.values()) - start
    result.client_cpu = sum(d[1] for d in drained.values())
    latencies = [r[3] - r[4] for r in records]
    result.latency_p50 = percentile(latencies, 50)
    result.latency_p99 = percentile(latencies, 99)
    result.foreign = sum(r[2] != r[5] for r in records) / len(records) if records else math.nan
    result.check = Check.of(records, expected_sends(specs))


# -- scenario 3 for the mailbox: head-of-line ---------------------------------------------


async def run_head_of_line_mailbox(url: str, plan: Plan) -> HeadOfLine:
    import inturn

    result = HeadOfLine("inturn mailbox (1 process)")
    gate = inturn.Gate.from_url(url, namespace=f"bench-hol-{secrets.token_hex(3)}")
    started: dict[str, float] = {}
    flood_done = 0.0

    async def handler(message: Any) -> None:
        nonlocal flood_done
        now = time.monotonic()
        started[f"{message.key}.{message.payload['n']}"] = now - message.payload["t"]
        await asyncio.sleep(HOL_SLEEP)
        if message.key == "flood":
            flood_done = time.monotonic()
            result.flood_order.append(message.payload["n"])

    try:
        mailbox = gate.mailbox("hol", handler=handler)
        await mailbox.submit("warm", {"n": 0, "t": time.monotonic()})
        await mailbox.drained(timeout=30)

        async def others(tag: str) -> list[float]:
            for i in range(OTHERS):
                await mailbox.submit(f"{tag}{i}", {"n": 0, "t": time.monotonic()})
                await asyncio.sleep(plan.gap)
            if not await mailbox.drained(timeout=plan.timeout):
                raise TimeoutError("messages still unhandled after the time limit")
            return [started.pop(f"{tag}{i}.0") for i in range(OTHERS)]

        await others("warm")  # opens the connections that concurrent drains need
        result.alone = await others("alone")
        began = time.monotonic()
        for n in range(plan.flood):
            await mailbox.submit("flood", {"n": n, "t": time.monotonic()})
        result.flooded = await others("other")
        result.flood_seconds = flood_done - began
        await mailbox.aclose(timeout=5)
    finally:
        await gate.aclose()
    return result


# -- scenario 2 and 3 for Celery ----------------------------------------------------------


class CeleryWorker:
    """`celery worker --concurrency 4 --pool prefork` in its own process group, killed on stop."""

    def __init__(self, broker: str, store: str, workdir: str) -> None:
        self.env = {
            **os.environ,
            "BENCH_CELERY_BROKER": broker,
            "BENCH_CELERY_STORE": store,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        self.log = Path(workdir) / "celery.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "_celery_app",
            "worker",
            "--concurrency",
            str(PROCESSES),
            "--pool",
            "prefork",
            "-l",
            "WARNING",
            "--without-gossip",  # no chatter between workers: there is one
            "--without-mingle",  # and nobody to sync with at start (saves a 1 s wait)
            "--without-heartbeat",
            "-n",
            f"bench-{secrets.token_hex(3)}@%h",
        ]

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=HERE,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: the pool children die with it
            )

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-1500:]
        return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)  # the group we made: the worker and its pool
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
                break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # pool children that outlived their parent
        self.proc = None


@dataclass(frozen=True)
class CeleryRecord:
    user: str
    seq: int
    started: float
    sent: float


class CeleryRun:
    """The producer side: the task module, and the records list on the store."""

    def __init__(self, broker: str, store: str) -> None:
        os.environ["BENCH_CELERY_BROKER"] = broker
        os.environ["BENCH_CELERY_STORE"] = store
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        self.module = importlib.import_module("_celery_app")
        self.store = redis.Redis.from_url(store)

    def clear(self) -> None:
        self.store.delete(self.module.RECORDS)

    def wait_for(self, count: int, timeout: float, worker: CeleryWorker) -> list[CeleryRecord]:
        deadline = time.monotonic() + timeout
        while (have := self.store.llen(self.module.RECORDS)) < count:
            if worker.proc is None or worker.proc.poll() is not None:
                raise RuntimeError(f"the Celery worker exited: {worker.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{have} of {count} Celery tasks done after {timeout:g} s")
            time.sleep(0.005)
        records = []
        for raw in self.store.lrange(self.module.RECORDS, 0, -1):
            user, seq, started, sent = raw.decode().split("|")
            records.append(CeleryRecord(user, int(seq), float(started), float(sent)))
        return records

    def close(self) -> None:
        self.store.close()
        with contextlib.suppress(Exception):
            self.module.app.close()


def run_celery(url: str, plan: Plan, workdir: str, results: Results) -> None:
    try:
        importlib.import_module("celery")
        importlib.import_module("redis_lock")
    except ImportError as exc:
        results.skipped.append(f"Celery baseline: {exc} (pip install 'celery[redis]')")
        return
    broker = url.rsplit("/", 1)[0] + f"/{CELERY_DB}"
    worker = CeleryWorker(broker, broker, workdir)
    run = CeleryRun(broker, broker)
    name = f"Celery prefork x{PROCESSES} + python-redis-lock"
    try:
        run.clear()
        _progress("celery: starting the worker")
        worker.start()
        for i in range(2 * PROCESSES):  # every pool process has run a task: warm
            run.module.locked.delay(f"warm{i}", 0)
        run.wait_for(2 * PROCESSES, 60, worker)
        _progress(f"celery: {plan.total} tasks")
        results.throughput.append(celery_throughput(url, plan, run, worker, name))
        _progress("celery: head-of-line")
        results.head_of_line.append(celery_head_of_line(plan, run, worker, name))
    except Exception as exc:
        results.throughput.append(Throughput(name, error=_error(exc)))
    finally:
        worker.stop()
        run.close()


def celery_throughput(
    url: str, plan: Plan, run: CeleryRun, worker: CeleryWorker, name: str
) -> Throughput:
    result = Throughput(name)
    run.clear()
    reset_commandstats(url)
    assert worker.proc is not None
    server_cpu, worker_cpu = redis_cpu(url), tree_cpu(worker.proc.pid)
    start = time.monotonic()
    producer_cpu = time.process_time()
    for seq in range(plan.per_user):
        for user in range(plan.users):
            run.module.locked.delay(f"u{user}", seq, time.monotonic())
    producer_cpu = time.process_time() - producer_cpu
    result.submit_seconds = time.monotonic() - start
    records = run.wait_for(plan.total, plan.timeout, worker)
    result.client_cpu = producer_cpu + tree_cpu(worker.proc.pid) - worker_cpu
    result.server_cpu = redis_cpu(url) - server_cpu
    result.server_calls = read_commandstats(url)
    result.messages = len(records)
    result.seconds = max(r.started for r in records) - start
    latencies = [r.started - r.sent for r in records]
    result.latency_p50 = percentile(latencies, 50)
    result.latency_p99 = percentile(latencies, 99)
    # The list is in lock order: a user's records come in the order their bodies ran.
    as_records: list[Record] = [
        (r.user, r.seq, 0, r.started, r.sent, 0, i) for i, r in enumerate(records)
    ]
    expected = {f"u{u}": [(0, s) for s in range(plan.per_user)] for u in range(plan.users)}
    result.check = Check.of(as_records, expected)
    result.note = "one producer; the body appends a record (1 RPUSH)"
    return result


def celery_head_of_line(plan: Plan, run: CeleryRun, worker: CeleryWorker, name: str) -> HeadOfLine:
    result = HeadOfLine(name)

    def others(tag: str, flood: int) -> list[float]:
        for i in range(OTHERS):
            run.module.locked.delay(f"{tag}{i}", 0, time.monotonic(), HOL_SLEEP)
            time.sleep(plan.gap)
        records = run.wait_for(flood + OTHERS, plan.timeout, worker)
        mine = [r for r in records if r.user.startswith(tag)]
        return [r.started - r.sent for r in mine]

    run.clear()
    others("warm", 0)
    run.clear()
    result.alone = others("alone", 0)
    run.clear()
    began = time.monotonic()
    for n in range(plan.flood):
        run.module.locked.delay("flood", n, time.monotonic(), HOL_SLEEP)
    result.flooded = others("other", plan.flood)
    flood = [r for r in run.wait_for(plan.flood + OTHERS, 1, worker) if r.user == "flood"]
    result.flood_seconds = max(r.started for r in flood) + HOL_SLEEP - began
    result.flood_order = [r.seq for r in flood]  # the list is in lock order
    return result


# -- output -------------------------------------------------------------------------------


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        widths = [
            max(len(row[i]) for row in [self.header, *self.rows]) for i in range(len(self.header))
        ]

        def line(row: list[str]) -> str:
            return "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )

        out = [self.title, line(self.header), "  ".join("-" * w for w in widths)]
        out += [line(row) for row in self.rows]
        out += [f"  * {note}" for note in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"## {self.title}", "", "| " + " | ".join(self.header) + " |"]
        out.append(
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.header))) + "|"
        )
        out += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {note}" for note in self.notes]
        return "\n".join(out)


def _ms(seconds: float, digits: int = 1) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.{digits}f}"


def _num(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def throughput_table(results: Results, plan: Plan) -> Table:
    table = Table(
        f"1-2. Throughput: {plan.users} users x {plan.per_user} messages, zero-work handler",
        [
            "",
            "msgs/s",
            "wall s",
            "submits s",
            "lat p50 ms",
            "lat p99 ms",
            "cmds/msg client",
            "cmds/msg server",
            "client CPU ms/msg",
            "redis CPU ms/msg",
            "other proc",
            "exactly once, in order",
        ],
    )
    for r in results.throughput:
        if r.error:
            table.rows.append([r.name, "error", *["-"] * 9, r.error[:120]])
            continue
        check = r.check.text() if r.check else "-"
        table.rows.append(
            [
                r.name,
                _num(r.per_second, 0),
                _num(r.seconds, 2),
                _num(r.submit_seconds, 2),
                _ms(r.latency_p50),
                _ms(r.latency_p99),
                _num(r.client_per_message(), 2),
                _num(r.server_per_message(), 1),
                _ms(r.client_cpu_per_message(), 3),
                _ms(r.server_cpu_per_message(), 3),
                "-" if math.isnan(r.foreign) else f"{r.foreign:.0%}",
                check + (f"; {r.note}" if r.note else ""),
            ]
        )
    table.notes += [
        f"inturn: {PROCESSES} processes, each with its own event loop and Gate.from_url, one "
        "mailbox; 'partitioned': process p submits for users u % 4 == p; 'interleaved': every "
        "process submits for every user (message seq s from process s % 4)",
        "wall s: start barrier -> last handler start; submits s: until the last submit returned "
        "(Celery: until the producer sent the last task); lat: submit -> handler start",
        "cmds/msg client: commands sent per message by the processes' redis-py clients and "
        "inturn's pipelined script connections (round trips; the Pub/Sub listener's reads are "
        "not commands); server: INFO "
        "commandstats calls per message, which includes the commands run inside scripts",
        "client CPU: user + system CPU of the client processes, all threads, per message "
        "(inturn: the 4 processes from the start to their last drain; Celery: the producer's "
        "sends and the worker with its pool children until the last task); redis CPU: INFO "
        "cpu of the one redis-server over the same span (Celery's broker and locks included)",
        "other proc: share of messages handled by a process other than their submitter "
        "(the drainer role was held elsewhere)",
        "in order: per (user, submitting process) - the only order defined when 4 processes "
        "submit for one user at once; Celery has one producer, so per user",
    ]
    return table


def ratio_table(results: Results) -> Table:
    table = Table(
        "Ratios (goals: inturn/Celery >= 8x; client commands per message <= 3)",
        ["", "msgs/s", "x Celery", "client CPU ms/msg", "x Celery CPU", "cmds/msg client", "<= 3"],
    )
    celery = next(
        (r for r in results.throughput if r.name.startswith("Celery") and not r.error), None
    )
    for r in results.throughput:
        if r.error or r.name.startswith("Celery"):
            continue
        per = r.client_per_message()
        table.rows.append(
            [
                r.name,
                _num(r.per_second, 0),
                _num(r.per_second / celery.per_second, 2) if celery else "-",
                _ms(r.client_cpu_per_message(), 3),
                _num(celery.client_cpu_per_message() / r.client_cpu_per_message(), 2)
                if celery
                else "-",
                _num(per, 2),
                "-" if math.isnan(per) else ("yes" if per <= 3 else "NO"),
            ]
        )
    return table


def commands_table(results: Results) -> Table:
    """Where the round trips go: the client-side commands per message, by command."""
    table = Table("Client commands per message, by command", ["command"])
    runs = [r for r in results.throughput if r.client_commands and r.messages]
    table.header += [r.name.removeprefix("inturn mailbox, ") for r in runs]
    names = sorted(
        {n for r in runs for n in r.client_commands},
        key=lambda n: -max(r.client_commands[n] / r.messages for r in runs),
    )
    for name in names:
        table.rows.append([name, *(_num(r.client_commands[name] / r.messages, 3) for r in runs)])
    return table


def head_of_line_table(results: Results, plan: Plan) -> Table:
    table = Table(
        f"3. Head-of-line: {OTHERS} users x 1 message, alone and behind one user's flood of "
        f"{plan.flood} (latency submit -> handler start, ms)",
        [
            "",
            "alone p50",
            "alone p99",
            "flooded p50",
            "flooded p99",
            "p99 ratio",
            "flood s",
            "flood out of order",
        ],
    )
    for r in results.head_of_line:
        if r.error:
            table.rows.append([r.name, "error", *["-"] * 6])
            table.notes.append(f"{r.name}: {r.error}")
            continue
        alone, flooded = percentile(r.alone, 99), percentile(r.flooded, 99)
        table.rows.append(
            [
                r.name,
                _ms(percentile(r.alone, 50)),
                _ms(alone),
                _ms(percentile(r.flooded, 50)),
                _ms(flooded),
                _num(flooded / alone, 2) if alone else "-",
                _num(r.flood_seconds, 2),
                f"{r.flood_out_of_order} of {len(r.flood_order)}",
            ]
        )
    table.notes += [
        f"handlers sleep {HOL_SLEEP * 1000:g} ms; the flood is submitted first, then the "
        f"{OTHERS} users one every {plan.gap * 1000:g} ms (goal: flooded p99 within 1.2x alone)",
        "flood s: from the flood's first submit to its last message handled; flood out of "
        "order: the flooding user's messages handled after a later one of theirs",
    ]
    return table


def mailbox_facts(url: str) -> list[tuple[str, str]]:
    packages = ("inturn", "redis", "hiredis", "celery", "kombu", "billiard", "python-redis-lock")
    return machine_facts(url, packages, redis_note=f" on {url} (started here)")


def build_tables(results: Results, plan: Plan) -> list[Table]:
    return [
        throughput_table(results, plan),
        ratio_table(results),
        commands_table(results),
        head_of_line_table(results, plan),
    ]


def render_text(results: Results, facts: list[tuple[str, str]], plan: Plan) -> str:
    parts = [fact_lines(facts, results.skipped)[0]]
    parts += [table.text() for table in build_tables(results, plan)]
    return "\n\n".join(parts) + "\n"


def render_markdown(results: Results, facts: list[tuple[str, str]], plan: Plan) -> str:
    parts = ["# Mailbox benchmark: inturn and Celery\n\n" + fact_lines(facts, results.skipped)[1]]
    parts += [table.markdown() for table in build_tables(results, plan)]
    return "\n\n".join(parts) + "\n"


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller run (about 35 s)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the results as markdown")
    parser.add_argument(
        "--all-variants",
        action="store_true",
        help="add throughput rows with batch=True and with id= (adds ~2 minutes to a full run)",
    )
    return parser.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # `timeout`, `kill`: run the finally blocks, stop the worker


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    plan = Plan.make(args)
    began = time.monotonic()
    server = start_redis()
    workdir = tempfile.mkdtemp(prefix="inturn-bench-")
    with cleaned_up(server, workdir=workdir):
        print(f"bench_mailbox: redis-server on {server.url}", file=sys.stderr)
        results = Results()
        for variant in (*VARIANTS, *MORE_VARIANTS) if args.all_variants else VARIANTS:
            _progress(f"throughput: {variant.name}")
            results.throughput.append(run_throughput(server.url, plan, variant))
        _progress("head-of-line: inturn mailbox")
        try:
            results.head_of_line.append(asyncio.run(run_head_of_line_mailbox(server.url, plan)))
        except Exception as exc:
            results.head_of_line.append(HeadOfLine("inturn mailbox (1 process)", error=_error(exc)))
        run_celery(server.url, plan, workdir, results)
        facts = mailbox_facts(server.url)
        facts.append(("run time", f"{time.monotonic() - began:.1f} s"))
        print(render_text(results, facts, plan))
        if args.markdown:
            Path(args.markdown).write_text(render_markdown(results, facts, plan))
            print(f"\nwrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
