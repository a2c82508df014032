"""How far one Redis goes: hand-off across processes, the uncontended cycle against two round
trips, many users, script ops/s, and the round trips and bytes of a turn and a mailbox message.

    python benchmarks/bench_scale.py [--quick | --tiny] [--markdown PATH] [--json PATH]
                                     [--no-postgres] [--cluster] [--parts rtt,cycle,...]

The script starts its own `redis-server` on a free 127.0.0.1 port (and, for the PostgreSQL
counts, a throwaway PostgreSQL cluster; with `--cluster`, a 3-master Redis Cluster) and runs,
side by side in one run:

1. `rtt`: the loopback round trip, `PING` with redis-py (sync and asyncio), back to back and
   after 1 ms idle (a waiter's wake-up comes after idle time, so that is the one to compare a
   hand-off with);
2. `cycle`: the uncontended acquire + release of inturn's turn and of redis-py's Lock (and
   python-redis-lock), each as a ratio to two back-to-back `PING`s with a redis-py client;
3. `handoff`: 8 processes on one key (sync, and async with an event loop each), hold 2 ms:
   the release -> next holder's body start latency p50/p99 next to the `PING`, throughput,
   Jain's index and how often a grant went past a waiter that asked earlier (FIFO order);
4. `users`: many users, mostly uncontended: every one of 4 processes takes a turn once per
   user (10,000 users; a shuffled order of its own), turns/s and latency p50/p99 beside
   redis-py's Lock, and inturn on memory:// in one process as the local reference;
5. `ops`: `redis-benchmark` (50 clients) of `PING`, `EVALSHA` of a trivial script and of
   inturn's JOIN script (the acquire of a free key), with the server's own µs per call;
6. `count`: round trips (MONITOR: what clients sent, and what scripts ran) and bytes (INFO
   stats) per turn and per mailbox message on Redis; round trips (psycopg `execute` calls)
   and bytes (the process's socket I/O, /proc/self/io) on PostgreSQL;
7. `cluster` (with `--cluster`): scenario 4's inturn rows on the 3-master Cluster.

Progress goes to stderr; the tables go to stdout, to `--markdown` and (raw) to `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import io
import itertools
import json
import math
import os
import queue
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_locks as bl  # noqa: E402
import redis  # noqa: E402
import redis.asyncio  # noqa: E402
from _facts import cleaned_up, fact_lines, machine_facts, percentile  # noqa: E402
from _procs import start_redis  # noqa: E402

PARTS = ("rtt", "cycle", "handoff", "users", "ops", "count", "cluster")

SYNC_HANDOFF = ("inturn turn_sync", "redis-py Lock", "python-redis-lock", "pottery Redlock")
ASYNC_HANDOFF = ("inturn turn", "redis-py asyncio Lock", "pottery AIORedlock")
SYNC_CYCLE = ("inturn turn_sync", "redis-py Lock", "python-redis-lock")
ASYNC_CYCLE = ("inturn turn", "redis-py asyncio Lock")
USERS_SYNC = ("inturn turn_sync", "redis-py Lock")
USERS_ASYNC = ("inturn turn", "redis-py asyncio Lock")
PING_BOUND = "2 x PING (bound)"
ORDER_SLACK = 0.001  # s: two asks closer than this are a tie for the FIFO check


@dataclass(frozen=True)
class Size:
    """How big one run is: `--tiny` (seconds, for the test), `--quick`, or full."""

    name: str
    rtt_samples: int
    cycles: int
    batches: int
    window: float
    contenders: int
    users: int
    processes: int
    tasks: int  # async tasks per process in the many-users run
    bench_requests: int
    count_ops: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> Size:
        if args.tiny:
            return cls("tiny", 40, 30, 2, 0.4, 2, 40, 2, 2, 2_000, 10)
        if args.quick:
            return cls("quick", 200, 100, 3, 1.0, 8, 500, 4, 4, 20_000, 50)
        return cls("full", 1_000, 300, 7, 5.0, 8, 10_000, 4, 4, 200_000, 200)

    def lock_plan(self) -> bl.Plan:
        return bl.Plan(
            window=self.window,
            hold=0.002,
            contenders=self.contenders,
            cycles=self.cycles,
            batches=self.batches,
            handoff_rounds=0,
            handoff_seconds=0.0,
            drain=max(2.0, self.window),
            sync_mode="processes",
        )


def _progress(message: str) -> None:
    bl._progress(message)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def pct(values: Sequence[float], q: float) -> float:
    return percentile(values, q)


# -- 1. round trip ------------------------------------------------------------------------


def _ms_stats(samples: Sequence[float]) -> dict[str, float]:
    return {"p50": pct(samples, 50) * 1e3, "p99": pct(samples, 99) * 1e3, "n": len(samples)}


def measure_rtt(url: str, n: int) -> dict[str, dict[str, float]]:
    """PING with redis-py: back to back, and each after 1 ms idle (sync and asyncio)."""
    client = redis.Redis.from_url(url)
    try:
        for _ in range(20):
            client.ping()
        back, idle = [], []
        for _ in range(n):
            start = time.perf_counter()
            client.ping()
            back.append(time.perf_counter() - start)
        for _ in range(n):
            time.sleep(0.001)
            start = time.perf_counter()
            client.ping()
            idle.append(time.perf_counter() - start)
    finally:
        client.close()

    async def run_async() -> tuple[list[float], list[float]]:
        aclient = redis.asyncio.Redis.from_url(url)
        try:
            for _ in range(20):
                await aclient.ping()
            back, idle = [], []
            for _ in range(n):
                start = time.perf_counter()
                await aclient.ping()
                back.append(time.perf_counter() - start)
            for _ in range(n):
                await asyncio.sleep(0.001)
                start = time.perf_counter()
                await aclient.ping()
                idle.append(time.perf_counter() - start)
            return back, idle
        finally:
            await aclient.aclose()

    aback, aidle = asyncio.run(run_async())
    return {
        "sync back to back": _ms_stats(back),
        "sync after 1 ms idle": _ms_stats(idle),
        "async back to back": _ms_stats(aback),
        "async after 1 ms idle": _ms_stats(aidle),
    }


# -- 2. uncontended cycle -----------------------------------------------------------------


class _SyncTwoPings:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def __enter__(self) -> None:
        self._client.ping()

    def __exit__(self, *exc_info: object) -> None:
        self._client.ping()


class _AsyncTwoPings:
    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client

    async def __aenter__(self) -> None:
        await self._client.ping()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.ping()


def _open_pings_sync(target: bl.Target) -> bl.SyncSession:
    client = redis.Redis.from_url(target.redis_url)
    return bl.SyncSession(lambda key: bl._static(_SyncTwoPings(client)), client.close)


async def _open_pings_async(target: bl.Target) -> bl.AsyncSession:
    client = redis.asyncio.Redis.from_url(target.redis_url)
    return bl.AsyncSession(lambda key: bl._static(_AsyncTwoPings(client)), client.aclose)


PINGS_SYNC = bl.SyncContender(PING_BOUND, "bound", frozenset({"cycle"}), _open_pings_sync)
PINGS_ASYNC = bl.AsyncContender(PING_BOUND, "bound", frozenset({"cycle"}), _open_pings_async)


def _cycle_rows(results: Sequence[bl.CycleResult], flavor: str) -> list[dict[str, Any]]:
    pings = next((r for r in results if r.name == PING_BOUND and not r.error), None)
    rows = []
    for r in results:
        us = r.us if not r.error else math.nan
        rows.append(
            {
                "lock": r.name,
                "flavor": flavor,
                "us": us,
                "x_pings": us / pings.us if pings else math.nan,
                "error": r.error,
            }
        )
    return rows


def run_cycles(target: bl.Target, size: Size, skipped: list[str]) -> list[dict[str, Any]]:
    plan = size.lock_plan()
    sync = [bl.SYNC_BY_NAME[name] for name in SYNC_CYCLE] + [PINGS_SYNC]
    sync = [c for c in sync if _usable_sync(c, target, skipped)]
    rows = _cycle_rows(bl.run_cycles_sync(sync, target, plan), "sync")

    async def run_async() -> list[bl.CycleResult]:
        contenders = [bl.ASYNC_BY_NAME[name] for name in ASYNC_CYCLE] + [PINGS_ASYNC]
        usable = []
        for c in contenders:
            reason = await bl._probe_async(c, target)
            if reason is None:
                usable.append(c)
            else:
                skipped.append(f"{c.name} (async): {reason}")
        return await bl.run_cycles_async(usable, target, plan)

    return rows + _cycle_rows(asyncio.run(run_async()), "async")


def _usable_sync(contender: bl.SyncContender, target: bl.Target, skipped: list[str]) -> bool:
    reason = bl._probe_sync(contender, target)
    if reason is not None and f"{contender.name} (sync): {reason}" not in skipped:
        skipped.append(f"{contender.name} (sync): {reason}")
    return reason is None


def _usable_async(contender: bl.AsyncContender, target: bl.Target, skipped: list[str]) -> bool:
    reason = asyncio.run(bl._probe_async(contender, target))
    if reason is not None and f"{contender.name} (async): {reason}" not in skipped:
        skipped.append(f"{contender.name} (async): {reason}")
    return reason is None


# -- 3. hand-off across processes ---------------------------------------------------------


def fifo_breaches(by_grant: Sequence[bl.Record]) -> int | None:
    """Grants that broke the FIFO promise, by the lock's own line: a request granted
    while another that was in line before it asked (``joined`` before its ``asked``)
    still waited. None for a lock that keeps no line (no ``joined`` stamps).

    ``by_grant``: the records sorted by grant time. ``joined`` is stamped when the
    JOIN's reply is in, later than the server put the request in line: a breach
    counted here is a real one.
    """
    if not by_grant or any(math.isnan(r[3]) for r in by_grant):
        return None
    breaches = 0
    later_joined = math.inf  # the earliest `joined` among the requests granted later
    for rec in reversed(by_grant):
        if later_joined < rec[0]:
            breaches += 1
        later_joined = min(later_joined, rec[3])
    return breaches


def handoff_stats(run: bl.ContentionRun, flavor: str) -> dict[str, Any]:
    """Hand-off latency and FIFO order from the holds that N processes recorded on one key."""
    flat = sorted((r for per in run.records for r in per), key=lambda r: r[1])
    deadline = run.started + run.plan.window
    counts = [sum(1 for r in per if r[1] < deadline) for per in run.records]
    # A hand-off: the next holder was already waiting when the holder left its body.
    gaps = [b[1] - a[2] for a, b in itertools.pairwise(flat) if b[0] <= a[2]]
    overlaps = sum(1 for gap in gaps if gap < 0)
    # FIFO: a grant that went past a waiter who asked earlier (by more than the slack).
    overtakes = 0
    later_min = math.inf
    for rec in reversed(flat):
        if later_min < rec[0] - ORDER_SLACK:
            overtakes += 1
        later_min = min(later_min, rec[0])
    waits = [r[1] - r[0] for r in flat] + run.censored
    return {
        "fifo_breaches": fifo_breaches(flat),
        "lock": run.name,
        "flavor": flavor,
        "processes": len(run.records),
        "acq_s": sum(counts) / run.plan.window,
        "handoff_p50_ms": pct(gaps, 50) * 1e3,
        "handoff_p99_ms": pct(gaps, 99) * 1e3,
        "handoff_max_ms": max(gaps, default=math.nan) * 1e3,
        "handoffs": len(gaps),
        "wait_p99_ms": pct(waits, 99) * 1e3,
        "jain": bl.jain(counts) if sum(counts) else math.nan,
        "overtaken_pct": 100 * overtakes / len(flat) if flat else math.nan,
        "overlaps": overlaps,
        "censored": len(run.censored),
        "error": run.error,
    }


def run_handoffs(
    target: bl.Target, size: Size, skipped: list[str], names: dict[str, Sequence[str]]
) -> list[dict[str, Any]]:
    plan = size.lock_plan()
    rows = []
    for flavor in ("sync", "async"):
        for name in names[flavor]:
            contender: Any = (bl.SYNC_BY_NAME if flavor == "sync" else bl.ASYNC_BY_NAME)[name]
            ok = (
                _usable_sync(contender, target, skipped)
                if flavor == "sync"
                else _usable_async(contender, target, skipped)
            )
            if not ok:
                continue
            _progress(f"hand-off, {plan.contenders} processes: {name} ({flavor})")
            key = f"handoff-{target.run_id}-{flavor}-{len(rows)}"
            try:
                run = bl._contention_processes(name, contender.role, flavor, target, plan, key)
            except Exception as exc:
                run = bl._failed_run(name, contender.role, "processes", plan, exc)
            rows.append(handoff_stats(run, flavor))
    return rows


# -- 4. many users ------------------------------------------------------------------------


def _user_keys(run_id: str, users: int, seed: int) -> list[str]:
    order = list(range(users))
    random.Random(seed).shuffle(order)
    return [f"user-{run_id}-{u}" for u in order]


def _users_sync(
    name: str, target: bl.Target, keys: Sequence[str], start: Any
) -> tuple[list[float], float]:
    """Latencies of one turn per key, and the process's CPU seconds (all threads) for them."""
    session = bl.SYNC_BY_NAME[name].open(target)
    try:
        with session.lock_for(f"warm-{secrets.token_hex(4)}")():
            pass
        start.wait()
        cpu = time.process_time()
        latencies = []
        for key in keys:
            began = time.perf_counter()
            with session.lock_for(key)():
                pass
            latencies.append(time.perf_counter() - began)
        return latencies, time.process_time() - cpu
    finally:
        session.close()


