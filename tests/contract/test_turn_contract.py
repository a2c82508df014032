"""The turn's guarantees, checked on every backend, from tasks and threads."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest

import inturn
from inturn.testing import History, check_history

from .conftest import Driver, in_thread


async def test_no_overlap_fifo_and_fences_under_load(driver: Driver) -> None:
    """200 concurrent requests on 20 keys: no overlap, FIFO grants, increasing fences."""
    history = History()
    rng = random.Random(7)
    workers = 200 if driver.mode == "async" else 80

    async def one(i: int) -> None:
        await asyncio.sleep(rng.random() * 0.02)
        await driver.run(f"user-{i % 20}", history, hold=rng.random() * 0.003, worker=f"w{i}")

    await asyncio.gather(*(one(i) for i in range(workers)))
    report = check_history(history.spans)
    assert report.spans == workers
    assert report.keys == 20
    assert await driver.gate.backend.footprint() == 0


async def test_grants_follow_the_order_of_asks(driver: Driver) -> None:
    """Requests that joined one after another are granted in that order."""
    holder = driver.hold("k")
    await holder.wait_granted()
    history = History()
    tasks = []
    for i in range(8):
        tasks.append(asyncio.ensure_future(driver.run("k", history, worker=f"w{i}")))
        await asyncio.sleep(0.02)  # each request is in line before the next asks
    await holder.release()
    await asyncio.gather(*tasks)
    spans = sorted(history.spans, key=lambda s: s.start)
    assert [s.worker for s in spans] == [f"w{i}" for i in range(8)]
    check_history(spans)
    assert all(s.fence > holder.fence for s in spans)


async def test_fences_increase_across_idle_periods(driver: Driver) -> None:
    """A key that went idle (and was forgotten) still gets a larger fence next time."""
    history = History()
    for _ in range(3):
        await driver.run("idle", history)
        assert await driver.gate.backend.footprint() == 0
    fences = [s.fence for s in history.spans]
    assert fences == sorted(fences)
    assert len(set(fences)) == 3


async def test_timed_out_waiter_leaves_the_line(driver: Driver) -> None:
    """A waiter that times out raises TurnTimeout and does not block the one behind it."""
    holder = driver.hold("k")
    await holder.wait_granted()
    history = History()
    loser = asyncio.ensure_future(driver.run("k", history, timeout=0.1, worker="loser"))
    await asyncio.sleep(0.02)
    behind = asyncio.ensure_future(driver.run("k", history, worker="behind"))
    with pytest.raises(inturn.TurnTimeout) as info:
        await loser
    assert isinstance(info.value, TimeoutError)
    assert info.value.key == "k"
    assert info.value.waited == pytest.approx(0.1)
    await holder.release()
    await asyncio.wait_for(behind, 5)
    assert [s.worker for s in history.spans] == ["behind"]
    assert await driver.gate.backend.footprint() == 0


async def test_cancelled_waiter_leaves_the_line(gate: inturn.Gate) -> None:
    """A cancelled waiter (async only: threads cannot be cancelled) frees its place."""
    driver = Driver(gate, "async")
    holder = driver.hold("k")
    await holder.wait_granted()
    history = History()
    first = asyncio.ensure_future(driver.run("k", history, worker="cancelled"))
    await asyncio.sleep(0.02)
    second = asyncio.ensure_future(driver.run("k", history, worker="second"))
    await asyncio.sleep(0.02)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await holder.release()
    await asyncio.wait_for(second, 5)
    assert [s.worker for s in history.spans] == ["second"]
    assert await gate.backend.footprint() == 0


async def test_cancelled_holder_releases(gate: inturn.Gate) -> None:
    """Cancelling the task that holds a turn hands the turn to the next waiter."""
    entered = asyncio.Event()

    async def hold_forever() -> None:
        async with gate.turn("k"):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(hold_forever())
    await entered.wait()
    nxt = asyncio.ensure_future(Driver(gate, "async").run("k", History()))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(nxt, 5)
    assert await gate.backend.footprint() == 0


async def test_timeout_race_with_hand_off_never_strands_the_turn(driver: Driver) -> None:
    """Waiters whose timeout ends just as the turn is handed to them never strand it."""
    history = History()
    for round_ in range(20):
        holder = driver.hold("race")
        await holder.wait_granted()
        racer = asyncio.ensure_future(driver.run("race", history, timeout=0.03, worker="r"))
        await asyncio.sleep(0.03)
        await holder.release()
        # A 30 ms deadline may also end the join itself (BackendUnavailable: "did not
        # answer within the timeout") on a loaded machine; either way nothing is stranded.
        with contextlib.suppress(inturn.TurnTimeout, inturn.BackendUnavailable):
            await racer
        # A failed join leaves the line in the background: give it a moment, not more.
        deadline = time.monotonic() + 2.0
        for _ in range(200):  # polls a count: no event to wait on
            if not await driver.gate.backend.footprint() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        assert await driver.gate.backend.footprint() == 0, f"round {round_}"
    check_history(history.spans)


async def test_turn_nowait_raises_busy_when_held_or_queued(driver: Driver) -> None:
    """turn_nowait raises Busy at once when the key is held or has a line."""
    gate = driver.gate
    holder = driver.hold("k")
    await holder.wait_granted()

    async def nowait() -> None:
        if driver.mode == "async":
            async with gate.turn_nowait("k"):
                pass
        else:

            def run() -> None:
                with gate.turn_nowait_sync("k"):
                    pass

            await in_thread(run)

    with pytest.raises(inturn.Busy) as info:
        await nowait()
    assert info.value.key == "k"
    assert not isinstance(info.value, inturn.TurnTimeout)
    waiter = asyncio.ensure_future(driver.run("k", History()))
    await asyncio.sleep(0.02)
    with pytest.raises(inturn.Busy):
        await nowait()
    await holder.release()
    await waiter
    await nowait()  # free again
    assert await gate.backend.footprint() == 0


async def test_reentrant_within_one_task(driver: Driver) -> None:
    """A holder that asks for its own key's turn again gets the same turn."""
    gate = driver.gate
    if driver.mode == "async":
        async with gate.turn(5) as outer, gate.turn("5", timeout=0) as inner:
            assert inner is outer
            assert await outer.check()
    else:

        def run() -> None:
            with gate.turn_sync(5) as outer, gate.turn_sync("5", timeout=0) as inner:
                assert inner is outer
                assert outer.check()

        await in_thread(run)
    assert await gate.backend.footprint() == 0


