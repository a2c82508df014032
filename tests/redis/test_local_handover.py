"""The in-loop hand-over: a release starts the loop's own next waiter before the server replies.

It may do so only when everyone ahead of that waiter in the server's line is of the same
event loop (JOIN says "solo"), with fence = the holder's + 1, and the release script must
confirm exactly that grant; a refused grant is reported as a lost turn.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

import pytest
import redis.asyncio

import inturn
from inturn._redis import RedisBackend, _text
from inturn.testing import History, check_history
from tests.servers import RedisServer


def _namespace() -> str:
    return f"h{secrets.token_hex(4)}"


class _Order:
    """Bodies that record who ran, in order, with their fences."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, int]] = []
        self.history = History()

    async def body(self, gate: inturn.Gate, key: str, name: str, joined: asyncio.Event) -> None:
        request = gate.turn(key, timeout=10)
        task = asyncio.ensure_future(request.__aenter__())
        await asyncio.sleep(0.05)  # its JOIN has reached the server
        joined.set()
        turn = await task
        try:
            with self.history.span(turn):
                self.ran.append((name, turn.fence))
                await asyncio.sleep(0.01)
        finally:
            await request.__aexit__(None, None, None)


async def test_waiters_of_one_loop_are_handed_the_turn_with_consecutive_fences(
    redis_url: str,
) -> None:
    """Holder and waiters in one loop: each hand-over is in-loop (fence + 1), in FIFO order."""
    gate = inturn.Gate.from_url(redis_url, namespace=_namespace())
    order = _Order()
    try:
        async with gate.turn("k") as first:
            joined = [asyncio.Event() for _ in range(5)]
            tasks = []
            for i, event in enumerate(joined):
                tasks.append(asyncio.ensure_future(order.body(gate, "k", f"w{i}", event)))
                await event.wait()
        await asyncio.gather(*tasks)
        assert [name for name, _ in order.ran] == [f"w{i}" for i in range(5)]
        fences = [first.fence] + [fence for _, fence in order.ran]
        assert fences == list(range(first.fence, first.fence + 6))  # no server-clock jumps
        check_history(order.history.spans)
    finally:
        await gate.aclose()


async def test_a_waiter_from_elsewhere_ahead_keeps_its_place(redis_url: str) -> None:
    """Loop A holds; B (another process's gate) joins, then A's own waiter: B goes first."""
    namespace = _namespace()
    here = inturn.Gate.from_url(redis_url, namespace=namespace)
    elsewhere = inturn.Gate.from_url(redis_url, namespace=namespace)  # its own channel
    order = _Order()
    try:
        async with here.turn("k") as first:
            remote_joined, local_joined = asyncio.Event(), asyncio.Event()
            remote = asyncio.ensure_future(order.body(elsewhere, "k", "remote", remote_joined))
            await remote_joined.wait()
            local = asyncio.ensure_future(order.body(here, "k", "local", local_joined))
            await local_joined.wait()
        await asyncio.gather(remote, local)
        assert [name for name, _ in order.ran] == ["remote", "local"]
        assert order.ran[0][1] > first.fence
        assert order.ran[1][1] > order.ran[0][1]
        check_history(order.history.spans)
    finally:
        await here.aclose()
        await elsewhere.aclose()


async def test_a_refused_hand_over_is_reported_as_lost(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The holder's owner key vanished (a failover) before it released: the release script
    refuses the in-loop grant, and the waiter it had started learns at once that its turn
    is lost (reason "taken", a WARNING), long before its first renewal."""
    caplog.set_level(logging.WARNING, logger="inturn")
    namespace = _namespace()
    gate = inturn.Gate.from_url(redis_url, namespace=namespace, lease=30)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        started = asyncio.Event()
        second: list[inturn.Turn] = []

        async def waiter() -> None:
            async with gate.turn("k", timeout=10) as turn:
                second.append(turn)
                started.set()
                await asyncio.wait_for(turn.lost.wait(), 2)  # renewal would take 10 s

        async with gate.turn("k"):
            task = asyncio.ensure_future(waiter())
            await asyncio.sleep(0.05)
            await client.delete(f"inturn:{namespace}:{{k}}:o")
        await task
        assert second[0].lost_reason == "taken"
        assert any("lost the turn" in r.getMessage() for r in caplog.records)
    finally:
        await client.aclose()
        await gate.aclose()


async def test_many_tasks_of_two_gates_keep_the_contract(redis_url: str) -> None:
    """Two gates (two channels, as two processes) x 20 tasks on 3 keys, hand-overs mixed
    in-loop and by push: no overlap, increasing fences, FIFO."""
    namespace = _namespace()
    gates = [inturn.Gate.from_url(redis_url, namespace=namespace) for _ in range(2)]
    history = History()

    async def worker(gate: inturn.Gate, i: int) -> None:
        for round_ in range(5):
            async with gate.turn(f"k{(i + round_) % 3}", timeout=30) as turn:
                with history.span(turn):
                    await asyncio.sleep(0.001)

    try:
        await asyncio.gather(*(worker(gates[i % 2], i) for i in range(40)))
        report = check_history(history.spans)
        assert report.spans == 200
        for gate in gates:
            assert await gate.backend.footprint() == 0
    finally:
        for gate in gates:
            await gate.aclose()


async def test_the_holder_leaves_without_waiting_for_the_server(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """An in-loop hand-over needs no round trip: with the server paused, the holder's exit
    returns and its waiter starts at once; the grant is confirmed once the server answers."""
    server = make_redis_server()
    gate = inturn.Gate.from_url(server.url, namespace=_namespace(), lease=30)
    try:
        started = asyncio.Event()
        second: list[inturn.Turn] = []

        async def waiter() -> None:
            async with gate.turn("k", timeout=10) as turn:
                second.append(turn)
                started.set()
                await asyncio.sleep(0.5)

        async with gate.turn("k") as first:
            task = asyncio.ensure_future(waiter())
            await asyncio.sleep(0.05)  # its JOIN has been answered
            server.pause()
            begun = time.monotonic()
        left = time.monotonic() - begun
        await asyncio.wait_for(started.wait(), 0.5)
        server.resume()
        await task
        assert left < 0.2, f"the exit waited {left:.3f}s for a paused server"
        assert second[0].fence == first.fence + 1
        assert second[0].lost_reason is None
        assert await gate.backend.footprint() == 0
    finally:
        server.resume()
        await gate.aclose()


async def test_a_retried_release_confirms_its_hand_over_again(redis_url: str) -> None:
    """RELEASE runs twice when its first reply is lost (the connection dropped): the second
    run finds the waiter it named holding the turn and confirms the same grant, so a retry
    never reports a good hand-over as refused."""
    gate = inturn.Gate.from_url(redis_url, namespace=_namespace())
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    try:
        held = await backend.join("k", "holder", 30)
        assert held is not None
        assert await backend.join("k", "next", 30) is None
        state = backend._state()
        args = ["holder", "next", 30_000]
        first = await backend._run(state, "release", "k", args)
        again = await backend._run(state, "release", "k", args)
        assert [first[0], _text(first[1]), first[2]] == [1, "next", held.fence + 1]
        assert [again[0], _text(again[1]), again[2]] == [1, "next", held.fence + 1]
        assert await backend.is_held("k", "next")
        # Naming a token that does not hold the turn is still a no-op.
        assert list(await backend._run(state, "release", "k", ["holder", "other", 30_000])) == [0]
        await backend.release("k", "next")
        assert await backend.footprint() == 0
    finally:
        await gate.aclose()