async def _users_async(
    name: str, target: bl.Target, keys: Sequence[str], tasks: int, start: Any
) -> tuple[list[float], float]:
    session = await bl.ASYNC_BY_NAME[name].open(target)
    try:
        async with session.lock_for(f"warm-{secrets.token_hex(4)}")():
            pass
        start.wait()  # blocks the loop: nothing else runs yet
        cpu = time.process_time()
        latencies: list[float] = []
        todo = iter(keys)

        async def worker() -> None:
            for key in todo:
                began = time.perf_counter()
                async with session.lock_for(key)():
                    pass
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(tasks)))
        return latencies, time.process_time() - cpu
    finally:
        await session.aclose()


@dataclass(frozen=True)
class _Go:
    """All processes ready (barrier), then go at once; each reports when it finished."""

    barrier: Any

    def wait(self) -> None:
        self.barrier.wait(timeout=120)


def _users_process(
    name: str,
    flavor: str,
    target: bl.Target,
    keys: Sequence[str],
    tasks: int,
    start: _Go,
    index: int,
    results: Any,
) -> None:
    try:
        if flavor == "sync":
            latencies, cpu = _users_sync(name, target, keys, start)
        else:
            latencies, cpu = asyncio.run(_users_async(name, target, keys, tasks, start))
        results.put((index, latencies, cpu, time.monotonic(), None))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            start.barrier.abort()
        results.put((index, [], 0.0, time.monotonic(), _error(exc)))


