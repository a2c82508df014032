"""inturn's turn against Redis lock peers, side by side, in one run on one redis-server.

    python benchmarks/bench_locks.py [--url-for-inturn URL] [--no-postgres] [--quick]
                                     [--markdown PATH]

The script starts its own `redis-server` on a free 127.0.0.1 port in a temp dir
(`tests.servers.RedisServer`), measures every lock against it, prints the tables and ratios,
and stops the server. The inturn rows use that server too unless `--url-for-inturn` names
another backend (`memory://`, say). Beside them, inturn on PostgreSQL runs against a throwaway
cluster the script starts too (`tests.servers.PostgresServer`; `--no-postgres` skips it).
Peers: redis-py's
`Lock` (asyncio and sync), python-redis-lock and pottery's `Redlock` (each skipped, with a
note, when its package is missing). Bounds: two plain SETs with the same client, two
`SELECT 1` round trips on one psycopg connection, and a local
lock (`asyncio.Lock`, `threading.Lock`, `flock`) on the same schedule.

Scenarios:
1. uncontended cycle: acquire + release of a free key, µs per cycle, the median of batches
   that are interleaved across the locks so that drift hits all of them alike;
2. contention: N contenders on one key, each looping {acquire; hold; release} for a fixed
   wall time; acquisitions/s against the hold-time bound (1/hold) and the local lock,
   wait per acquisition (ask -> body starts) p50/p99/max, the ideal FIFO wait
   (N-1) x (hold + hand-off) and p99/ideal, Jain's fairness index over per-contender counts,
   and a mutual-exclusion check of the recorded holds;
3. hand-off: two contenders ping-pong one key; time from the holder leaving its body to the
   next holder's body starting.

Async contenders are tasks on one event loop sharing one client (or gate) (again with a
longer hold, `--long-hold-ms`, 20 ms by default: closer to a bot's reply) and, in a second
contention run, processes with an event loop and a client each (against 2b's flock as the
bound); sync contenders are processes with a client each (`--sync-mode threads`: threads
sharing one client). A lock that cannot cross processes (inturn on `memory://`,
`threading.Lock`, `asyncio.Lock`) runs in threads or in one loop only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib.metadata
import itertools
import math
import multiprocessing
import os
import queue
import secrets
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, MutableSequence, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import redis.asyncio  # binds `redis` as well
from _facts import cleaned_up, fact_lines, machine_facts, percentile  # benchmarks/ is sys.path[0]
from _procs import BarrierLike, EventLike, Shared, start_redis

Role = Literal["inturn", "peer", "bound"]
Scenario = Literal["cycle", "contention", "handoff"]
Mode = Literal["async", "threads", "processes"]
Flavor = Literal["sync", "async"]
AsyncCM = Callable[[], AbstractAsyncContextManager[object]]
SyncCM = Callable[[], AbstractContextManager[object]]
Record = tuple[float, float, float, float]
"""(asked, granted, released, joined) on time.monotonic(); joined: when the request was in
the lock's line (inturn's ``turn.joined_at``), NaN for a lock that has no line."""


def joined_at(held: object) -> float:
    """When the request that got ``held`` was in line (NaN when the lock keeps no line)."""
    joined = getattr(held, "joined_at", None)
    return joined if isinstance(joined, float) else math.nan


ALL: frozenset[Scenario] = frozenset({"cycle", "contention", "handoff"})
LEASE = 30  # seconds: every lock gets a lease far longer than any hold here


# -- what to run --------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one run (`--quick` shrinks them)."""

    window: float  # seconds of contention per lock
    hold: float  # seconds each contender holds the lock
    contenders: int
    cycles: int  # uncontended cycles per batch
    batches: int  # batches per lock (plus one warm-up batch)
    handoff_rounds: int
    handoff_seconds: float  # cap per lock: a polling lock hands off ~10 times a second
    drain: float  # seconds after the window for waiters in line to get their turn
    sync_mode: Mode
    long_hold: float = 0.0  # a second one-loop contention run with this hold (0: none)

    def long_hold_plan(self) -> Plan:
        """The plan of the long-hold run: a window long enough for about 300 turns, so
        that one turn more or less moves the throughput by well under 1%."""
        return replace(self, hold=self.long_hold, window=max(self.window, 300 * self.long_hold))

    @classmethod
    def make(cls, args: argparse.Namespace) -> Plan:
        quick: bool = args.quick
        return cls(
            window=2.0 if quick else 5.0,
            hold=args.hold_ms / 1000,
            contenders=args.contenders,
            cycles=150 if quick else 300,
            batches=3 if quick else 7,
            handoff_rounds=100 if quick else 300,
            handoff_seconds=1.0 if quick else 3.0,
            drain=2.0 if quick else 5.0,
            sync_mode=args.sync_mode,
            long_hold=args.long_hold_ms / 1000,
        )


@dataclass(frozen=True)
class Target:
    """Where the locks live; picklable, handed to contender processes."""

    redis_url: str  # the peers' server (the one this script started)
    inturn_url: str
    flock_path: str
    run_id: str  # keeps this run's keys apart from anything else on the server
    postgres_dsn: str | None = None  # the PostgreSQL cluster this script started, if any

    @property
    def inturn_scheme(self) -> str:
        return urllib.parse.urlsplit(self.inturn_url).scheme


class Unavailable(Exception):
    """A contender cannot run here (a missing package, a backend not registered yet)."""


# -- contenders ---------------------------------------------------------------------------
#
# A contender opens a *session* once per process (a client, a gate); `session.lock_for(key)`
# is called once per task/thread/process that competes, and returns what builds the context
# manager for one acquisition. Peers reuse one lock object per competitor (their documented
# use); inturn builds a request per acquisition (its only API).


@dataclass
class AsyncSession:
    lock_for: Callable[[str], AsyncCM]
    aclose: Callable[[], Awaitable[object]]


@dataclass
class SyncSession:
    lock_for: Callable[[str], SyncCM]
    close: Callable[[], object]


@dataclass(frozen=True)
class AsyncContender:
    name: str
    role: Role
    scenarios: frozenset[Scenario]
    open: Callable[[Target], Awaitable[AsyncSession]]
    cross_process: Callable[[Target], bool] = lambda target: True


