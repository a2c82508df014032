"""Several OS processes contend for keys through one PostgreSQL: exclusion, fences, kills."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest

import inturn
from inturn.testing import History, check_history
from tests._contender import spawn

from .conftest import advisory_holders, advisory_waiters, until


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_processes_never_overlap(
    postgres_dsn: str, admin: psycopg.Connection, tmp_path: Path, mode: str
) -> None:
    """4 processes x 10 contenders on 3 keys: no overlap, increasing fences, FIFO per process."""
    namespace = f"mp{secrets.token_hex(4)}"
    outs = [tmp_path / f"w{i}.jsonl" for i in range(4)]
    procs = [spawn(mode, postgres_dsn, namespace, str(out), "3", "10", "5") for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
    spans = History.load(*outs)
    # Across processes grants alternate between the processes' heads (not strict FIFO) ...
    report = check_history(spans, fifo=False)
    assert report.spans == 4 * 10 * 5
    assert report.keys == 3
    # ... within a process they follow the order of asks exactly.
    by_process: dict[str, list[inturn.testing.Span]] = defaultdict(list)
    for span in spans:
        by_process[span.worker.split("-")[0]].append(span)
    assert len(by_process) == 4
    for own in by_process.values():
        check_history(own)
    assert advisory_waiters(admin) == 0
    assert advisory_holders(admin) == []


async def test_killed_holder_process_releases_at_once(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """SIGKILL the holder's process: its connection drops, the waiter goes long before the lease."""
    namespace = f"kill{secrets.token_hex(4)}"
    proc = spawn("hold", postgres_dsn, namespace, "victim", "30")
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert line.startswith("held "), line + (proc.stderr.read() if proc.stderr else "")
        dead_fence = int(line.split()[1])
        gate = inturn.Gate.from_url(postgres_dsn, namespace=namespace, lease=30)
        request = gate.turn("victim", timeout=10)
        waiter = asyncio.ensure_future(request.__aenter__())
        await asyncio.to_thread(until, lambda: advisory_waiters(admin) == 1)
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        turn = await asyncio.wait_for(waiter, 10)
        recovered = time.monotonic() - killed_at
        assert turn.fence > dead_fence
        assert recovered < 2.0, recovered  # the lease is 30 s: the dropped connection did it
        await request.__aexit__(None, None, None)
        assert await gate.backend.footprint() == 0
        await gate.aclose()
    finally:
        proc.kill()
        proc.communicate()
