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


# -- 2. a gate made before fork(): each child has its own channel ------------------------


def _contend(gate: inturn.Gate, key: str, threads: int, seconds: float) -> float:
    """Threads pass ``key``'s turn around (20 ms turns) for ``seconds``; the longest wait."""
    import threading
    import time

    waits: list[float] = []
    failures: list[BaseException] = []
    end = time.monotonic() + seconds

    def worker() -> None:
        try:
            work()
        except BaseException as exc:
            failures.append(exc)

    def work() -> None:
        while time.monotonic() < end:
            asked = time.monotonic()
            with gate.turn_sync(key, timeout=10):
                waits.append(time.monotonic() - asked)
                time.sleep(0.02)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(20)
    if failures:
        raise failures[0]
    return max(waits)


def test_gate_made_before_fork_serves_each_child(redis_url: str) -> None:
    """Two children of one parent's gate contend for a key with threads: nobody starves.

    With a channel shared by the children, one child took the other's waiters in the
    line for its own and passed the turn among its own threads (a wait of 5 s behind
    20 ms turns).
    """
    import json
    import os

    gate = inturn.Gate.from_url(redis_url, namespace=_namespace())
    children: list[tuple[int, int]] = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read)
            code = 1
            try:
                longest = _contend(gate, "k", threads=3, seconds=2.0)
                os.write(write, json.dumps(longest).encode())
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write)
        children.append((pid, read))
    longest = []
    for pid, read in children:
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        longest.append(json.loads(data))
    assert max(longest) < 1.0, longest
