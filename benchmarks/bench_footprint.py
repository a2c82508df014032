"""What inturn leaves behind per user, idle and active, on Redis and PostgreSQL.

    python benchmarks/bench_footprint.py [--keys N] [--active N] [--boxed N] [--quick]
                                         [--no-redis] [--no-postgres]

The script starts its own `redis-server` and PostgreSQL cluster (throwaway, on free
127.0.0.1 ports, stopped at the end), then on each engine:

1. idle: N distinct keys (default 1,000,000; 20,000 with `--quick`) each take a turn once,
   and the first `--boxed` of them (N / 10) get one mailbox message each, drained; then it
   prints the keys (Redis) or rows (PostgreSQL, every table) left behind, and Redis
   `used_memory` before and after (PostgreSQL: the tables' size);
2. active (run first, while this process's heap is still small): `--active` keys (10,000;
   PostgreSQL: at most its pool's connections, a held turn keeps one) are held at once; it
   prints Redis `used_memory` (PostgreSQL: the tables' size) per active key and this
   process's RSS growth per active key (the gate's state and the benchmark's own task per
   turn).

Progress goes to stderr; the figures to stdout. ``main(argv)`` returns 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis
import redis.asyncio

import inturn
from inturn._torture.servers import PostgresServer, RedisServer

NAMESPACE = "bench"
BATCH = 1000
"""Turns started at once on Redis (PostgreSQL: PG_BATCH)."""
PG_BATCH = 200
PG_ACTIVE_MAX = 28
"""A held PostgreSQL turn keeps a pooled connection (32 per loop): the active phase's cap."""


@dataclass
class Result:
    engine: str
    keys: int
    boxed: int
    seconds: float = 0.0
    left: int = 0
    """Keys (Redis) or rows (PostgreSQL) left once every key is idle."""
    left_detail: dict[str, int] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    active: int = 0
    bytes_per_active: float = 0.0
    rss_per_active: float = 0.0


def rss() -> int:
    """This process's resident set size in bytes (Linux), else its peak."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _in_batches(n: int, batch: int, start: Callable[[int], Awaitable[Any]]) -> None:
    for first in range(0, n, batch):
        await asyncio.gather(*(start(i) for i in range(first, min(n, first + batch))))
        if first and first % (batch * 100) == 0:
            progress(f"  {first:,} / {n:,}")


async def _idle_phase(gate: inturn.Gate, keys: int, boxed: int, batch: int) -> float:
    """Each key takes a turn once; the first ``boxed`` get a message each. Seconds taken."""

    async def take(i: int) -> None:
        async with gate.turn(f"user-{i}", timeout=120):
            pass

    async def handle(message: inturn.Message) -> None:
        pass

    # No sweeper: nothing dies here, and the figures are the engine's, not the sweep's.
    box = gate.mailbox("inbox", handler=handle, sweep_interval=None)
    started = time.perf_counter()
    await _in_batches(keys, batch, take)

    async def submit(i: int) -> None:
        await box.submit(f"user-{i}", {"n": i})

    await _in_batches(boxed, batch, submit)
    if not await box.drained(600):
        raise RuntimeError("the mailbox did not drain in 600 s")
    return time.perf_counter() - started


async def _active_phase(
    gate: inturn.Gate, active: int, measure: Callable[[], Awaitable[int]]
) -> tuple[float, float]:
    """Hold ``active`` turns at once: (engine bytes, process RSS bytes) per active key."""
    base, base_rss = await measure(), rss()
    held = 0
    all_held, release = asyncio.Event(), asyncio.Event()

    async def hold(i: int) -> None:
        nonlocal held
        async with gate.turn(f"active-{i}", timeout=120):
            held += 1
            if held == active:
                all_held.set()
            await release.wait()

    tasks = [asyncio.ensure_future(hold(i)) for i in range(active)]
    await asyncio.wait_for(all_held.wait(), 300)
    during, during_rss = await measure(), rss()
    release.set()
    await asyncio.gather(*tasks)
    return (during - base) / active, (during_rss - base_rss) / active


async def run_redis(url: str, keys: int, boxed: int, active: int) -> Result:
    result = Result("redis", keys, boxed, active=active)
    client = redis.asyncio.Redis.from_url(url)

    async def used_memory() -> int:
        return int((await client.info("memory"))["used_memory"])

    gate = inturn.Gate.from_url(url, namespace=NAMESPACE)
    try:
        async with gate.turn("warm-up"):  # connections and scripts: not per key
            pass
        # Active first: this process's RSS grows then (later it reuses what the idle run freed).
        progress(f"redis: {active:,} keys held at once")
        result.bytes_per_active, result.rss_per_active = await _active_phase(
            gate, active, used_memory
        )
        dbsize = int(await client.dbsize())
        result.bytes_before = await used_memory()
        progress(f"redis: {keys:,} keys taken once, {boxed:,} with a mailbox message")
        result.seconds = await _idle_phase(gate, keys, boxed, BATCH)
        names = [
            n.decode() async for n in client.scan_iter(match=f"inturn:{NAMESPACE}:*", count=10_000)
        ]
        per_user = [n for n in names if "{user-" in n]  # the user's own hash tag
        result.left = len(names)
        result.left_detail = {"of one user": len(per_user), "shared": len(names) - len(per_user)}
        result.left_detail |= dict.fromkeys(sorted(names)[:3], 1)
        assert int(await client.dbsize()) - dbsize <= len(names)
        result.bytes_after = await used_memory()
    finally:
        await gate.aclose()
        await client.aclose()
    return result


_TABLES = (
    "SELECT table_name FROM information_schema.tables"
    " WHERE table_schema = 'inturn' AND table_name <> 'migrations'"
)


def _pg_rows(dsn: str) -> tuple[dict[str, int], int]:
    """Rows of every per-key table, and their total size (heap, indexes, TOAST) in bytes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(_TABLES)]
        rows: dict[str, int] = {}
        size = 0
        for table in tables:
            (count,) = conn.execute(f"SELECT count(*) FROM inturn.{table}").fetchone() or (0,)
            (bytes_,) = conn.execute(
                f"SELECT pg_total_relation_size('inturn.{table}')"
            ).fetchone() or (0,)
            rows[table] = int(count)
            size += int(bytes_)
    return rows, size


