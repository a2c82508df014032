"""Replies nobody waits for do not wake the event loop while a holder of this loop sleeps.

A release that hands the turn to a task of its own loop does not await its reply, and a
task that queues behind another of the loop's waiters cannot be granted at once: both
replies are *lazy*. Read as they arrive, they woke the loop in the middle of the new
holder's ``await asyncio.sleep(...)``, and asyncio then slept the rest rounded up to whole
milliseconds: every turn ran late by a fraction of a millisecond. These tests watch the
loop's own selector.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import selectors
import time
from typing import Any

import inturn
from inturn._backends.redis._replies import QUIET_FOR
from tests.servers import RedisServer

TASKS = 4
CYCLES = 25
"""Turns per task."""
HOLD = 0.005


class WatchedSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The loop's selector, noting when a wait ended because a socket was ready."""

    def __init__(self) -> None:
        super().__init__()
        self.io_wakes: list[float] = []

    def select(self, timeout: float | None = None) -> Any:
        ready = super().select(timeout)
        if ready:
            self.io_wakes.append(time.monotonic())
        return ready


def _run(coro_fn: Any, selector: WatchedSelector) -> Any:
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        return runner.run(coro_fn())


def test_a_holders_sleep_is_not_woken_by_replies_nobody_waits_for(
    redis_server: RedisServer,
) -> None:
    selector = WatchedSelector()
    holds: list[tuple[float, float]] = []

    async def main() -> None:
        gate = inturn.Gate.from_url(redis_server.url, namespace=f"lazy{secrets.token_hex(3)}")
        key = "user-1"

        async def contender() -> None:
            for _ in range(CYCLES):
                async with gate.turn(key):
                    began = time.monotonic()
                    await asyncio.sleep(HOLD)
                    holds.append((began, time.monotonic()))

        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(contender() for _ in range(TASKS)))
        finally:
            await gate.aclose()

    _run(main, selector)
    holds.sort()
    assert len(holds) == TASKS * CYCLES
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(holds))  # one at a time
    woken = [
        (began, ended)
        for began, ended in holds[TASKS:]  # after the start, when every task joins at once
        if any(began < at < ended - 0.0002 for at in selector.io_wakes)
    ]
    # Only the backstop that reads lazy replies every QUIET_FOR seconds may land in a hold:
    # before, a reply woke the loop in every one of them.
    backstop = (holds[-1][1] - holds[TASKS][0]) / QUIET_FOR + 2
    assert len(woken) <= backstop, (len(woken), len(holds) - TASKS)


def test_lazy_replies_are_read_within_the_backstop(redis_server: RedisServer) -> None:
    """Nothing wakes the loop while the holder sleeps for long: the waiters' lazy JOIN
    replies are still read, within QUIET_FOR seconds."""
    selector = WatchedSelector()

    async def main() -> None:
        gate = inturn.Gate.from_url(redis_server.url, namespace=f"lazy{secrets.token_hex(3)}")
        key = "user-2"
        order: list[int] = []

        async def waiter(n: int) -> None:
            async with gate.turn(key):
                order.append(n)

        try:
            async with asyncio.timeout(30):
                async with gate.turn(key):
                    waiters = [asyncio.create_task(waiter(0))]
                    await asyncio.sleep(0.05)  # its JOIN answered: it waits in line
                    # Behind a waiter of this loop's, these JOINs are lazy: nothing reads
                    # their replies until the backstop does.
                    waiters += [asyncio.create_task(waiter(n)) for n in (1, 2)]
                    await asyncio.sleep(0)
                    mux = gate._runtime.backend._state().mux  # type: ignore[attr-defined]
                    assert mux is not None
                    assert mux._link is not None
                    sent = time.monotonic()
                    while mux._link.pending:
                        assert time.monotonic() - sent < QUIET_FOR * 5, "lazy replies unread"
                        await asyncio.sleep(0.01)
                await asyncio.gather(*waiters)
            assert order == [0, 1, 2]
        finally:
            await gate.aclose()

    _run(main, selector)


def test_a_holder_that_ends_at_once_does_not_wait_for_the_backstop(
    redis_server: RedisServer,
) -> None:
    """A turn handed over in the loop is confirmed by a lazy reply. A holder whose body ends
    before that reply came waits for it: the connection must then be read again at once,
    or every such hand-over stalls until the backstop (QUIET_FOR)."""
    selector = WatchedSelector()
    turns = 4 * 50

    async def main() -> float:
        gate = inturn.Gate.from_url(redis_server.url, namespace=f"lazy{secrets.token_hex(3)}")

        async def contender() -> None:
            for _ in range(turns // 4):
                async with gate.turn("user-3"):
                    pass

        try:
            async with asyncio.timeout(120):
                began = time.monotonic()
                await asyncio.gather(*(contender() for _ in range(4)))
                return time.monotonic() - began
        finally:
            await gate.aclose()

    took = _run(main, selector)
    # A stall per hand-over would take turns * QUIET_FOR (20 s); the turns take well under 1 s.
    assert took < turns * QUIET_FOR / 4, took
