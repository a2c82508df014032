"""inturn on PostgreSQL behind PgBouncer in transaction mode, against a direct connection.

    python benchmarks/bench_pgbouncer.py [--pool-size 4] [--seconds 3]

Starts a throwaway PostgreSQL (`tests.servers.PostgresServer`) and a `pgbouncer` in front of it
(`pool_mode = transaction`, `default_pool_size = --pool-size`; as the server's unprivileged
user when run as root), then, for each of the direct URL and PgBouncer's:

1. uncontended turn cycle (async), µs per cycle (median of batches);
2. contention: 8 tasks in 2 gates (two backends: two lines, as two processes would have) on one
   key, hold 2 ms, for --seconds: acquisitions/s and overlaps between recorded holds (must be 0);
3. held turns at once: one gate takes turns on distinct keys, each held; how many it holds
   before a new one waits longer than 2 s, and how many server connections PostgreSQL then
   has open (`pg_stat_activity`).

Prints a Markdown table with the command and versions. Needs the `pgbouncer` binary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _facts import command, cpu_model, version  # noqa: E402


def start_pgbouncer(
    server: Any, pool_size: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], int]:
    from inturn._torture.servers import free_port

    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        raise SystemExit("pgbouncer is not installed (apt-get install pgbouncer)")
    port = free_port()
    (workdir / "users.txt").write_text('"postgres" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"postgres = host=127.0.0.1 port={server.port} dbname=postgres user=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\n"
        f"unix_socket_dir = {workdir}\n"
        f"auth_type = trust\nauth_file = {workdir / 'users.txt'}\n"
        f"pool_mode = transaction\ndefault_pool_size = {pool_size}\n"
        "max_client_conn = 500\nquery_wait_timeout = 30\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {workdir / 'pgbouncer.log'}\n"
    )
    user = getattr(server, "user", None)
    if user is not None:
        for path in workdir.iterdir():
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chown(workdir, user.pw_uid, user.pw_gid)
    proc = subprocess.Popen(
        [binary, str(workdir / "pgbouncer.ini")],
        user=user.pw_uid if user else None,
        group=user.pw_gid if user else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    import psycopg

    deadline = time.monotonic() + 15
    while True:
        try:
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres") as conn:
                conn.execute("SELECT 1")
            return proc, port
        except psycopg.OperationalError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                err = proc.stderr.read().decode() if proc.stderr else ""
                log = (
                    (workdir / "pgbouncer.log").read_text()
                    if (workdir / "pgbouncer.log").exists()
                    else ""
                )
                raise SystemExit(f"pgbouncer did not start:\n{err}\n{log}") from None
            time.sleep(0.1)


async def cycle_us(url: str, batches: int = 5, cycles: int = 100) -> float:
    import inturn

    gate = inturn.Gate.from_url(url, namespace=f"pgb{secrets.token_hex(3)}")
    try:
        results = []
        for batch in range(batches + 1):
            start = time.perf_counter()
            for _ in range(cycles):
                async with gate.turn("cycle"):
                    pass
            if batch:
                results.append((time.perf_counter() - start) / cycles * 1e6)
        return statistics.median(results)
    finally:
        await gate.aclose()


async def contention(url: str, seconds: float) -> tuple[float, int, int]:
    import inturn

    namespace = f"pgb{secrets.token_hex(3)}"
    gates = [inturn.Gate.from_url(url, namespace=namespace) for _ in range(2)]
    records: list[tuple[float, float]] = []
    try:
        for gate in gates:
            async with gate.turn("warm"):
                pass
        deadline = time.monotonic() + seconds

        async def task(gate: Any) -> None:
            while time.monotonic() < deadline:
                async with gate.turn("shared"):
                    granted = time.monotonic()
                    await asyncio.sleep(0.002)
                    records.append((granted, time.monotonic()))

        await asyncio.gather(*(task(gates[i % 2]) for i in range(8)))
    finally:
        for gate in gates:
            await gate.aclose()
    records.sort()
    overlaps = sum(1 for a, b in itertools.pairwise(records) if b[0] < a[1])
    return len(records) / seconds, overlaps, len(records)


async def held_at_once(url: str, direct: str, limit: int) -> tuple[int, int]:
    """Turns one gate holds on distinct keys before the next waits over 2 s; server conns."""
    import psycopg

    import inturn

    gate = inturn.Gate.from_url(url, namespace=f"pgb{secrets.token_hex(3)}")
    held = 0
    try:
        async with contextlib.AsyncExitStack() as stack:
            for i in range(limit):
                try:
                    async with asyncio.timeout(2.0):
                        await stack.enter_async_context(gate.turn(f"held-{i}"))
                except (TimeoutError, inturn.InturnError):
                    break
                held += 1
            with psycopg.connect(direct, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                ).fetchone()
            return held, int(row[0]) if row else -1
    finally:
        await gate.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    from tests.servers import PostgresServer

    workdir = Path(tempfile.mkdtemp(prefix="inturn-pgb-"))
    server = PostgresServer().start()
    bouncer = None
    try:
        bouncer, port = start_pgbouncer(server, args.pool_size, workdir)
        urls = {
            "direct": server.dsn,
            f"PgBouncer, transaction mode, pool {args.pool_size}": (
                f"postgresql://postgres@127.0.0.1:{port}/postgres"
            ),
        }
        rows = []
        for label, url in urls.items():
            print(f"# {label}", file=sys.stderr, flush=True)
            us = asyncio.run(cycle_us(url))
            rate, overlaps, total = asyncio.run(contention(url, args.seconds))
            held, conns = asyncio.run(held_at_once(url, server.dsn, 3 * args.pool_size))
            rows.append(
                f"| {label} | {us:,.0f} | {rate:,.0f} | {overlaps} of {total} | {held} | {conns} |"
            )
        pg_version = subprocess.run(
            [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "--version"],
            capture_output=True,
            text=True,
        ).stdout.splitlines()[0]
        print(
            f"`{command()}`: {platform.python_implementation()} {platform.python_version()}, "
            f"psycopg {version('psycopg')}, {pg_version}, {cpu_model()}, {os.cpu_count()} CPUs"
        )
        print()
        print(
            "| connection | turn cycle µs | 8 tasks, 2 gates, one key: acq/s | overlaps | "
            f"turns held at once (of {3 * args.pool_size} asked) | server connections then |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        print("\n".join(rows))
    finally:
        if bouncer is not None:
            bouncer.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                bouncer.wait(timeout=5)
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