@dataclass(frozen=True)
class SyncContender:
    name: str
    role: Role
    scenarios: frozenset[Scenario]
    open: Callable[[Target], SyncSession]
    cross_process: Callable[[Target], bool] = lambda target: True


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"{package} is not installed (pip install {package})") from exc


def _inturn_gate(target: Target) -> Any:
    import inturn

    try:
        return inturn.Gate.from_url(target.inturn_url, namespace="bench")
    except inturn.ConfigurationError as exc:
        raise Unavailable(
            f"inturn.Gate.from_url({target.inturn_url!r}) raised ConfigurationError: {exc} "
            "(backend not registered yet? try --url-for-inturn memory://)"
        ) from exc


def _postgres_dsn(target: Target) -> str:
    if target.postgres_dsn is None:
        raise Unavailable("no PostgreSQL for this run (--no-postgres, or it did not start)")
    return target.postgres_dsn


def _inturn_postgres_gate(target: Target) -> Any:
    import inturn

    return inturn.Gate.from_url(_postgres_dsn(target), namespace="bench")


def _static(lock: Any) -> Callable[[], Any]:
    return lambda: lock


class _AsyncTwoSets:
    """The floor of any Redis lock: two round trips on the same client, no logic."""

    def __init__(self, client: redis.asyncio.Redis, name: str) -> None:
        self._client, self._name = client, name

    async def __aenter__(self) -> None:
        await self._client.set(self._name, b"1")

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.set(self._name, b"0")


class _SyncTwoSets:
    def __init__(self, client: redis.Redis, name: str) -> None:
        self._client, self._name = client, name

    def __enter__(self) -> None:
        self._client.set(self._name, b"1")

    def __exit__(self, *exc_info: object) -> None:
        self._client.set(self._name, b"0")


class _AsyncTwoSelects:
    """The floor of a PostgreSQL turn: two round trips on one autocommit connection."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def __aenter__(self) -> None:
        await self._conn.execute("SELECT 1")

    async def __aexit__(self, *exc_info: object) -> None:
        await self._conn.execute("SELECT 1")


class _SyncTwoSelects:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("SELECT 1")

    def __exit__(self, *exc_info: object) -> None:
        self._conn.execute("SELECT 1")


class _Flock:
    """An exclusive `flock` on its own file description: a kernel lock across processes."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


async def _open_inturn_async(target: Target) -> AsyncSession:
    gate = _inturn_gate(target)
    return AsyncSession(lambda key: lambda: gate.turn(key), gate.aclose)


async def _open_inturn_postgres_async(target: Target) -> AsyncSession:
    gate = _inturn_postgres_gate(target)
    return AsyncSession(lambda key: lambda: gate.turn(key), gate.aclose)


async def _open_two_selects_async(target: Target) -> AsyncSession:
    psycopg = _import("psycopg", "psycopg")
    conn = await psycopg.AsyncConnection.connect(_postgres_dsn(target), autocommit=True)
    return AsyncSession(lambda key: _static(_AsyncTwoSelects(conn)), conn.close)


async def _open_redis_py_async(target: Target) -> AsyncSession:
    client = redis.asyncio.Redis.from_url(target.redis_url)
    # `sleep=0.1` (the default) is how often a blocked acquire polls: part of what is measured.
    return AsyncSession(
        lambda key: _static(client.lock(f"bench:redis-py-async:{key}", timeout=LEASE)),
        client.aclose,
    )


async def _open_pottery_async(target: Target) -> AsyncSession:
    pottery = _import("pottery", "pottery")
    client = redis.asyncio.Redis.from_url(target.redis_url)

    def lock_for(key: str) -> AsyncCM:
        return _static(
            pottery.AIORedlock(
                key=f"bench:pottery-async:{key}", masters={client}, auto_release_time=LEASE
            )
        )

    return AsyncSession(lock_for, client.aclose)


async def _open_two_sets_async(target: Target) -> AsyncSession:
    client = redis.asyncio.Redis.from_url(target.redis_url)
    return AsyncSession(
        lambda key: _static(_AsyncTwoSets(client, f"bench:set-async:{key}")), client.aclose
    )


async def _open_asyncio_lock(target: Target) -> AsyncSession:
    locks: dict[str, asyncio.Lock] = {}

    async def aclose() -> None:
        locks.clear()

    return AsyncSession(lambda key: _static(locks.setdefault(key, asyncio.Lock())), aclose)


def _open_inturn_sync(target: Target) -> SyncSession:
    gate = _inturn_gate(target)
    return SyncSession(lambda key: lambda: gate.turn_sync(key), gate.close)


def _open_inturn_postgres_sync(target: Target) -> SyncSession:
    gate = _inturn_postgres_gate(target)
    return SyncSession(lambda key: lambda: gate.turn_sync(key), gate.close)


def _open_two_selects_sync(target: Target) -> SyncSession:
    psycopg = _import("psycopg", "psycopg")
    conn = psycopg.Connection.connect(_postgres_dsn(target), autocommit=True)
    return SyncSession(lambda key: _static(_SyncTwoSelects(conn)), conn.close)


def _open_redis_py_sync(target: Target) -> SyncSession:
    client = redis.Redis.from_url(target.redis_url)
    return SyncSession(
        lambda key: _static(client.lock(f"bench:redis-py:{key}", timeout=LEASE)), client.close
    )


def _open_redis_lock(target: Target) -> SyncSession:
    redis_lock = _import("redis_lock", "python-redis-lock")
    client = redis.Redis.from_url(target.redis_url)
    return SyncSession(
        lambda key: _static(redis_lock.Lock(client, f"bench:redis-lock:{key}", expire=LEASE)),
        client.close,
    )


def _open_pottery_sync(target: Target) -> SyncSession:
    pottery = _import("pottery", "pottery")
    client = redis.Redis.from_url(target.redis_url)

    def lock_for(key: str) -> SyncCM:
        return _static(
            pottery.Redlock(key=f"bench:pottery:{key}", masters={client}, auto_release_time=LEASE)
        )

    return SyncSession(lock_for, client.close)


def _open_two_sets_sync(target: Target) -> SyncSession:
    client = redis.Redis.from_url(target.redis_url)
    return SyncSession(lambda key: _static(_SyncTwoSets(client, f"bench:set:{key}")), client.close)


