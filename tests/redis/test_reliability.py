"""Redis reliability: call order in a fresh event loop, fork safety, lost replies,
replica waits, and the turn layer's fixes under real faults.

Every test runs against real servers on loopback and is bounded in time.
"""

from __future__ import annotations

import asyncio
import secrets

import inturn


def _namespace() -> str:
    return f"r{secrets.token_hex(4)}"


# -- 1. a fresh event loop keeps the order of its first calls ---------------------------


def _first_calls_in_order(url: str, runs: int) -> int:
    """In a fresh loop per run: turn() then, at once, turn_nowait(); count the overtakes."""
    overtaken = 0
    for _ in range(runs):

        async def main() -> bool:
            gate = inturn.Gate.from_url(url, namespace=_namespace())
            held = asyncio.Event()
            done = asyncio.Event()

            async def first() -> None:
                async with gate.turn("k"):
                    held.set()
                    await done.wait()

            task = asyncio.ensure_future(first())
            await asyncio.sleep(0)  # the turn() has started: its JOIN is on its way
            try:
                async with gate.turn_nowait("k"):
                    got = True
            except inturn.Busy:
                got = False
            done.set()
            await task
            await gate.aclose()
            return got

        overtaken += asyncio.run(main())
    return overtaken


def test_fresh_loop_nowait_does_not_overtake_turn(redis_url: str) -> None:
    """The turn() was called first: the nowait finds the key busy, every run."""
    assert _first_calls_in_order(redis_url, 30) == 0


def test_fresh_process_nowait_does_not_overtake_turn(redis_url: str) -> None:
    """The same in fresh processes (nothing warmed up: imports, scripts, connections)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        results = pool.starmap(_first_calls_in_order, [(redis_url, 3)] * 4)
    assert sum(results) == 0
