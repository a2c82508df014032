"""Dedup windows: at most once per (key, scope, id) within the window; failures retry."""

from __future__ import annotations

import asyncio
import threading

import pytest

import inturn


async def test_concurrent_duplicates_run_exactly_once(gate: inturn.Gate) -> None:
    """Ten concurrent calls with one message id: the body runs once, the rest get its result."""
    runs: list[int] = []

    @gate.serialize(key="user", dedup="msg")
    async def reply(user: int, msg: int) -> str:
        runs.append(msg)
        await asyncio.sleep(0.01)
        return f"answer to {msg}"

    results = await asyncio.gather(*(reply(1, 42) for _ in range(10)))
    assert runs == [42]
    assert results == ["answer to 42"] * 10


async def test_failed_claim_can_be_retried(gate: inturn.Gate) -> None:
    """A call that raised leaves its id free: the retry runs."""
    attempts = 0

    @gate.serialize(key="user", dedup="msg")
    async def flaky(user: int, msg: int) -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("LLM timed out")
        return attempts

    with pytest.raises(RuntimeError):
        await flaky(1, 7)
    assert await flaky(1, 7) == 2
    assert await flaky(1, 7) == 2  # now done: the stored result, no third run
    assert attempts == 2


async def test_window_expiry_lets_the_id_run_again(gate: inturn.Gate) -> None:
    """After the window an id is new again."""
    runs = 0

    @gate.serialize(key="user", dedup="msg", window=0.3)
    async def once(user: int, msg: int) -> None:
        nonlocal runs
        runs += 1

    await once(1, 1)
    await once(1, 1)
    assert runs == 1
    await asyncio.sleep(0.45)
    await once(1, 1)
    assert runs == 2


async def test_ids_are_scoped_per_user_and_per_function(gate: inturn.Gate) -> None:
    """One user's id never suppresses another user's message, nor another function's."""
    seen: list[tuple[str, int]] = []

    @gate.serialize(key="user", dedup="msg")
    async def a(user: int, msg: int) -> None:
        seen.append(("a", user))

    @gate.serialize(key="user", dedup="msg")
    async def b(user: int, msg: int) -> None:
        seen.append(("b", user))

    await a(1, 99)
    await a(2, 99)
    await b(1, 99)
    await a(1, 99)
    assert seen == [("a", 1), ("a", 2), ("b", 1)]


async def test_unstorable_result_raises_duplicate(gate: inturn.Gate) -> None:
    """A duplicate of a call whose result is not JSON raises Duplicate(state="done")."""

    @gate.serialize(key="user", dedup="msg")
    async def make(user: int, msg: int) -> object:
        return object()

    await make(1, 1)
    with pytest.raises(inturn.Duplicate) as info:
        await make(1, 1)
    assert info.value.state == "done"
    assert not info.value.has_result
    assert info.value.key == "1"
    assert info.value.id == "1"


async def test_none_id_is_not_deduplicated(gate: inturn.Gate) -> None:
    """A call without a message id (a proactive message) always runs."""
    runs = 0

    @gate.serialize(key="user", dedup="msg")
    async def send(user: int, msg: int | None = None) -> None:
        nonlocal runs
        runs += 1

    await send(1)
    await send(1)
    assert runs == 2


async def test_claim_in_progress_is_a_duplicate(gate: inturn.Gate) -> None:
    """Outside a turn, a second claim while the first runs raises Duplicate(in_progress)."""
    dedup = gate.dedup("jobs")
    async with dedup.claim("u", "m1"):
        with pytest.raises(inturn.Duplicate) as info:
            async with dedup.claim("u", "m1"):
                pass
        assert info.value.state == "in_progress"


async def test_dead_claimant_is_replaced_after_its_lease(gate: inturn.Gate) -> None:
    """A claim whose claimant died (never finished) is taken over once its lease lapses."""
    store = gate.backend
    assert isinstance(store, inturn.DedupBackend)
    found = await store.claim("u", "s", "m", "dead-token", fence=None, lease=0.2, window=60)
    assert found.state == "new"
    again = await store.claim("u", "s", "m", "live-token", fence=None, lease=0.2, window=60)
    assert again.state == "in_progress"
    await asyncio.sleep(0.3)
    after = await store.claim("u", "s", "m", "live-token", fence=None, lease=0.2, window=60)
    assert after.state == "new"


async def test_newer_fence_takes_over_at_once(gate: inturn.Gate) -> None:
    """A claimant holding the key's turn with a greater fence replaces a stale claim at once."""
    store = gate.backend
    assert isinstance(store, inturn.DedupBackend)
    await store.claim("u", "s", "m", "old", fence=10, lease=60, window=60)
    same = await store.claim("u", "s", "m", "other", fence=10, lease=60, window=60)
    assert same.state == "in_progress"
    newer = await store.claim("u", "s", "m", "new", fence=11, lease=60, window=60)
    assert newer.state == "new"
    await store.finish("u", "s", "m", "old", '"stale"', window=60)  # the old one finishes late
    done = await store.claim("u", "s", "m", "third", fence=11, lease=60, window=60)
    assert done.state == "in_progress"  # the stale finish was refused


async def test_sync_dedup_in_threads_runs_once(gate: inturn.Gate) -> None:
    """The sync twin: eight threads with one id, one run."""
    runs: list[int] = []
    lock = threading.Lock()

    @gate.serialize(key="user", dedup="msg")
    def reply(user: int, msg: int) -> int:
        with lock:
            runs.append(msg)
        return msg * 2

    results: list[int] = []

    def call() -> None:
        results.append(reply(3, 21))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        await asyncio.to_thread(t.join, 30)
    assert runs == [21]
    assert results == [42] * 8


def test_content_id_is_stable() -> None:
    """The content-hash helper: same parts, same id; different parts, different id."""
    assert inturn.content_id(1, "hi") == inturn.content_id(1, "hi")
    assert inturn.content_id(1, "hi") != inturn.content_id(2, "hi")
    assert len(inturn.content_id("x")) == 64
