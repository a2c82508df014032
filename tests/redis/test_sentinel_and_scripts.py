"""The Redis turn through a Sentinel URL, and after the server lost its script cache."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio.sentinel
import redis.sentinel

import inturn
from inturn.testing import History, check_history
from tests.servers import RedisSentinel

TASKS, THREADS, ROUNDS = 6, 3, 5
KEYS = ("alice", "bob")


async def _contend(gate: inturn.Gate, history: History, tag: str) -> int:
    """TASKS tasks and THREADS threads take ROUNDS turns each on KEYS; returns the turns taken."""

    async def task(i: int) -> None:
        for _ in range(ROUNDS):
            async with gate.turn(KEYS[i % len(KEYS)], timeout=20) as turn:
                with history.span(turn, f"{tag}-task{i}"):
                    await asyncio.sleep(0.002)

    def thread(i: int) -> None:
        for _ in range(ROUNDS):
            with (
                gate.turn_sync(KEYS[i % len(KEYS)], timeout=20) as turn,
                history.span(turn, f"{tag}-thread{i}"),
            ):
                time.sleep(0.002)

    # One sync turn first: concurrent first calls of turn_sync race to build the sync twin
    # (test_concurrent_first_sync_turns_build_one_sync_client below).
    await asyncio.to_thread(_sync_cycle, gate)
    threads = [threading.Thread(target=thread, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(task(i) for i in range(TASKS))), 30)
    finally:
        for t in threads:
            await asyncio.to_thread(t.join, 30)
    assert not any(t.is_alive() for t in threads)
    return (TASKS + THREADS) * ROUNDS


@pytest.fixture
def sentinel_managers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records every redis-py `Sentinel` the test makes (the gate must close them itself)."""
    made: list[Any] = []

    class AsyncRecorded(redis.asyncio.sentinel.Sentinel):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            made.append(self)

    class SyncRecorded(redis.sentinel.Sentinel):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            made.append(self)

    monkeypatch.setattr(redis.asyncio.sentinel, "Sentinel", AsyncRecorded)
    monkeypatch.setattr(redis.sentinel, "Sentinel", SyncRecorded)
    return made


async def test_sentinel_url_serves_turns_async_and_sync(
    redis_sentinel: RedisSentinel, redis_url: str, sentinel_managers: list[Any]
) -> None:
    """redis+sentinel:// resolves the primary; tasks and threads never overlap; nothing is left."""
    namespace = f"sen{secrets.token_hex(4)}"
    gate = inturn.Gate.from_url(redis_sentinel.url, namespace=namespace)
    try:
        history = History()
        taken = await _contend(gate, history, "sentinel")
        assert check_history(history.spans).spans == taken
        assert await gate.backend.footprint() == 0
    finally:
        await gate.aclose()
    assert len(sentinel_managers) == 2  # the URL went through Sentinel, async and sync
    # The turns ran on the primary the sentinel named: their fence floor is there.
    with redis.Redis.from_url(redis_url) as primary:
        floors = list(primary.scan_iter(match=f"inturn:{namespace}:*"))
    assert floors == [f"inturn:{namespace}:fence".encode()]


async def test_aclose_closes_the_connections_to_the_sentinel(
    redis_sentinel: RedisSentinel, redis_url: str, sentinel_managers: list[Any]
) -> None:
    """After gate.aclose() the sentinel has no connection left from the gate (async or sync)."""
    before = redis_sentinel.client_count()
    gate = inturn.Gate.from_url(redis_sentinel.url, namespace=f"sc{secrets.token_hex(4)}")
    try:
        async with gate.turn("k", timeout=10):
            pass
        await asyncio.to_thread(_sync_cycle, gate)
        assert redis_sentinel.client_count() > before
    finally:
        await gate.aclose()
    for _ in range(40):  # the server sees a closed socket a moment later: up to 2 s
        if redis_sentinel.client_count() <= before:
            break
        await asyncio.sleep(0.05)
    assert redis_sentinel.client_count() <= before