def _users_row(
    name: str,
    flavor: str,
    where: str,
    procs: int,
    tasks: int,
    lat: list[float],
    wall: float,
    cpu: float,
) -> dict[str, Any]:
    return {
        "lock": name,
        "flavor": flavor,
        "where": where,
        "processes": procs,
        "tasks": tasks if flavor == "async" else 1,
        "turns": len(lat),
        "turns_s": len(lat) / wall if wall > 0 else math.nan,
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "max_ms": max(lat, default=math.nan) * 1e3,
        "cpu_us": cpu / len(lat) * 1e6 if lat else math.nan,
        "error": None,
    }


def run_users_processes(
    name: str, flavor: str, target: bl.Target, size: Size, where: str
) -> dict[str, Any]:
    ctx = bl._process_context()
    start = _Go(ctx.Barrier(size.processes + 1))
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_users_process,
            args=(
                name,
                flavor,
                target,
                _user_keys(target.run_id, size.users, seed=i),
                size.tasks,
                start,
                i,
                results,
            ),
            daemon=True,
        )
        for i in range(size.processes)
    ]
    for proc in procs:
        proc.start()
    latencies: list[float] = []
    cpu = 0.0
    ends: list[float] = []
    errors: list[str] = []
    try:
        try:
            start.wait()
            began = time.monotonic()
        except threading.BrokenBarrierError:
            began = math.nan
        for _ in procs:
            try:
                _, lat, used, end, error = results.get(timeout=600)
            except queue.Empty:
                errors.append("a process did not report within 600 s")
                break
            latencies += lat
            cpu += used
            ends.append(end)
            if error:
                errors.append(error)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    wall = max(ends, default=0) - began
    row = _users_row(name, flavor, where, size.processes, size.tasks, latencies, wall, cpu)
    row["error"] = errors[0] if errors else None
    return row


