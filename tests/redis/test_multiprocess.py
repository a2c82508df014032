"""The Redis turn across OS processes: histories, a killed holder, many waiters."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from pathlib import Path

import pytest
import redis

import inturn
from inturn.testing import History, check_history
from tests._contender import spawn


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_processes_never_overlap_and_grant_in_order(
    redis_url: str, tmp_path: Path, mode: str
) -> None:
    """4 processes x 20 contenders on 5 keys: no overlap, FIFO grants, increasing fences."""
    namespace = f"mp{secrets.token_hex(4)}"
    outs = [tmp_path / f"w{i}.jsonl" for i in range(4)]
    procs = [spawn(mode, redis_url, namespace, str(out), "5", "20", "6") for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
    spans = History.load(*outs)
    report = check_history(spans)
    assert report.spans == 4 * 20 * 6
    assert report.keys == 5
    assert len({s.worker.split("-")[0] for s in spans}) == 4
    with redis.Redis.from_url(redis_url) as client:
        left = list(client.scan_iter(match=f"inturn:{namespace}:*"))
    assert left == [f"inturn:{namespace}:fence".encode()]  # nothing per user: one shared floor


async def test_killed_holder_is_replaced_within_lease_and_one_renewal(redis_url: str) -> None:
    """SIGKILL the holder's process: the head waiter goes within lease + one renewal interval."""
    namespace = f"kill{secrets.token_hex(4)}"
    lease = 1.0
    proc = spawn("hold", redis_url, namespace, "victim", str(lease))
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert line.startswith("held "), line + (proc.stderr.read() if proc.stderr else "")
        dead_fence = int(line.split()[1])
        gate = inturn.Gate.from_url(redis_url, namespace=namespace, lease=lease)
        waiter = asyncio.ensure_future(gate.turn("victim", timeout=10).__aenter__())
        await asyncio.sleep(0.3)  # the waiter is in line
        assert not waiter.done()
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        turn = await waiter
        recovered = time.monotonic() - killed_at
        assert turn.fence > dead_fence
        # the lease had up to `lease` left at the kill; the waiter re-checks when it lapses
        assert recovered <= lease + lease / 3 + 0.3, recovered
        await gate.backend.release("victim", turn._token)
        await gate.aclose()
    finally:
        proc.kill()
        proc.communicate()


async def test_400_waiters_in_one_process_share_a_bounded_pool(redis_url: str) -> None:
    """400 waiters on one key in one process: all served in order over few connections."""
    with redis.Redis.from_url(redis_url) as admin:
        before = len(admin.client_list())  # other tests' gates may still hold connections
    gate = inturn.Gate.from_url(redis_url, namespace=f"many{secrets.token_hex(4)}")
    history = History()
    peak = 0

    async def one(i: int) -> None:
        async with gate.turn("hot", timeout=60) as turn:
            with history.span(turn, f"w{i}"):
                await asyncio.sleep(0)

    async with gate.turn("hot"):
        tasks = [asyncio.ensure_future(one(i)) for i in range(400)]
        await asyncio.sleep(0.5)
        with redis.Redis.from_url(redis_url) as admin:
            peak = len(admin.client_list()) - before
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    check_history(history.spans)
    assert len(history.spans) == 400
    from inturn._backends.redis._shared import MAX_CONNECTIONS

    assert peak <= MAX_CONNECTIONS + 1  # the pool, plus one subscribed connection
    await gate.aclose()


async def test_fences_grow_across_an_emptied_server(redis_url: str) -> None:
    """After FLUSHALL (a restart without persistence) fences still exceed earlier ones."""
    gate = inturn.Gate.from_url(redis_url, namespace=f"f{secrets.token_hex(4)}")
    async with gate.turn("k") as first:
        pass
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()
    async with gate.turn("k") as second:
        pass
    assert second.fence > first.fence
    assert second.fence < 2**53
    await gate.aclose()


async def test_a_waiter_that_was_declared_dead_joins_again(redis_url: str) -> None:
    """A waiter whose liveness mark lapsed (a long pause) is skipped, re-joins, is served."""
    namespace = f"d{secrets.token_hex(4)}"
    gate = inturn.Gate.from_url(redis_url, namespace=namespace, lease=0.6)
    holder = await gate.turn("k").__aenter__()
    waiter = asyncio.ensure_future(gate.turn("k", timeout=10).__aenter__())
    await asyncio.sleep(0.1)
    # Erase the waiter's liveness mark as if it had paused past it.
    with redis.Redis.from_url(redis_url) as client:
        (wkey,) = [k for k in client.scan_iter(match=f"inturn:{namespace}:*") if k.endswith(b"}:w")]
        client.delete(wkey)
    await gate.backend.release("k", holder._token)
    turn = await asyncio.wait_for(waiter, 5)
    assert turn.fence > holder.fence
    await gate.backend.release("k", turn._token)
    assert await gate.backend.footprint() == 0
    await gate.aclose()