async def run_postgres(dsn: str, keys: int, boxed: int, active: int) -> Result:
    active = min(active, PG_ACTIVE_MAX)
    result = Result("postgres", keys, boxed, active=active)
    gate = inturn.Gate.from_url(dsn, namespace=NAMESPACE)

    async def table_bytes() -> int:
        return (await asyncio.to_thread(_pg_rows, dsn))[1]

    try:
        async with gate.turn("warm-up"):
            pass
        progress(f"postgres: {active:,} keys held at once")
        result.bytes_per_active, result.rss_per_active = await _active_phase(
            gate, active, table_bytes
        )
        _, result.bytes_before = await asyncio.to_thread(_pg_rows, dsn)
        progress(f"postgres: {keys:,} keys taken once, {boxed:,} with a mailbox message")
        result.seconds = await _idle_phase(gate, keys, boxed, PG_BATCH)
        backend = gate.backend
        if isinstance(backend, inturn.PostgresBackend):
            await backend.purge()
        rows, result.bytes_after = await asyncio.to_thread(_pg_rows, dsn)
        result.left, result.left_detail = sum(rows.values()), rows
    finally:
        await gate.aclose()
    return result


def report(results: Sequence[Result], argv: Sequence[str]) -> str:
    mib = 1024 * 1024
    lines = [
        f"$ python benchmarks/bench_footprint.py {' '.join(argv)}".rstrip(),
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, inturn {inturn.__version__}",
        "",
    ]
    for r in results:
        unit = "keys" if r.engine == "redis" else "rows"
        size = "used_memory" if r.engine == "redis" else "tables' size"
        lines += [
            f"{r.engine}: {r.keys:,} distinct keys taken once, {r.boxed:,} of them with a"
            f" mailbox message, in {r.seconds:.1f} s ({r.keys / r.seconds:,.0f} keys/s)",
            f"  {unit} left once idle: {r.left:,}"
            + (f" ({r.left / r.keys:.6f} per key)" if r.keys else ""),
            f"  left: {', '.join(f'{k}={v}' for k, v in r.left_detail.items()) or '-'}",
            f"  {size}: {r.bytes_before / mib:.2f} MiB before, {r.bytes_after / mib:.2f} MiB"
            f" after ({(r.bytes_after - r.bytes_before) / mib:+.2f} MiB)",
            f"  {r.active:,} keys held at once: {r.bytes_per_active:,.0f} bytes of {size}"
            f" per active key, {r.rss_per_active:,.0f} bytes of process RSS per active key",
            "",
        ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, help="distinct keys (1,000,000; --quick: 20,000)")
    parser.add_argument("--boxed", type=int, help="keys that get a mailbox message (keys / 10)")
    parser.add_argument("--active", type=int, default=10_000, help="keys held at once")
    parser.add_argument("--quick", action="store_true", help="20,000 keys, 2,000 active")
    parser.add_argument("--no-redis", action="store_true", help="skip Redis")
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args(argv)
    if args.keys is None:
        args.keys = 20_000 if args.quick else 1_000_000
    if args.quick and args.active == 10_000:
        args.active = 2_000
    if args.boxed is None:
        args.boxed = args.keys // 10
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    results: list[Result] = []
    if not args.no_redis:
        with RedisServer() as server:
            results.append(asyncio.run(run_redis(server.url, args.keys, args.boxed, args.active)))
    if not args.no_postgres:
        with PostgresServer() as pg:
            results.append(asyncio.run(run_postgres(pg.dsn, args.keys, args.boxed, args.active)))
    print(report(results, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
