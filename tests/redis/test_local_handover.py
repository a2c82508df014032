"""The in-loop hand-over: a release starts the loop's own next waiter before the server replies.

It may do so only when everyone ahead of that waiter in the server's line is of the same
event loop (JOIN says "solo"), with fence = the holder's + 1, and the release script must
confirm exactly that grant; a refused grant is reported as a lost turn.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable

import pytest
import redis
import redis.asyncio

import inturn
from inturn._backends.redis import RedisBackend
from inturn._backends.redis._shared import text as _text
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


def test_threads_of_one_process_are_handed_the_turn_in_order(redis_url: str) -> None:
    """The sync twin hands over in-process too: threads waiting on one key each start the
    moment the previous holder leaves, with fence + 1, in the order they joined."""
    gate = inturn.Gate.from_url(redis_url, namespace=_namespace())
    history = History()
    ran: list[tuple[int, int]] = []
    try:
        with gate.turn_sync("k") as first:
            threads = []
            for i in range(6):
                thread = threading.Thread(target=_hold_once, args=(gate, i, ran, history))
                thread.start()
                threads.append(thread)
                time.sleep(0.05)  # its JOIN has been answered: the line's order is known
        for thread in threads:
            thread.join(10)
        assert [i for i, _ in ran] == list(range(6))
        assert [fence for _, fence in ran] == list(range(first.fence + 1, first.fence + 7))
        check_history(history.spans)
        assert gate.backend.sync_twin().footprint() == 0
    finally:
        gate.close()


def _hold_once(gate: inturn.Gate, i: int, ran: list[tuple[int, int]], history: History) -> None:
    with gate.turn_sync("k", timeout=10) as turn, history.span(turn):
        ran.append((i, turn.fence))
        time.sleep(0.005)


def test_many_threads_keep_the_contract_with_in_process_hand_overs(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """32 threads x 10 turns on 3 keys, bodies from 0 to 2 ms (many shorter than a round
    trip: a holder handed the turn early must not release before its grant is confirmed,
    or its release could overtake the one that granted it). No overlap, FIFO, nothing
    reported lost, and most hand-overs were in-process."""
    caplog.set_level(logging.WARNING, logger="inturn")
    gate = inturn.Gate.from_url(redis_url, namespace=_namespace())
    history = History()

    def worker(n: int) -> None:
        rng = random.Random(n)
        for _ in range(10):
            with gate.turn_sync(f"k{rng.randrange(3)}", timeout=60) as turn, history.span(turn):
                time.sleep(rng.random() * 0.002 if rng.random() < 0.5 else 0)

    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        report = check_history(history.spans)
        assert report.spans == 320
        fences: dict[str, list[int]] = {}
        for span in history.spans:
            fences.setdefault(span.key, []).append(span.fence)
        handed = sum(
            b == a + 1 for f in map(sorted, fences.values()) for a, b in itertools.pairwise(f)
        )
        assert handed > 100, f"only {handed} of 317 hand-overs were in-process"
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert gate.backend.sync_twin().footprint() == 0
    finally:
        gate.close()


def test_a_refused_hand_over_to_a_thread_is_reported_as_lost(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The sync twin's refused in-process grant (the holder's owner key vanished) sets the
    new holder's `lost` when the release's reply comes, with reason "taken"."""
    caplog.set_level(logging.WARNING, logger="inturn")
    namespace = _namespace()
    gate = inturn.Gate.from_url(redis_url, namespace=namespace, lease=30)
    client = redis.Redis.from_url(redis_url)
    second: list[inturn.SyncTurn] = []

    def waiter() -> None:
        with gate.turn_sync("k", timeout=10) as turn:
            second.append(turn)
            assert turn.lost.wait(2)  # renewal would take 10 s

    try:
        with gate.turn_sync("k"):
            thread = threading.Thread(target=waiter)
            thread.start()
            time.sleep(0.05)
            client.delete(f"inturn:{namespace}:{{k}}:o")
        thread.join(5)
        assert second[0].lost_reason == "taken"
        assert any("lost the turn" in r.getMessage() for r in caplog.records)
    finally:
        client.close()
        gate.close()