def _open_threading_lock(target: Target) -> SyncSession:
    locks: dict[str, threading.Lock] = {}
    return SyncSession(lambda key: _static(locks.setdefault(key, threading.Lock())), locks.clear)


def _open_flock(target: Target) -> SyncSession:
    opened: list[_Flock] = []

    def lock_for(key: str) -> SyncCM:
        lock = _Flock(f"{target.flock_path}.{key}")
        opened.append(lock)
        return _static(lock)

    def close() -> None:
        for lock in opened:
            lock.close()

    return SyncSession(lock_for, close)


# inturn on PostgreSQL, beside inturn on `--url-for-inturn`; the suffix names its backend.
PG_ASYNC = "inturn turn [postgresql]"
PG_SYNC = "inturn turn_sync [postgresql]"
POSTGRES_ROWS = frozenset({PG_ASYNC, PG_SYNC, "2 x SELECT 1 (bound)"})

ASYNC_CONTENDERS: tuple[AsyncContender, ...] = (
    AsyncContender(
        "inturn turn",
        "inturn",
        ALL,
        _open_inturn_async,
        cross_process=lambda target: target.inturn_scheme != "memory",
    ),
    AsyncContender(PG_ASYNC, "inturn", ALL, _open_inturn_postgres_async),
    AsyncContender("redis-py asyncio Lock", "peer", ALL, _open_redis_py_async),
    AsyncContender("pottery AIORedlock", "peer", ALL, _open_pottery_async),
    AsyncContender("2 x SET (bound)", "bound", frozenset({"cycle"}), _open_two_sets_async),
    AsyncContender("2 x SELECT 1 (bound)", "bound", frozenset({"cycle"}), _open_two_selects_async),
    AsyncContender("asyncio.Lock (bound)", "bound", ALL, _open_asyncio_lock, lambda target: False),
)

ASYNC_BY_NAME = {contender.name: contender for contender in ASYNC_CONTENDERS}

SYNC_CONTENDERS: tuple[SyncContender, ...] = (
    SyncContender(
        "inturn turn_sync",
        "inturn",
        ALL,
        _open_inturn_sync,
        cross_process=lambda target: target.inturn_scheme != "memory",
    ),
    SyncContender(PG_SYNC, "inturn", ALL, _open_inturn_postgres_sync),
    SyncContender("redis-py Lock", "peer", ALL, _open_redis_py_sync),
    SyncContender("python-redis-lock", "peer", ALL, _open_redis_lock),
    SyncContender("pottery Redlock", "peer", ALL, _open_pottery_sync),
    SyncContender("2 x SET (bound)", "bound", frozenset({"cycle"}), _open_two_sets_sync),
    SyncContender("2 x SELECT 1 (bound)", "bound", frozenset({"cycle"}), _open_two_selects_sync),
    SyncContender(
        "threading.Lock (bound)", "bound", ALL, _open_threading_lock, lambda target: False
    ),
    SyncContender("flock (bound)", "bound", frozenset({"contention"}), _open_flock),
)

SYNC_BY_NAME = {contender.name: contender for contender in SYNC_CONTENDERS}


def display_name(name: str, role: Role, target: Target) -> str:
    if role == "inturn" and not name.endswith("]"):
        return f"{name} [{target.inturn_scheme}]"
    return name


# -- statistics ---------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def jain(counts: Sequence[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 is perfectly even, 1/n is one winner."""
    squares = sum(x * x for x in counts)
    return sum(counts) ** 2 / (len(counts) * squares) if squares else math.nan


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# -- results ------------------------------------------------------------------------------


@dataclass
class CycleResult:
    name: str
    role: Role
    batches_us: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def us(self) -> float:
        return median(self.batches_us)


@dataclass
class ContentionRun:
    name: str
    role: Role
    mode: Mode
    records: list[list[Record]]  # per contender
    censored: list[float]  # waits still open when the drain time ran out
    started: float  # on time.monotonic(); the window is [started, started + plan.window)
    plan: Plan
    errors: list[str] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        """The most telling error: a contender's own, not a barrier broken because of it."""
        ranked = sorted(self.errors, key=lambda e: e.startswith("BrokenBarrierError"))
        return ranked[0] if ranked else None


@dataclass(frozen=True)
class ContentionStats:
    name: str
    role: Role
    mode: Mode
    acquisitions: int
    per_second: float
    wait_p50: float
    wait_p99: float
    wait_max: float
    hold: float  # mean measured hold
    handoff: float  # mean gap between one release and the next grant
    ideal_wait: float  # (N-1) x (hold + handoff)
    jain: float
    overlaps: int
    censored: int
    error: str | None

    @classmethod
    def of(cls, run: ContentionRun) -> ContentionStats:
        n = len(run.records)
        flat = sorted((r for per in run.records for r in per), key=lambda r: r[1])
        window = run.plan.window
        deadline = run.started + window
        counts = [sum(1 for r in per if r[1] < deadline) for per in run.records]
        waits = [r[1] - r[0] for r in flat] + run.censored
        holds = [r[2] - r[1] for r in flat]
        gaps = [b[1] - a[2] for a, b in itertools.pairwise(flat)]
        handoff = mean([gap for gap in gaps if gap >= 0])
        overlaps, released = 0, -math.inf
        for _, granted, release, _ in flat:
            overlaps += granted < released
            released = max(released, release)
        return cls(
            name=run.name,
            role=run.role,
            mode=run.mode,
            acquisitions=sum(counts),
            per_second=sum(counts) / window,
            wait_p50=percentile(waits, 50),
            wait_p99=percentile(waits, 99),
            wait_max=max(waits, default=math.nan),
            hold=mean(holds),
            handoff=handoff,
            ideal_wait=(n - 1) * (mean(holds) + handoff),
            jain=jain(counts) if sum(counts) else math.nan,
            overlaps=overlaps,
            censored=len(run.censored),
            error=run.error,
        )


@dataclass(frozen=True)
class HandoffResult:
    name: str
    role: Role
    mode: Mode
    samples: list[float]
    error: str | None = None


# -- scenario 1: uncontended cycle --------------------------------------------------------


