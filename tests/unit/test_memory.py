"""The in-memory backend's own promises: leases on an injectable clock, no leak."""

from __future__ import annotations

import asyncio
import time

import pytest

import inturn
from inturn import MemoryBackend


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_lapsed_lease_hands_off_on_the_injected_clock() -> None:
    """A holder that stops renewing loses the turn once `lease` has passed; renew then fails."""
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    first = await backend.join("k", "a", 5.0)
    assert first is not None
    assert await backend.try_acquire("k", "b", 5.0) is None
    clock.now += 4.9
    assert await backend.renew("k", "a", 5.0)
    clock.now += 4.9
    assert await backend.is_held("k", "a")
    clock.now += 0.2
    assert not await backend.is_held("k", "a")
    assert not await backend.renew("k", "a", 5.0)
    second = await backend.try_acquire("k", "b", 5.0)
    assert second is not None
    assert second.fence > first.fence
    await backend.release("k", "a")  # a stale release is ignored
    assert await backend.is_held("k", "b")
    await backend.release("k", "b")
    assert await backend.footprint() == 0


async def test_lapsed_lease_goes_to_the_head_of_the_line() -> None:
    """When the holder lapses, the first waiter gets the turn, not a newcomer."""
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    assert await backend.join("k", "holder", 1.0) is not None
    assert await backend.join("k", "w1", 1.0) is None
    clock.now += 2
    assert await backend.try_acquire("k", "newcomer", 1.0) is None
    grant = await backend.wait("k", "w1", 0)
    assert grant is not None
    await backend.release("k", "w1")
    assert await backend.footprint() == 0


async def test_no_leak_after_100k_distinct_keys() -> None:
    """100,000 keys each had a turn; the backend keeps zero per-key entries afterwards."""
    gate = inturn.Gate()
    for i in range(100_000):
        async with gate.turn(i):
            pass
    assert await gate.backend.footprint() == 0
    assert gate.backend._core._keys == {}  # type: ignore[attr-defined]


async def test_no_leak_with_lines_and_timeouts() -> None:
    """Contended keys with timed-out and cancelled waiters leave nothing behind."""
    gate = inturn.Gate(lease=60.0)

    async def one(i: int) -> None:
        try:
            async with gate.turn(i % 50, timeout=0.001 if i % 3 == 0 else None):
                await asyncio.sleep(0.0005)
        except inturn.TurnTimeout:
            pass

    tasks = [asyncio.ensure_future(one(i)) for i in range(2000)]
    await asyncio.sleep(0.01)
    for t in tasks[::7]:
        t.cancel()
    # A turn stranded by a cleanup race would hold its key until the 60 s lease lapsed.
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
    assert await gate.backend.footprint() == 0


async def test_on_lost_cancel_raises_lease_lost() -> None:
    """on_lost="cancel": the body is cancelled when max_hold passes; LeaseLost is raised."""
    gate = inturn.Gate(lease=5.0, on_lost="cancel")
    started = time.monotonic()
    with pytest.raises(inturn.LeaseLost) as info:
        async with gate.turn("k", max_hold=0.2) as turn:
            await asyncio.sleep(10)
    assert time.monotonic() - started < 2
    assert info.value.reason == "max_hold"
    assert info.value.key == "k"
    assert turn.lost.is_set()
    assert await gate.backend.footprint() == 0


async def test_on_lost_warn_does_not_interrupt(caplog: pytest.LogCaptureFixture) -> None:
    """Default on_lost: the body runs on, leaving does not raise, a WARNING names key and fence."""
    gate = inturn.Gate(lease=5.0)
    async with gate.turn("k", max_hold=0.1) as turn:
        await asyncio.sleep(0.3)
        assert turn.lost.is_set()
        assert turn.lost_reason == "max_hold"
        assert not await turn.check()
    record = next(r for r in caplog.records if r.levelname == "WARNING")
    assert "'k'" in record.getMessage()
    assert f"fence {turn.fence}" in record.getMessage()
    assert record.inturn_fence == turn.fence  # type: ignore[attr-defined]


async def test_max_hold_frees_the_key_for_the_next_waiter() -> None:
    """A hung body cannot hold a key past max_hold: the next waiter proceeds."""
    gate = inturn.Gate(lease=5.0, max_hold=0.2)
    entered = asyncio.Event()

    async def hung() -> None:
        async with gate.turn("k"):
            entered.set()
            await asyncio.sleep(1.0)

    task = asyncio.ensure_future(hung())
    await entered.wait()
    t0 = time.monotonic()
    async with gate.turn("k", timeout=0.9) as turn:
        assert time.monotonic() - t0 < 0.6
        assert turn.fence > 1
    await task


def test_sync_on_lost_cancel_raises_at_exit() -> None:
    """A thread cannot be interrupted: with on_lost="cancel" the block raises LeaseLost on exit."""
    gate = inturn.Gate(lease=5.0, on_lost="cancel")
    with pytest.raises(inturn.LeaseLost), gate.turn_sync("k", max_hold=0.1) as turn:
        time.sleep(0.3)
        assert turn.lost.is_set()


def test_sync_renewal_keeps_a_long_turn() -> None:
    """The background renewer keeps a turn alive well past its lease."""
    gate = inturn.Gate(lease=0.3)
    with gate.turn_sync("k") as turn:
        time.sleep(1.0)
        assert turn.check()
        assert not turn.lost.is_set()
    assert gate.sync_backend.footprint() == 0


async def test_async_renewal_keeps_a_long_turn() -> None:
    gate = inturn.Gate(lease=0.3)
    async with gate.turn("k") as turn:
        await asyncio.sleep(1.0)
        assert await turn.check()
        assert not turn.lost.is_set()


def test_a_memory_gate_refuses_to_work_after_fork() -> None:
    """A memory:// gate made before fork() raises in the child (it would exclude nothing,
    and its lock may be held by a parent thread), naming the fix."""
    import os

    gate = inturn.Gate.from_url("memory://", namespace="fork-check")
    with gate.turn_sync("warm"):
        pass
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what turn_sync did, exit without cleanup
        try:
            with gate.turn_sync("k", timeout=1):
                outcome = b"ran"
        except inturn.ConfigurationError as exc:
            outcome = b"refused: " + str(exc).encode()[:200]
        except BaseException as exc:
            outcome = repr(exc).encode()[:200]
        os.write(write, outcome)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read()
    os.waitpid(pid, 0)
    assert outcome.startswith(b"refused: "), outcome
    assert b"after the fork" in outcome
    with gate.turn_sync("k"):  # the parent's gate still works
        pass
    gate.close()