def test_concurrent_first_sync_turns_build_one_sync_client(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads whose first turn_sync calls race still share one sync client (one pool)."""
    pools: list[object] = []
    make_pool = redis.BlockingConnectionPool.from_url

    def slow_pool(*args: Any, **kwargs: Any) -> Any:
        pools.append(args)
        time.sleep(0.1)  # widens the window in which the other threads ask for the twin too
        return make_pool(*args, **kwargs)

    monkeypatch.setattr(redis.BlockingConnectionPool, "from_url", slow_pool)
    gate = inturn.Gate.from_url(redis_url, namespace=f"tw{secrets.token_hex(4)}")
    start = threading.Barrier(4)

    def first_turn() -> None:
        start.wait(timeout=10)
        _sync_cycle(gate)

    threads = [threading.Thread(target=first_turn, daemon=True) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    finally:
        gate.close()
    assert len(pools) == 1


def _sync_cycle(gate: inturn.Gate) -> None:
    with gate.turn_sync("k", timeout=10):
        pass


def _script_counts(admin: redis.Redis) -> tuple[int, int, int, int]:
    """(EVALSHA calls, EVALSHA calls that failed, SCRIPT LOAD calls, EVAL calls) so far."""
    stats = admin.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {})
    load = stats.get("cmdstat_script|load", {})
    return (
        int(evalsha.get("calls", 0)),
        int(evalsha.get("failed_calls", 0)),
        int(load.get("calls", 0)),
        int(stats.get("cmdstat_eval", {}).get("calls", 0)),
    )


def _delta(admin: redis.Redis, run: Callable[[], object]) -> tuple[int, ...]:
    before = _script_counts(admin)
    run()
    after = _script_counts(admin)
    return tuple(a - b for a, b in zip(after, before, strict=True))


async def test_turns_work_after_script_flush_async_and_sync(redis_url: str) -> None:
    """SCRIPT FLUSH between turns: the same gate reloads its scripts; one EVALSHA per step."""
    gate = inturn.Gate.from_url(redis_url, namespace=f"nos{secrets.token_hex(4)}")
    admin = redis.Redis.from_url(redis_url)
    loop = asyncio.get_running_loop()

    def async_cycle() -> None:
        async def cycle() -> None:
            async with gate.turn("k", timeout=10):
                pass

        asyncio.run_coroutine_threadsafe(cycle(), loop).result(timeout=10)

    def sync_cycle() -> None:
        _sync_cycle(gate)

    try:
        history = History()
        await _contend(gate, history, "before")  # connects, subscribes, loads every script used
        # After a flush, both twins (on connections of their own: the async pipelined one,
        # the sync stack) send EVALSHA -> NOSCRIPT, then EVAL, which loads the script: +1
        # round trip per script.
        expected_after_flush = {"async": (2, 2, 0, 2), "sync": (2, 2, 0, 2)}
        for name, cycle in (("async", async_cycle), ("sync", sync_cycle)):
            # Counted from a thread, so that the loop stays free to run the async turns.
            fast = await asyncio.to_thread(_delta, admin, cycle)
            assert fast == (2, 0, 0, 0), (name, "fast path: JOIN + RELEASE, one round trip each")
            admin.script_flush()
            flushed = await asyncio.to_thread(_delta, admin, cycle)
            assert flushed == expected_after_flush[name], (name, "after a flush")
            again = await asyncio.to_thread(_delta, admin, cycle)
            assert again == (2, 0, 0, 0), (name, "reloaded: back to one round trip each")
        admin.script_flush()  # now under contention, with hand-offs, from tasks and threads
        taken = await _contend(gate, history, "after")
        assert check_history(history.spans).spans == 2 * taken
        assert await gate.backend.footprint() == 0
    finally:
        admin.close()
        await gate.aclose()