async def _cycles_async(make: AsyncCM, cycles: int) -> float:
    start = time.perf_counter()
    for _ in range(cycles):
        async with make():
            pass
    return (time.perf_counter() - start) / cycles * 1e6


def _cycles_sync(make: SyncCM, cycles: int) -> float:
    start = time.perf_counter()
    for _ in range(cycles):
        with make():
            pass
    return (time.perf_counter() - start) / cycles * 1e6


async def run_cycles_async(
    contenders: Sequence[AsyncContender], target: Target, plan: Plan
) -> list[CycleResult]:
    sessions = [await c.open(target) for c in contenders]
    try:
        makers = [s.lock_for(f"cycle-{target.run_id}") for s in sessions]
        results = [CycleResult(c.name, c.role) for c in contenders]
        for batch in range(plan.batches + 1):  # batch 0 warms connections and scripts up
            for make, result in zip(makers, results, strict=True):
                if result.error is None:
                    try:
                        us = await _cycles_async(make, plan.cycles)
                    except Exception as exc:
                        result.error = _error(exc)
                    else:
                        if batch:
                            result.batches_us.append(us)
        return results
    finally:
        for session in sessions:
            await session.aclose()


def run_cycles_sync(
    contenders: Sequence[SyncContender], target: Target, plan: Plan
) -> list[CycleResult]:
    sessions = [c.open(target) for c in contenders]
    try:
        makers = [s.lock_for(f"cycle-{target.run_id}") for s in sessions]
        results = [CycleResult(c.name, c.role) for c in contenders]
        for batch in range(plan.batches + 1):
            for make, result in zip(makers, results, strict=True):
                if result.error is None:
                    try:
                        us = _cycles_sync(make, plan.cycles)
                    except Exception as exc:
                        result.error = _error(exc)
                    else:
                        if batch:
                            result.batches_us.append(us)
        return results
    finally:
        for session in sessions:
            session.close()


# -- scenario 2: contention ---------------------------------------------------------------


async def _contend_async(
    make: AsyncCM, deadline: float, hold: float, asking: MutableSequence[float], index: int
) -> list[Record]:
    records: list[Record] = []
    while (asked := time.monotonic()) < deadline:
        asking[index] = asked
        async with make() as held:
            granted = time.monotonic()
            asking[index] = 0.0
            await asyncio.sleep(hold)
            released = time.monotonic()
        records.append((asked, granted, released, joined_at(held)))
    return records


def _censored(asking: Sequence[float], stuck: Sequence[int], now: float) -> list[float]:
    """The waits of contenders still in line when the drain time ran out, counted until now."""
    return [now - asking[i] for i in stuck if asking[i]]


async def run_contention_async(
    contender: AsyncContender, target: Target, plan: Plan
) -> ContentionRun:
    n = plan.contenders
    session = await contender.open(target)
    key = f"contention-{target.run_id}"
    try:
        makers = [session.lock_for(key) for _ in range(n)]
        asking = [0.0] * n
        started = time.monotonic()
        deadline = started + plan.window
        tasks = [
            asyncio.create_task(_contend_async(make, deadline, plan.hold, asking, i))
            for i, make in enumerate(makers)
        ]
        # Whoever is in line at the deadline still gets (and records) its turn, so a starved
        # waiter shows in the wait figures; one still waiting after the drain time is censored.
        done, pending = await asyncio.wait(tasks, timeout=plan.window + plan.drain)
        stuck = [i for i, task in enumerate(tasks) if task in pending]
        censored = _censored(asking, stuck, time.monotonic())
        for task in pending:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        records = [out if isinstance(out, list) else [] for out in outcomes]
        errors = [
            _error(out)
            for task, out in zip(tasks, outcomes, strict=True)
            if task in done and isinstance(out, BaseException)
        ]
        return ContentionRun(
            contender.name, contender.role, "async", records, censored, started, plan, errors
        )
    finally:
        await session.aclose()


@dataclass
class _Box:
    value: float = 0.0


@dataclass(frozen=True)
class _Start:
    """Lines the contenders up: all ready (barrier), then all go at `at` on the shared clock.

    `time.monotonic()` is one clock for every process on Linux (CLOCK_MONOTONIC), so start
    times, deadlines and records compare across processes.
    """

    barrier: BarrierLike
    go: EventLike
    at: Shared

    def release(self) -> float:
        self.barrier.wait(timeout=60)
        self.at.value = time.monotonic() + 0.05  # every contender is awake before the start
        self.go.set()
        return self.at.value

    def wait(self) -> float:
        self.barrier.wait(timeout=60)
        self.go.wait(timeout=60)
        time.sleep(max(0.0, self.at.value - time.monotonic()))
        return self.at.value


def _contend_sync(
    make: SyncCM,
    plan: Plan,
    start: _Start,
    asking: MutableSequence[float],
    index: int,
) -> list[Record]:
    try:
        deadline = start.wait() + plan.window
        records: list[Record] = []
        while (asked := time.monotonic()) < deadline:
            asking[index] = asked
            with make() as held:
                granted = time.monotonic()
                asking[index] = 0.0
                time.sleep(plan.hold)
                released = time.monotonic()
            records.append((asked, granted, released, joined_at(held)))
        return records
    except BaseException:
        start.barrier.abort()  # nobody waits 60 s for a contender that is gone
        raise


def _contender_process(
    name: str,
    flavor: Flavor,
    target: Target,
    key: str,
    plan: Plan,
    start: _Start,
    asking: MutableSequence[float],
    index: int,
    results: Any,
) -> None:
    """One contender in its own process, with its own client (or gate); an "async" one
    runs in its own event loop. Before the start it takes and releases a key of its own
    once, so that connecting (and, for inturn, subscribing) is not timed as waiting."""
    try:
        if flavor == "async":
            records = asyncio.run(
                _contend_in_own_loop(name, target, key, plan, start, asking, index)
            )
        else:
            try:
                session = SYNC_BY_NAME[name].open(target)
                with session.lock_for(f"{key}-warm-{index}")():
                    pass
            except BaseException:
                start.barrier.abort()
                raise
            try:
                records = _contend_sync(session.lock_for(key), plan, start, asking, index)
            finally:
                session.close()
        results.put((index, records, None))
    except BaseException as exc:
        results.put((index, [], _error(exc)))