def run_users_memory(name: str, flavor: str, size: Size) -> dict[str, Any]:
    """inturn on memory://, one process doing every process's share: the local reference."""
    target = bl.Target("redis://unused", "memory://", "/nonexistent", "mem")
    keys = [k for i in range(size.processes) for k in _user_keys("mem", size.users, seed=i)]

    class _Now:
        def wait(self) -> None:
            pass

    began = time.monotonic()
    if flavor == "sync":
        lat, cpu = _users_sync(name, target, keys, _Now())
        procs, tasks = 1, 1
    else:
        lat, cpu = asyncio.run(_users_async(name, target, keys, size.tasks, _Now()))
        procs, tasks = 1, size.tasks
    wall = time.monotonic() - began
    return _users_row(name, flavor, "memory://", procs, tasks, lat, wall, cpu)


def run_users(
    target: bl.Target, size: Size, skipped: list[str], where: str, memory: bool = True
) -> list[dict[str, Any]]:
    rows = []
    for flavor, names in (("sync", USERS_SYNC), ("async", USERS_ASYNC)):
        if memory:
            _progress(f"many users: inturn memory:// ({flavor}, 1 process)")
            name = names[0]
            try:
                rows.append(run_users_memory(name, flavor, size))
            except Exception as exc:
                rows.append(
                    {"lock": name, "flavor": flavor, "where": "memory://", "error": _error(exc)}
                )
        for name in names:
            if where != "redis" and not name.startswith("inturn"):
                continue
            _progress(f"many users: {name} ({flavor}, {size.processes} processes, {where})")
            try:
                rows.append(run_users_processes(name, flavor, target, size, where))
            except Exception as exc:
                rows.append({"lock": name, "flavor": flavor, "where": where, "error": _error(exc)})
    return rows


# -- 5. script ops/s ----------------------------------------------------------------------


def _commandstats(client: redis.Redis) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): v for k, v in stats.items()}


def run_script_ops(
    url: str, size: Size, skipped: list[str], clients: int = 50
) -> list[dict[str, Any]]:
    from inturn._backends.redis._lua import JOIN

    binary = shutil.which("redis-benchmark")
    if binary is None:
        skipped.append("script ops/s: redis-benchmark is not installed (it comes with Redis)")
        return []
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    client = redis.Redis.from_url(url)
    trivial = client.script_load("return 1")
    join = client.script_load(JOIN)
    tag = "bs:{__rand_int__}:"
    keys = [tag + kind for kind in "oqwf"]  # owner, line, waiters, fence
    cases = [
        ("PING (no script)", ["PING"], "ping"),
        ("EVALSHA return 1", ["EVALSHA", trivial, "0"], "evalsha"),
        (
            "EVALSHA inturn JOIN (free key: grant)",
            # token, lease 5 ms, alive 1 s, wake-up channel, mode
            ["EVALSHA", join, "4", *keys, "t__rand_int__", "5", "1000", "bs:wake", "join"],
            "evalsha",
        ),
    ]
    # The four commands an uncontended JOIN runs, without its logic: what the script's own
    # logic adds to them.
    plain = client.script_load(
        "redis.call('EXISTS', KEYS[1], KEYS[2]); local t = redis.call('TIME');"
        " local f = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]));"
        " redis.call('SET', KEYS[4], f, 'EX', 2592000, 'GET');"
        " redis.call('SET', KEYS[1], ARGV[1] .. '|' .. f, 'PX', ARGV[2]); return 1"
    )
    cases.append(
        (
            "EVALSHA of JOIN's 4 commands alone",
            ["EVALSHA", plain, "4", *keys, "t__rand_int__", "5"],
            "evalsha",
        )
    )
    rows = []
    try:
        for label, args, stat in cases:
            _progress(f"redis-benchmark: {label}")
            client.config_resetstat()
            cmd = [binary, "-h", host, "-p", port, "-n", str(size.bench_requests)]
            cmd += ["-c", str(clients), "-r", "1000000", "--csv", *args]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
            except (subprocess.SubprocessError, OSError) as exc:
                rows.append({"command": label, "error": _error(exc)})
                continue
            parsed = [row for row in csv.reader(io.StringIO(out.stdout)) if len(row) > 1]
            rps = float(parsed[-1][1])
            server = _commandstats(client).get(stat, {})
            usec = float(server.get("usec_per_call", math.nan))
            rows.append(
                {
                    "command": label,
                    "ops_s": rps,
                    "clients": clients,
                    "requests": size.bench_requests,
                    "server_usec_per_call": usec,
                    "server_ceiling_s": 1e6 / usec if usec else math.nan,
                    "error": None,
                }
            )
    finally:
        client.close()
    return rows


# -- 6. round trips and bytes per operation -----------------------------------------------