async def test_child_task_is_not_the_holder(gate: inturn.Gate) -> None:
    """Re-entrancy is per task: a task the holder starts waits in line like anyone."""
    async with gate.turn("k"):
        child = asyncio.ensure_future(Driver(gate, "async").run("k", History(), timeout=0.05))
        with pytest.raises(inturn.TurnTimeout):
            await child


async def test_check_reports_held(driver: Driver) -> None:
    """turn.check() is True while held; turn.lost is unset."""
    gate = driver.gate
    if driver.mode == "async":
        async with gate.turn("k") as turn:
            assert await turn.check()
            assert not turn.lost.is_set()
            assert turn.fence > 0
    else:

        def run() -> None:
            with gate.turn_sync("k") as turn:
                assert turn.check()
                assert not turn.lost.is_set()

        await in_thread(run)


async def test_async_and_sync_share_one_line(gate: inturn.Gate) -> None:
    """Tasks and threads on one gate contend for the same key without overlap."""
    history = History()
    jobs = []
    for i in range(40):
        d = Driver(gate, "async" if i % 2 else "sync")
        jobs.append(d.run("shared", history, hold=0.002, worker=f"{d.mode}{i}"))
    await asyncio.gather(*jobs)
    check_history(history.spans)
    assert len(history.spans) == 40


async def test_stalled_holder_loses_the_turn_after_the_lease(gate_factory, mode: str) -> None:  # type: ignore[no-untyped-def]
    """A holder that stops renewing loses the turn after `lease`; the waiter goes; lost is set."""
    gate = gate_factory(lease=0.4)
    driver = Driver(gate, mode)
    # a holder that stalls: its own loop is blocked, so it cannot renew
    entered = asyncio.Event()
    turns: list[inturn.Turn] = []

    async def stalled() -> None:
        async with gate.turn("k") as turn:
            turns.append(turn)
            entered.set()
            await asyncio.sleep(0)
            import time

            time.sleep(1.0)  # blocks this event loop: no renewal can run
            await asyncio.sleep(0.05)

    loop_thread_result = in_thread(lambda: asyncio.run(stalled()))
    await asyncio.sleep(0.2)
    history = History()
    t0 = asyncio.get_running_loop().time()
    await asyncio.wait_for(driver.run("k", history, worker="next"), 5)
    waited = asyncio.get_running_loop().time() - t0
    assert waited < 0.9, "the waiter should not wait for the stalled holder's body"
    await loop_thread_result
    assert turns[0].lost.is_set()
    assert turns[0].lost_reason == "expired"
    await gate.aclose()