async def _contend_in_own_loop(
    name: str,
    target: Target,
    key: str,
    plan: Plan,
    start: _Start,
    asking: MutableSequence[float],
    index: int,
) -> list[Record]:
    try:
        session = await ASYNC_BY_NAME[name].open(target)
    except BaseException:
        start.barrier.abort()
        raise
    try:
        try:
            async with session.lock_for(f"{key}-warm-{index}")():
                pass
            deadline = start.wait() + plan.window  # blocks this loop: nothing else runs yet
        except BaseException:
            start.barrier.abort()
            raise
        return await _contend_async(session.lock_for(key), deadline, plan.hold, asking, index)
    finally:
        await session.aclose()


def run_contention_sync(contender: SyncContender, target: Target, plan: Plan) -> ContentionRun:
    mode: Mode = plan.sync_mode if contender.cross_process(target) else "threads"
    key = f"contention-{target.run_id}"
    if mode == "processes":
        return _contention_processes(contender.name, contender.role, "sync", target, plan, key)
    n = plan.contenders
    session = contender.open(target)
    try:
        start = _Start(threading.Barrier(n + 1), threading.Event(), _Box())
        asking = [0.0] * n
        records: list[list[Record]] = [[] for _ in range(n)]
        errors: list[str] = []

        def run(index: int, make: SyncCM) -> None:
            try:
                records[index] = _contend_sync(make, plan, start, asking, index)
            except BaseException as exc:
                errors.append(_error(exc))

        threads = [
            threading.Thread(target=run, args=(i, session.lock_for(key)), daemon=True)
            for i in range(n)
        ]
        for thread in threads:
            thread.start()
        started = start.release()
        end = started + plan.window + plan.drain
        for thread in threads:
            thread.join(timeout=max(0.0, end - time.monotonic()))
        # A thread cannot be stopped: one still waiting is censored and left to finish alone.
        stuck = [i for i, thread in enumerate(threads) if thread.is_alive()]
        censored = _censored(asking, stuck, time.monotonic())
        return ContentionRun(
            contender.name, contender.role, mode, records, censored, started, plan, errors
        )
    finally:
        session.close()