class _Monitor:
    """Counts the commands the server runs between start() and stop(): ("client"|"lua", NAME)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._marker = f"bench-stop-{secrets.token_hex(4)}"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()
        client = redis.Redis.from_url(self.url)

        def read() -> None:
            try:
                with client.monitor() as monitor:
                    ready.set()
                    for entry in monitor.listen():
                        text = entry.get("command", "")
                        if self._marker in text:
                            return
                        name = text.split(" ", 1)[0].upper().strip('"')
                        kind = "lua" if entry.get("client_type") == "lua" else "client"
                        self.counts[(kind, name)] += 1
            finally:
                client.close()

        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()
        ready.wait(5)
        time.sleep(0.2)  # MONITOR is in place on the server

    def stop(self) -> None:
        time.sleep(0.2)  # the last replies and pushes are out
        stopper = redis.Redis.from_url(self.url)
        stopper.echo(self._marker)
        stopper.close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _socket_bytes(port: int) -> tuple[int, int]:
    """Bytes (sent, received) over this machine's TCP connections to `port` (ss -ti);
    (-1, -1) without `ss` (iproute2)."""
    try:
        out = subprocess.run(
            ["ss", "-tinH", "state", "established", f"( dport = :{port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return -1, -1
    sent = received = 0
    for word in out.split():
        if word.startswith("bytes_acked:"):
            sent += int(word.split(":")[1])
        elif word.startswith("bytes_received:"):
            received += int(word.split(":")[1])
    return sent, received


class _Meter:
    """What a scenario costs between start() and stop(): bytes on the wire to the server's
    port (ss; no MONITOR running, it would add its own traffic), or, on a second pass,
    the commands (MONITOR on Redis; psycopg cursor execute() calls on PostgreSQL)."""

    def __init__(
        self,
        port: int,
        monitor_url: str | None = None,
        count_sql: bool = False,
        stats_url: str | None = None,
    ) -> None:
        self.port = port
        self.stats_url = stats_url
        self.server_usec = math.nan
        self.monitor = _Monitor(monitor_url) if monitor_url else None
        self.count_sql = count_sql
        self.psycopg: collections.Counter[str] | None = None
        self.bytes: tuple[float, float] = (0, 0)
        self._before = (0, 0)
        self._patch: contextlib.ExitStack | None = None

    def start(self) -> None:
        if self.monitor is not None:
            self.monitor.start()
        elif self.count_sql:
            self._patch = contextlib.ExitStack()
            self.psycopg = self._patch.enter_context(_count_psycopg())
        if self.stats_url:
            with contextlib.closing(redis.Redis.from_url(self.stats_url)) as client:
                client.config_resetstat()
        self._before = _socket_bytes(self.port)

    def stop(self) -> None:
        time.sleep(0.05)
        after = _socket_bytes(self.port)
        if self.stats_url:
            with contextlib.closing(redis.Redis.from_url(self.stats_url)) as client:
                stats = _commandstats(client)
            # A script's time includes the commands it ran (counted again on their own rows).
            self.server_usec = sum(
                float(v.get("usec", 0)) for k, v in stats.items() if k in ("evalsha", "eval")
            )
        if min(*after, *self._before) < 0:
            self.bytes = (math.nan, math.nan)
        else:
            self.bytes = (after[0] - self._before[0], after[1] - self._before[1])
        if self.monitor is not None:
            self.monitor.stop()
        if self._patch is not None:
            self._patch.close()


def _port(url: str) -> int:
    import urllib.parse

    return urllib.parse.urlsplit(url).port or 0


Scenario = Callable[[str, _Meter, int], None]  # (url, meter, n): warm up, start, n ops, stop


def _scenario_turns_async(url: str, meter: _Meter, n: int) -> None:
    import inturn

    async def run() -> None:
        gate = inturn.Gate.from_url(url, namespace=f"count{secrets.token_hex(3)}")
        try:
            for i in range(3):
                async with gate.turn(f"warm-{i}"):
                    pass
            meter.start()
            for i in range(n):
                async with gate.turn(f"k-{i}"):
                    pass
            meter.stop()
        finally:
            await gate.aclose()

    asyncio.run(run())


def _scenario_turns_sync(url: str, meter: _Meter, n: int) -> None:
    import inturn

    gate = inturn.Gate.from_url(url, namespace=f"count{secrets.token_hex(3)}")
    try:
        for i in range(3):
            with gate.turn_sync(f"warm-{i}"):
                pass
        meter.start()
        for i in range(n):
            with gate.turn_sync(f"k-{i}"):
                pass
        meter.stop()
    finally:
        gate.close()


def _scenario_handoffs(url: str, meter: _Meter, n: int) -> None:
    """Two gates (two wake-up channels, as two processes) pass one key back and forth."""
    import inturn

    async def run() -> None:
        namespace = f"count{secrets.token_hex(3)}"
        gates = [inturn.Gate.from_url(url, namespace=namespace) for _ in range(2)]
        try:

            async def player(gate: Any, turns: int) -> None:
                for _ in range(turns):
                    async with gate.turn("shared"):
                        await asyncio.sleep(0.002)

            await asyncio.gather(*(player(g, 3) for g in gates))
            meter.start()
            await asyncio.gather(*(player(g, n // 2) for g in gates))
            meter.stop()
        finally:
            for gate in gates:
                await gate.aclose()

    asyncio.run(run())


def _scenario_mailbox(users: int, per_user: int) -> Scenario:
    def scenario(url: str, meter: _Meter, n: int) -> None:
        import inturn

        async def run() -> None:
            gate = inturn.Gate.from_url(url, namespace=f"count{secrets.token_hex(3)}")

            async def handler(*args: object) -> None:
                pass

            try:
                mailbox = gate.mailbox("m", handler=handler, sweep_interval=None)
                for u in range(3):
                    await mailbox.submit(f"warm-{u}", {"m": 0})
                await mailbox.drained(timeout=60)
                meter.start()
                for m in range(per_user if per_user else n):
                    for u in range(users if users else n):
                        await mailbox.submit(f"u{u}", {"m": m})
                if not await mailbox.drained(timeout=60):
                    raise TimeoutError("the mailbox did not drain within 60 s")
                meter.stop()
            finally:
                await gate.aclose()

        asyncio.run(run())

    return scenario


COUNT_SCENARIOS: list[tuple[str, str, Scenario, bool]] = [
    # (label, unit, scenario, Redis only)
    ("turn, uncontended (async)", "turn", _scenario_turns_async, False),
    ("turn, uncontended (sync)", "turn", _scenario_turns_sync, False),
    ("turn, handed off between two gates (async)", "turn", _scenario_handoffs, True),
    ("mailbox message, one per user", "message", _scenario_mailbox(0, 1), False),
    ("mailbox message, one user's backlog", "message", _scenario_mailbox(1, 0), False),
]


def run_counts(url: str, backend: str, n: int) -> list[dict[str, Any]]:
    """Per operation: round trips by command, commands run in scripts, bytes each way."""
    rows = []
    port = _port(url)
    for label, unit, scenario, redis_only in COUNT_SCENARIOS:
        if redis_only and backend != "redis":
            continue
        ops = 2 * (n // 2)
        try:
            wire = _Meter(port, stats_url=url if backend == "redis" else None)
            scenario(url, wire, ops)
            if backend == "redis":
                counted = _Meter(port, url)
                scenario(url, counted, ops)
                assert counted.monitor is not None
                counts = counted.monitor.counts
                sent = {name: c for (kind, name), c in counts.items() if kind == "client"}
                inner = sum(c for (kind, _), c in counts.items() if kind == "lua")
            else:
                counted = _Meter(port, count_sql=True)
                scenario(url, counted, ops)
                sent = dict(counted.psycopg or {})
                inner = math.nan
        except Exception as exc:
            rows.append({"backend": backend, "scenario": label, "error": _error(exc)})
            continue
        rows.append(
            {
                "backend": backend,
                "scenario": label,
                "unit": unit,
                "ops": ops,
                "round_trips": sum(sent.values()) / ops,
                "by_command": {k: v / ops for k, v in sorted(sent.items())},
                "in_scripts": inner / ops if not math.isnan(inner) else math.nan,
                "bytes_in": wire.bytes[0] / ops,
                "bytes_out": wire.bytes[1] / ops,
                "server_us": wire.server_usec / ops,
                "error": None,
            }
        )
    return rows


@contextlib.contextmanager
def _count_psycopg() -> Iterator[collections.Counter[str]]:
    """Count `execute` calls on psycopg cursors (each is one round trip) meanwhile.

    Counted on the cursor classes: `Connection.execute` runs a cursor's, and the engine
    sends its multi-statement strings through a `ClientCursor` (a subclass) directly."""
    import psycopg

    counts: collections.Counter[str] = collections.Counter()
    originals = (psycopg.Cursor.execute, psycopg.AsyncCursor.execute)

    def first_word(query: Any) -> str:
        text = query if isinstance(query, str) else str(query)
        return text.strip().split(None, 1)[0].rstrip(";").upper() if text.strip() else "?"

    def sync_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        counts[first_word(query)] += 1
        return originals[0](self, query, *args, **kwargs)

    async def async_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        counts[first_word(query)] += 1
        return await originals[1](self, query, *args, **kwargs)

    psycopg.Cursor.execute = sync_execute  # type: ignore[method-assign,assignment]
    psycopg.AsyncCursor.execute = async_execute  # type: ignore[method-assign,assignment]
    try:
        yield counts
    finally:
        psycopg.Cursor.execute, psycopg.AsyncCursor.execute = originals  # type: ignore[method-assign]


def postgres_limits(dsn: str) -> dict[str, Any]:
    """The server settings that bound inturn on PostgreSQL, and connections per held turn."""
    import psycopg

    import inturn

    with psycopg.connect(dsn, autocommit=True) as conn:
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("server_version", "max_connections", "max_locks_per_transaction")
        }

    async def held(k: int) -> int:
        gate = inturn.Gate.from_url(dsn + "?max_connections=64", namespace="limits")
        try:
            async with contextlib.AsyncExitStack() as stack:
                for i in range(k):
                    await stack.enter_async_context(gate.turn(f"held-{i}"))
                with psycopg.connect(dsn, autocommit=True) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                    ).fetchone()
                return int(row[0]) if row else -1
        finally:
            await gate.aclose()

    settings["connections_with_8_held_turns"] = asyncio.run(held(8))
    settings["connections_with_16_held_turns"] = asyncio.run(held(16))
    return settings


# -- reporting ----------------------------------------------------------------------------


@dataclass
class Report:
    size: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rtt: dict[str, dict[str, float]] = field(default_factory=dict)
    cycles: list[dict[str, Any]] = field(default_factory=list)
    handoff: list[dict[str, Any]] = field(default_factory=list)
    users: list[dict[str, Any]] = field(default_factory=list)
    ops: list[dict[str, Any]] = field(default_factory=list)
    counts: list[dict[str, Any]] = field(default_factory=list)
    postgres_limits: dict[str, Any] = field(default_factory=dict)
    cluster: list[dict[str, Any]] = field(default_factory=list)


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def build_tables(report: Report, size: Size) -> list[bl.Table]:
    tables = []
    if report.rtt:
        t = bl.Table(
            "1. Loopback round trip: PING with redis-py (ms)", ["client, timing", "p50", "p99"]
        )
        for label, s in report.rtt.items():
            t.rows.append([label, _f(s["p50"], 3), _f(s["p99"], 3)])
        t.notes.append(f"{size.rtt_samples} PINGs each; idle = a 1 ms sleep before each PING")
        tables.append(t)
    if report.cycles:
        t = bl.Table(
            "2. Uncontended acquire + release (us per cycle; ratio to two PINGs, same flavor)",
            ["lock", "flavor", "us/cycle", "x 2 PINGs", "cycles/s"],
        )
        for r in report.cycles:
            if r["error"]:
                t.rows.append([r["lock"], r["flavor"], "error", "-", "-"])
                t.notes.append(f"{r['lock']}: {r['error']}")
                continue
            t.rows.append(
                [r["lock"], r["flavor"], _f(r["us"]), _f(r["x_pings"], 2), _f(1e6 / r["us"], 0)]
            )
        t.notes.append(
            "median of batches interleaved across the locks; 2 x PING: two back-to-back PINGs "
            "with a redis-py client of the same flavor (inturn's own connections are not "
            "redis-py's, so that is the nearest plain client)"
        )
        tables.append(t)
    if report.handoff:
        idle = {
            flavor: report.rtt.get(f"{flavor} after 1 ms idle", {}).get("p50", math.nan)
            for flavor in ("sync", "async")
        }
        flock = next(
            (r for r in report.handoff if r["lock"].startswith("flock") and not r["error"]), None
        )
        t = bl.Table(
            f"3. {size.contenders} processes on one key, hold 2 ms: hand-off release -> next "
            "body (ms)",
            [
                "lock",
                "flavor",
                "acq/s",
                "hand-off p50",
                "p99",
                "max",
                "p50 / PING",
                "wait p99",
                "Jain",
                "overtaken %",
                "FIFO breaches",
                "overlaps",
            ],
        )
        for r in report.handoff:
            if r["error"] and not r.get("handoffs"):
                t.rows.append([r["lock"], r["flavor"], "error", *["-"] * 9])
                t.notes.append(f"{r['lock']}: {r['error']}")
                continue
            t.rows.append(
                [
                    r["lock"],
                    r["flavor"],
                    _f(r["acq_s"]),
                    _f(r["handoff_p50_ms"], 2),
                    _f(r["handoff_p99_ms"], 2),
                    _f(r["handoff_max_ms"], 1),
                    _f(r["handoff_p50_ms"] / idle[r["flavor"]], 1),
                    _f(r["wait_p99_ms"], 1),
                    _f(r["jain"], 3),
                    _f(r["overtaken_pct"], 1),
                    "-" if r.get("fifo_breaches") is None else str(r["fifo_breaches"]),
                    str(r["overlaps"]),
                ]
            )
        t.notes += [
            "each process its own client (async: its own event loop), looping {acquire; hold "
            f"2 ms; release}} for {size.window:g} s",
            "hand-off: from the holder leaving its body to the next holder's body starting, "
            "for grants whose holder was already waiting",
            "p50 / PING: hand-off p50 over the PING p50 after 1 ms idle, same flavor (table 1)",
            "overtaken %: grants that went to a waiter while another who asked >1 ms earlier "
            "still waited (0 = FIFO)",
            "FIFO breaches: grants that went to a request while another, already in the "
            "lock's line (its JOIN answered) before that request asked, still waited; "
            "inturn promises 0 (- : a lock without a line)",
        ]
        if flock:
            t.notes.append(f"flock (kernel lock, the bound): {_f(flock['acq_s'])} acq/s")
        tables.append(t)
    for title, rows in (
        (
            f"4. Many users: {size.users:,} users, each process takes one turn per user "
            "(mostly uncontended)",
            report.users,
        ),
        (
            "4b. The same on a 3-master Redis Cluster (inturn only) beside one redis-server",
            report.cluster,
        ),
    ):
        if not rows:
            continue
        t = bl.Table(
            title,
            [
                "lock",
                "flavor",
                "backend",
                "procs x tasks",
                "turns",
                "turns/s",
                "p50",
                "p99",
                "max",
                "client CPU us/turn",
            ],
        )
        for r in rows:
            if r.get("error") and not r.get("turns"):
                t.rows.append([r["lock"], r["flavor"], r["where"], "error", *["-"] * 6])
                t.notes.append(f"{r['lock']} ({r['where']}): {r['error']}")
                continue
            t.rows.append(
                [
                    r["lock"],
                    r["flavor"],
                    r["where"],
                    f"{r['processes']} x {r['tasks']}",
                    f"{r['turns']:,}",
                    _f(r["turns_s"], 0),
                    _f(r["p50_ms"], 2),
                    _f(r["p99_ms"], 2),
                    _f(r["max_ms"], 1),
                    _f(r.get("cpu_us"), 0),
                ]
            )
        t.notes.append(
            "latency = ask -> release of an empty turn (ms); turns/s from the start barrier to "
            "the last process done; memory:// is one process doing every process's share; "
            "client CPU = the processes' CPU time (every thread) over the turns"
        )
        tables.append(t)
    if report.ops:
        t = bl.Table(
            "5. Redis script ops/s on this machine (redis-benchmark)",
            ["command", "ops/s", "server us/call", "server-bound ops/s"],
        )
        for r in report.ops:
            if r.get("error"):
                t.rows.append([r["command"], "error", "-", "-"])
                t.notes.append(f"{r['command']}: {r['error']}")
                continue
            t.rows.append(
                [
                    r["command"],
                    _f(r["ops_s"], 0),
                    _f(r["server_usec_per_call"], 2),
                    _f(r["server_ceiling_s"], 0),
                ]
            )
        first = next((r for r in report.ops if not r.get("error")), None)
        if first:
            t.notes.append(
                f"redis-benchmark -c {first['clients']} -n {first['requests']} -r 1000000 "
                "(no pipelining), on the same cores as redis-server"
            )
        t.notes.append(
            "server us/call: INFO commandstats usec_per_call; server-bound ops/s = 1e6 / that "
            "(one redis-server runs commands on one thread)"
        )
        tables.append(t)
    if report.counts:
        t = bl.Table(
            "6. Round trips and bytes per turn and per mailbox message",
            [
                "backend",
                "scenario",
                "round trips",
                "by command",
                "run in scripts",
                "server us",
                "bytes in",
                "out",
            ],
        )
        for r in report.counts:
            if r.get("error"):
                t.rows.append([r["backend"], r["scenario"], "error", *["-"] * 5])
                t.notes.append(f"{r['backend']} {r['scenario']}: {r['error']}")
                continue
            by = ", ".join(f"{k} {v:.2f}" for k, v in r["by_command"].items() if v >= 0.005)
            t.rows.append(
                [
                    r["backend"],
                    r["scenario"],
                    _f(r["round_trips"], 2),
                    by,
                    _f(r["in_scripts"], 1),
                    _f(r.get("server_us"), 1),
                    _f(r["bytes_in"], 0),
                    _f(r["bytes_out"], 0),
                ]
            )
        t.notes += [
            f"{size.count_ops} operations each, after a warm-up; Redis: commands the clients "
            "sent and commands run inside scripts, from MONITOR (a second pass); server us: "
            "redis-server's time in the scripts (INFO commandstats usec of EVALSHA and EVAL)",
            "PostgreSQL: psycopg cursor execute() calls (each one round trip; a turn's BEGIN and "
            "its "
            "settings go as one statement string)",
            "bytes: TCP payload to (in) and from (out) the server's port over all of the "
            "process's connections (ss -ti bytes_acked / bytes_received), Pub/Sub and LISTEN "
            "connections included",
        ]
        tables.append(t)
    if report.postgres_limits:
        t = bl.Table("6b. PostgreSQL limits on this server", ["setting", "value"])
        for k, v in report.postgres_limits.items():
            t.rows.append([k, str(v)])
        t.notes.append(
            "connections: client backends while one async gate holds that many turns on "
            "distinct keys (each held turn is an open transaction on a connection of its own)"
        )
        tables.append(t)
    return tables


def scale_facts(url: str) -> list[tuple[str, str]]:
    sha = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        sha = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    packages = ("inturn", "redis", "hiredis", "python-redis-lock", "pottery", "psycopg")
    facts = machine_facts(url, packages, os_line=False)
    facts.insert(-1, ("inturn git", sha))
    return facts


def render_markdown(report: Report, size: Size) -> str:
    title = "# Scaling benchmark: hand-off, many users, script ops/s, costs per operation"
    parts = [f"{title}\n\n" + fact_lines(report.facts, report.skipped)[1]] + [
        t.markdown() for t in build_tables(report, size)
    ]
    return "\n\n".join(parts) + "\n"


def render_text(report: Report, size: Size) -> str:
    parts = [fact_lines(report.facts, report.skipped)[0]]
    parts += [t.text() for t in build_tables(report, size)]
    return "\n\n".join(parts) + "\n"


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter run (about a minute)")
    size.add_argument("--tiny", action="store_true", help="seconds: checks that it runs")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables as markdown")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL counts")
    parser.add_argument(
        "--cluster", action="store_true", help="also run the many-users rows on a 3-master Cluster"
    )
    parser.add_argument(
        "--parts",
        default=",".join(p for p in PARTS if p != "cluster"),
        help=f"comma-separated subset of {','.join(PARTS)}",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    size = Size.of(args)
    parts = set(args.parts.split(","))
    if args.cluster:
        parts.add("cluster")
    unknown = parts - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts: {', '.join(sorted(unknown))} (known: {', '.join(PARTS)})")
    began = time.monotonic()
    server = start_redis()
    workdir = tempfile.mkdtemp(prefix="inturn-bench-scale-")
    report = Report(size.name)
    with cleaned_up(server, workdir=workdir) as started:
        target = bl.Target(
            redis_url=server.url,
            inturn_url=server.url,
            flock_path=os.path.join(workdir, "flock"),
            run_id=secrets.token_hex(4),
        )
        if "rtt" in parts:
            _progress("round trip (PING)")
            report.rtt = measure_rtt(server.url, size.rtt_samples)
        if "cycle" in parts:
            _progress("uncontended cycles")
            report.cycles = run_cycles(
                replace(target, run_id=target.run_id + "c"), size, report.skipped
            )
        if "handoff" in parts:
            names = {"sync": (*SYNC_HANDOFF, "flock (bound)"), "async": ASYNC_HANDOFF}
            if size.name == "tiny":
                names = {"sync": ("inturn turn_sync",), "async": ("inturn turn",)}
            report.handoff = run_handoffs(target, size, report.skipped, names)
        if "users" in parts:
            report.users = run_users(
                replace(target, run_id=target.run_id + "u"), size, report.skipped, "redis"
            )
        if "ops" in parts:
            report.ops = run_script_ops(server.url, size, report.skipped)
        if "count" in parts:
            _progress("counting round trips and bytes (Redis)")
            report.counts += run_counts(server.url, "redis", size.count_ops)
            if not args.no_postgres:
                _progress("starting PostgreSQL (initdb + pg_ctl)")
                postgres, why = bl.start_postgres()
                started.append(postgres)
                if postgres is None:
                    report.skipped.append(why or "PostgreSQL did not start")
                else:
                    _progress("counting round trips and bytes (PostgreSQL)")
                    report.counts += run_counts(postgres.dsn, "postgresql", size.count_ops)
                    try:
                        report.postgres_limits = postgres_limits(postgres.dsn)
                    except Exception as exc:
                        report.skipped.append(f"PostgreSQL limits: {_error(exc)}")
        if "cluster" in parts:
            report.cluster = run_cluster(target, size, report.skipped)
        report.facts = scale_facts(server.url)
        report.facts.append(("run time", f"{time.monotonic() - began:.1f} s"))
        print(render_text(report, size))
        if args.markdown:
            Path(args.markdown).write_text(render_markdown(report, size))
            print(f"wrote {args.markdown}", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(asdict(report), indent=1, default=str))
            print(f"wrote {args.json}", file=sys.stderr)
    return 0


def run_cluster(target: bl.Target, size: Size, skipped: list[str]) -> list[dict[str, Any]]:
    from inturn._torture.servers import RedisCluster, ServerStartError

    _progress("starting a 3-master Redis Cluster")
    try:
        cluster = RedisCluster(3).start()
    except (ServerStartError, OSError) as exc:
        skipped.append(f"cluster: it did not start: {exc}")
        return []
    try:
        url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes)
        on_cluster = replace(target, inturn_url=url, run_id=target.run_id + "k")
        rows = []
        for flavor, name in (("sync", USERS_SYNC[0]), ("async", USERS_ASYNC[0])):
            for where, tgt in (
                ("redis", replace(target, run_id=target.run_id + "K")),
                ("cluster x3", on_cluster),
            ):
                _progress(f"many users: {name} ({flavor}) on {where}")
                try:
                    rows.append(run_users_processes(name, flavor, tgt, size, where))
                except Exception as exc:
                    rows.append(
                        {"lock": name, "flavor": flavor, "where": where, "error": _error(exc)}
                    )
        return rows
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