def _process_context() -> Any:
    """Contender processes fork from a clean single-threaded server that has the drivers loaded.

    Forking this process (threads, sockets, an event loop's leftovers) is unsafe, and a plain
    spawn costs seconds per run here: 8 interpreters importing redis at once on few cores.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["redis", "redis.asyncio", "redis_lock", "pottery", "psycopg", "psycopg_pool", "inturn"]
    )
    return ctx


def _contention_processes(
    name: str, role: Role, flavor: Flavor, target: Target, plan: Plan, key: str
) -> ContentionRun:
    n = plan.contenders
    ctx = _process_context()
    start = _Start(ctx.Barrier(n + 1), ctx.Event(), ctx.Value("d", 0.0))
    asking = ctx.Array("d", n)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_contender_process,
            args=(name, flavor, target, key, plan, start, asking, i, results),
            daemon=True,
        )
        for i in range(n)
    ]
    for proc in procs:
        proc.start()
    records: list[list[Record]] = [[] for _ in range(n)]
    errors: list[str] = []
    censored: list[float] = []
    started = math.nan
    try:
        try:
            started = start.release()
            end = started + plan.window + plan.drain
        except threading.BrokenBarrierError:
            end = time.monotonic() + 5  # a contender failed to start: collect the reasons
        received: set[int] = set()
        while len(received) < n:
            try:
                index, recs, error = results.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:  # the drain time ran out
                break
            received.add(index)
            records[index] = recs
            if error:
                errors.append(error)
        stuck = [i for i in range(n) if i not in received]
        censored = _censored(asking, stuck, time.monotonic())
    finally:
        for proc in procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return ContentionRun(name, role, "processes", records, censored, started, plan, errors)


# -- scenario 3: hand-off -----------------------------------------------------------------


@dataclass
class _Relay:
    """Two players pass one key back and forth; samples are release -> next body start."""

    rounds: int
    deadline: float
    samples: list[float] = field(default_factory=list)
    last_releaser: int | None = None
    released_at: float = 0.0

    @property
    def done(self) -> bool:
        return len(self.samples) >= self.rounds or time.monotonic() >= self.deadline

    def body_starts(self, me: int) -> None:
        now = time.monotonic()
        if self.last_releaser == 1 - me:
            self.samples.append(now - self.released_at)
        self.last_releaser = None

    def leaving(self, me: int) -> None:
        self.last_releaser, self.released_at = me, time.monotonic()


async def run_handoff_async(contender: AsyncContender, target: Target, plan: Plan) -> HandoffResult:
    session = await contender.open(target)
    try:
        key = f"handoff-{target.run_id}"
        makers = [session.lock_for(key), session.lock_for(key)]
        relay = _Relay(plan.handoff_rounds, time.monotonic() + plan.handoff_seconds)
        started = [asyncio.Event(), asyncio.Event()]

        async def player(me: int) -> None:
            other = 1 - me
            try:
                while not relay.done:
                    async with makers[me]():
                        relay.body_starts(me)
                        started[me].set()
                        await asyncio.sleep(plan.hold)  # the other player joins the line
                        relay.leaving(me)
                    # Ask again only once the other player has the turn, so that every grant
                    # is a hand-off (a lock that lets the releaser barge would never hand off).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await started[other].wait()
                    started[other].clear()
            finally:
                started[me].set()

        error = None
        try:
            async with asyncio.timeout(plan.handoff_seconds + plan.drain):
                await asyncio.gather(player(0), player(1))
        except TimeoutError:
            error = f"stalled: a player still waited {plan.drain:g} s after the time was up"
        return HandoffResult(contender.name, contender.role, "async", relay.samples, error)
    finally:
        await session.aclose()


def run_handoff_sync(contender: SyncContender, target: Target, plan: Plan) -> HandoffResult:
    session = contender.open(target)
    try:
        key = f"handoff-{target.run_id}"
        makers = [session.lock_for(key), session.lock_for(key)]
        relay = _Relay(plan.handoff_rounds, time.monotonic() + plan.handoff_seconds)
        started = [threading.Event(), threading.Event()]
        errors: list[str] = []

        def player(me: int) -> None:
            other = 1 - me
            try:
                while not relay.done:
                    with makers[me]():
                        relay.body_starts(me)
                        started[me].set()
                        time.sleep(plan.hold)
                        relay.leaving(me)
                    started[other].wait(timeout=1.0)
                    started[other].clear()
            except BaseException as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                started[me].set()

        threads = [threading.Thread(target=player, args=(me,), daemon=True) for me in (0, 1)]
        for thread in threads:
            thread.start()
        end = time.monotonic() + plan.handoff_seconds + plan.drain
        for thread in threads:
            thread.join(timeout=max(0.0, end - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            errors.append(f"stalled: a player still waited {plan.drain:g} s after the time was up")
        error = errors[0] if errors else None
        return HandoffResult(contender.name, contender.role, "threads", relay.samples, error)
    finally:
        session.close()


# -- running it all -----------------------------------------------------------------------


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _failed_run(name: str, role: Role, mode: Mode, plan: Plan, exc: BaseException) -> ContentionRun:
    return ContentionRun(name, role, mode, [], [], math.nan, plan, [_error(exc)])


@dataclass
class Results:
    cycles_async: list[CycleResult] = field(default_factory=list)
    cycles_sync: list[CycleResult] = field(default_factory=list)
    contention_async: list[ContentionStats] = field(default_factory=list)
    contention_async_long: list[ContentionStats] = field(default_factory=list)
    """The one-loop contention again, with the long hold (``Plan.long_hold``)."""
    contention_sync: list[ContentionStats] = field(default_factory=list)
    contention_async_processes: list[ContentionStats] = field(default_factory=list)
    async_contenders: list[str] = field(default_factory=list)
    """The async contenders that passed their probe (run_async_part)."""
    handoff: list[HandoffResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


_BEGAN = time.monotonic()


def _progress(message: str) -> None:
    print(f"  {time.monotonic() - _BEGAN:6.1f} s  {message}", file=sys.stderr, flush=True)


async def _probe_async(contender: AsyncContender, target: Target) -> str | None:
    """None if one cycle works, else why the contender is skipped."""
    try:
        session = await contender.open(target)
        try:
            async with session.lock_for(f"probe-{target.run_id}")():
                pass
        finally:
            await session.aclose()
    except Exception as exc:
        return str(exc) if isinstance(exc, Unavailable) else f"failed its probe: {_error(exc)}"
    return None


def _probe_sync(contender: SyncContender, target: Target) -> str | None:
    try:
        session = contender.open(target)
        try:
            with session.lock_for(f"probe-{target.run_id}")():
                pass
        finally:
            session.close()
    except Exception as exc:
        return str(exc) if isinstance(exc, Unavailable) else f"failed its probe: {_error(exc)}"
    return None


async def run_async_part(target: Target, plan: Plan, results: Results) -> None:
    contenders = []
    for contender in ASYNC_CONTENDERS:
        if contender.name in POSTGRES_ROWS and target.postgres_dsn is None:
            continue  # main() notes why, once
        reason = await _probe_async(contender, target)
        if reason is None:
            contenders.append(contender)
        else:
            results.skipped.append(f"{contender.name} (async): {reason}")

    def having(scenario: Scenario) -> list[AsyncContender]:
        return [c for c in contenders if scenario in c.scenarios]

    results.async_contenders = [c.name for c in contenders]
    _progress("async: uncontended cycles")
    results.cycles_async = await run_cycles_async(having("cycle"), target, plan)
    plans = [(plan, results.contention_async)]
    if plan.long_hold:
        plans.append((plan.long_hold_plan(), results.contention_async_long))
    for each, into in plans:
        for contender in having("contention"):
            _progress(f"async: contention, {contender.name}, hold {each.hold * 1000:g} ms")
            try:
                run = await run_contention_async(contender, target, each)
            except Exception as exc:
                run = _failed_run(contender.name, contender.role, "async", each, exc)
            into.append(ContentionStats.of(run))
    for contender in having("handoff"):
        _progress(f"async: hand-off, {contender.name}")
        try:
            results.handoff.append(await run_handoff_async(contender, target, plan))
        except Exception as exc:
            results.handoff.append(
                HandoffResult(contender.name, contender.role, "async", [], _error(exc))
            )


def run_sync_part(target: Target, plan: Plan, results: Results) -> None:
    contenders = []
    for contender in SYNC_CONTENDERS:
        if contender.name in POSTGRES_ROWS and target.postgres_dsn is None:
            continue
        reason = _probe_sync(contender, target)
        if reason is None:
            contenders.append(contender)
        else:
            results.skipped.append(f"{contender.name} (sync): {reason}")

    def having(scenario: Scenario) -> list[SyncContender]:
        return [c for c in contenders if scenario in c.scenarios]

    _progress("sync: uncontended cycles")
    results.cycles_sync = run_cycles_sync(having("cycle"), target, plan)
    for contender in having("contention"):
        _progress(f"sync: contention, {contender.name}")
        try:
            run = run_contention_sync(contender, target, plan)
        except Exception as exc:
            run = _failed_run(contender.name, contender.role, plan.sync_mode, plan, exc)
        results.contention_sync.append(ContentionStats.of(run))
    for contender in having("handoff"):
        _progress(f"sync: hand-off, {contender.name}")
        try:
            results.handoff.append(run_handoff_sync(contender, target, plan))
        except Exception as exc:
            results.handoff.append(
                HandoffResult(contender.name, contender.role, "threads", [], _error(exc))
            )


def run_async_processes_part(target: Target, plan: Plan, results: Results) -> None:
    """Contention with one contender per process, each in its own event loop (a bot's
    worker processes): the async locks that work across processes."""
    for name in results.async_contenders:
        contender = ASYNC_BY_NAME[name]
        if "contention" not in contender.scenarios or not contender.cross_process(target):
            continue
        _progress(f"async processes: contention, {name}")
        key = f"contention-{target.run_id}"
        try:
            run = _contention_processes(name, contender.role, "async", target, plan, key)
        except Exception as exc:
            run = _failed_run(name, contender.role, "processes", plan, exc)
        results.contention_async_processes.append(ContentionStats.of(run))


# -- reporting ----------------------------------------------------------------------------


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        widths = [
            max(len(cell) for cell in column)
            for column in zip(self.columns, *self.rows, strict=True)
        ]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
            return "  ".join([first, *rest]).rstrip()

        out = [self.title, line(self.columns), line(["-" * w for w in widths])]
        out += [line(row) for row in self.rows]
        out += [f"  {note}" for note in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"### {self.title}", ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(self.columns) - 1)) + "|")
        out += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {note}" for note in self.notes]
        return "\n".join(out)


def _f(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _ms(seconds: float) -> str:
    return _f(seconds * 1000, 2 if seconds < 0.01 else 1)


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"x{value:.2f}"


def cycle_table(title: str, results: Sequence[CycleResult], target: Target) -> Table:
    table = Table(title, ["lock", "us/cycle", "min", "max", "cycles/s", "inturn speed-up"])
    failed = [r for r in results if r.error]
    results = [r for r in results if not r.error]
    inturn = next((r for r in results if r.role == "inturn"), None)
    for r in results:
        speedup = r.us / inturn.us if inturn else math.nan
        table.rows.append(
            [
                display_name(r.name, r.role, target),
                _f(r.us),
                _f(min(r.batches_us)),
                _f(max(r.batches_us)),
                _f(1e6 / r.us, 0),
                _ratio(speedup),
            ]
        )
    if inturn is not None:
        for r in results:
            if r.role == "peer":
                table.notes.append(
                    f"inturn vs {r.name}: throughput ratio {_ratio(r.us / inturn.us)} "
                    f"({'inturn faster' if r.us > inturn.us else 'inturn slower'})"
                )
        for r in results:
            if r.name.startswith("2 x SET"):
                table.notes.append(
                    f"inturn vs the two-SET bound: throughput ratio {_ratio(r.us / inturn.us)} "
                    f"(inturn costs {inturn.us / r.us:.2f} x two plain round trips)"
                )
    postgres = next((r for r in results if r.role == "inturn" and r.name in POSTGRES_ROWS), None)
    if postgres is not None:
        if inturn is not None and inturn is not postgres:
            table.notes.append(
                f"inturn on PostgreSQL costs {postgres.us / inturn.us:.2f} x inturn on "
                f"{target.inturn_scheme} per cycle"
            )
        for r in results:
            if r.name.startswith("2 x SELECT 1"):
                table.notes.append(
                    f"inturn on PostgreSQL vs the two-SELECT bound: it costs "
                    f"{postgres.us / r.us:.2f} x two plain round trips (one transaction: lock, "
                    "fence, COMMIT)"
                )
    table.notes.append("inturn speed-up = row's us/cycle / inturn's us/cycle (>1: inturn faster)")
    for r in failed:
        table.rows.append([display_name(r.name, r.role, target), "error", *["-"] * 4])
        table.notes.append(f"{display_name(r.name, r.role, target)}: {r.error}")
    return table


def contention_table(
    title: str, stats: Sequence[ContentionStats], target: Target, plan: Plan
) -> Table:
    table = Table(
        title,
        [
            "lock",
            "mode",
            "acq/s",
            "% 1/hold",
            "% local",
            "wait p50",
            "p99",
            "max",
            "ideal",
            "p99/ideal",
            "Jain",
            "hold",
            "hand-off",
            "overlaps",
        ],
    )
    bound = 1 / plan.hold
    local: dict[Mode, float] = {}  # the practical bound: the fastest local lock of each mode
    for s in stats:
        if s.role == "bound" and not s.error:
            local[s.mode] = max(local.get(s.mode, 0.0), s.per_second)
    fallback = max(local.values(), default=math.nan)
    for s in stats:
        name = display_name(s.name, s.role, target)
        if s.error and not s.acquisitions:
            table.rows.append([name, s.mode, "error", *["-"] * 11])
            table.notes.append(f"{name}: {s.error}")
            continue
        practical = local.get(s.mode, fallback)
        censored = f" (+{s.censored} censored)" if s.censored else ""
        table.rows.append(
            [
                name,
                s.mode,
                _f(s.per_second),
                _f(100 * s.per_second / bound),
                _f(100 * s.per_second / practical),
                _ms(s.wait_p50),
                _ms(s.wait_p99),
                _ms(s.wait_max) + censored,
                _ms(s.ideal_wait),
                _f(s.wait_p99 / s.ideal_wait, 2),
                _f(s.jain, 3),
                _ms(s.hold),
                _ms(s.handoff),
                str(s.overlaps),
            ]
        )
        if s.error:
            table.notes.append(f"{name}: {s.error}")
    n = plan.contenders
    table.notes += [
        f"{n} contenders on one key, each looping {{acquire; hold {plan.hold * 1000:g} ms; "
        f"release}} for {plan.window:g} s; bound 1/hold = {bound:g} acquisitions/s",
        "% local: against the fastest local lock of the same mode (the practical bound)",
        "wait = ask -> body starts (ms), over every acquisition asked before the window closed; "
        "censored = still waiting when the drain time ran out (counted at that wait)",
        f"ideal = FIFO wait {n - 1} x (hold + hand-off) with this lock's own measured hold and "
        f"hand-off (ms); {n - 1} x hold = {(n - 1) * plan.hold * 1000:g} ms",
        "Jain = (sum x)^2 / (n sum x^2) over per-contender acquisitions in the window "
        f"(1 = even, {1 / n:.3f} = one contender got everything)",
        "overlaps = recorded holds that overlapped another (mutual exclusion broken)",
    ]
    return table


def handoff_table(results: Sequence[HandoffResult], target: Target, plan: Plan) -> Table:
    table = Table(
        "3. Hand-off: holder leaves its body -> next holder's body starts (2 contenders, ms)",
        ["lock", "mode", "hand-offs", "p50", "p99", "max"],
    )
    for r in results:
        name = display_name(r.name, r.role, target)
        if r.error and not r.samples:
            table.rows.append([name, r.mode, "error", "-", "-", "-"])
            table.notes.append(f"{name}: {r.error}")
            continue
        table.rows.append(
            [
                name,
                r.mode,
                str(len(r.samples)),
                _ms(percentile(r.samples, 50)),
                _ms(percentile(r.samples, 99)),
                _ms(max(r.samples, default=math.nan)),
            ]
        )
    table.notes.append(
        f"each holds {plan.hold * 1000:g} ms and asks again only once the other has the turn; "
        f"at most {plan.handoff_rounds} hand-offs or {plan.handoff_seconds:g} s per lock"
    )
    return table


def _postgres_fact(target: Target) -> str:
    if target.postgres_dsn is None:
        return "not used"
    import psycopg

    with psycopg.connect(target.postgres_dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    version = row[0] if row else "?"
    return f"{version} on {target.postgres_dsn} (started here; fsync=off, synchronous_commit=off)"


def lock_facts(target: Target) -> list[tuple[str, str]]:
    packages = (
        "inturn",
        "redis",
        "hiredis",
        "python-redis-lock",
        "pottery",
        "psycopg",
        "psycopg-pool",
    )
    facts = machine_facts(
        target.redis_url, packages, redis_note=f" on {target.redis_url} (started here)"
    )
    facts[-1:-1] = [("inturn backend", target.inturn_url), ("postgresql", _postgres_fact(target))]
    return facts


def build_tables(results: Results, target: Target, plan: Plan) -> list[Table]:
    return [
        cycle_table(
            "1a. Uncontended acquire + release, async (us per cycle)", results.cycles_async, target
        ),
        cycle_table(
            "1b. Uncontended acquire + release, sync (us per cycle)", results.cycles_sync, target
        ),
        contention_table(
            "2a. Contention, async: tasks on one event loop, one shared client (times in ms)",
            results.contention_async,
            target,
            plan,
        ),
        *(
            [
                contention_table(
                    f"2a, long hold. Contention, async: tasks on one event loop, one shared "
                    f"client, hold {plan.long_hold * 1000:g} ms (times in ms)",
                    results.contention_async_long,
                    target,
                    plan.long_hold_plan(),
                )
            ]
            if results.contention_async_long
            else []
        ),
        contention_table(
            f"2b. Contention, sync: {plan.sync_mode}"
            + (" with a client each" if plan.sync_mode == "processes" else ", one shared client")
            + " (times in ms)",
            results.contention_sync,
            target,
            plan,
        ),
        contention_table(
            "2c. Contention, async: processes with an event loop and a client each (times in ms;"
            " the bound is 2b's flock row)",
            results.contention_async_processes
            + [s for s in results.contention_sync if s.role == "bound" and s.mode == "processes"],
            target,
            plan,
        ),
        handoff_table(results.handoff, target, plan),
    ]


def render_text(results: Results, facts: list[tuple[str, str]], target: Target, plan: Plan) -> str:
    parts = [fact_lines(facts, results.skipped)[0]]
    parts += [table.text() for table in build_tables(results, target, plan)]
    return "\n\n".join(parts) + "\n"


def render_markdown(
    results: Results, facts: list[tuple[str, str]], target: Target, plan: Plan
) -> str:
    parts = ["# Lock benchmark: inturn and its peers\n\n" + fact_lines(facts, results.skipped)[1]]
    parts += [table.markdown() for table in build_tables(results, target, plan)]
    return "\n\n".join(parts) + "\n"


# -- main ---------------------------------------------------------------------------------


def start_postgres() -> tuple[Any, str | None]:
    """A throwaway PostgreSQL cluster of our own (server, None), or (None, why not)."""
    from tests.servers import PostgresServer, ServerStartError

    try:
        return PostgresServer().start(), None
    except ServerStartError as exc:  # includes MissingServerBinary
        return None, f"PostgreSQL rows: the server did not start: {exc}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--url-for-inturn",
        metavar="URL",
        help="backend URL for the inturn rows (default: the redis-server this script starts)",
    )
    parser.add_argument("--quick", action="store_true", help="shorter run (~60 s)")
    parser.add_argument(
        "--no-postgres",
        action="store_true",
        help="skip the inturn-on-PostgreSQL rows (and the PostgreSQL cluster they start)",
    )
    parser.add_argument("--markdown", metavar="PATH", help="also write the results as markdown")
    parser.add_argument("--contenders", type=int, default=8, help="contenders on one key (8)")
    parser.add_argument("--hold-ms", type=float, default=2.0, help="hold time per turn (2 ms)")
    parser.add_argument(
        "--long-hold-ms",
        type=float,
        default=20.0,
        help="the one-loop contention again with this hold (20 ms; 0 skips it)",
    )
    parser.add_argument(
        "--sync-mode",
        choices=("processes", "threads"),
        default="processes",
        help="sync contenders as processes with a client each (default) or threads",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.make(args)
    began = time.monotonic()
    server = start_redis()
    postgres: Any = None
    workdir = tempfile.mkdtemp(prefix="inturn-bench-")
    with cleaned_up(server, workdir=workdir) as started:
        skipped: str | None = "PostgreSQL rows: --no-postgres"
        if not args.no_postgres:
            _progress("starting PostgreSQL (initdb + pg_ctl)")
            postgres, skipped = start_postgres()
            started.append(postgres)
        target = Target(
            redis_url=server.url,
            inturn_url=args.url_for_inturn or server.url,
            flock_path=os.path.join(workdir, "flock"),
            run_id=secrets.token_hex(4),
            postgres_dsn=postgres.dsn if postgres is not None else None,
        )
        print(
            f"bench_locks: redis-server on {server.url}, inturn on {target.inturn_url}"
            + (f" and {target.postgres_dsn}" if target.postgres_dsn else ""),
            file=sys.stderr,
        )
        results = Results()
        if skipped:
            results.skipped.append(skipped)
        # Separate keys, so that nothing the async part left behind can block the sync part.
        asyncio.run(run_async_part(replace(target, run_id=f"{target.run_id}-a"), plan, results))
        run_sync_part(replace(target, run_id=f"{target.run_id}-s"), plan, results)
        run_async_processes_part(replace(target, run_id=f"{target.run_id}-p"), plan, results)
        facts = lock_facts(target)
        facts.append(("run time", f"{time.monotonic() - began:.1f} s"))
        print(render_text(results, facts, target, plan))
        if args.markdown:
            Path(args.markdown).write_text(render_markdown(results, facts, target, plan))
            print(f"\nwrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
