"""What idle users leave in Redis (nothing of their own), and fences that keep growing
without a key per user: across idle periods, hand-offs, a clock that steps back, and a
restart with persistence."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import redis

import inturn
from inturn._backends.redis._keys import KeySpace
from tests.servers import RedisCluster, RedisServer

KEYS = 20_000
"""Distinct users taken once in the footprint test (the benchmark does 1,000,000)."""


def _names(url: str, namespace: str) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return sorted(client.scan_iter(match=f"inturn:{namespace}:*", count=10_000))


async def _take_each(gate: inturn.Gate, keys: list[str], batch: int = 500) -> list[int]:
    fences: list[int] = []

    async def one(key: str) -> None:
        async with gate.turn(key, timeout=30) as turn:
            fences.append(turn.fence)

    for start in range(0, len(keys), batch):
        await asyncio.gather(*(one(k) for k in keys[start : start + batch]))
    return fences


async def test_idle_users_leave_no_key(redis_url: str) -> None:
    """20,000 users, each taken once, and a mailbox drained for some: what stays is the
    namespace's one fence floor (before: one floor key per user, for 30 days)."""
    namespace = f"fp{secrets.token_hex(3)}"
    gate = inturn.Gate.from_url(redis_url, namespace=namespace)
    seen: list[str] = []

    async def handle(message: inturn.Message) -> None:
        seen.append(message.key)

    box = gate.mailbox("inbox", handler=handle, sweep_interval=None)
    try:
        async with asyncio.timeout(120):
            fences = await _take_each(gate, [f"user-{i}" for i in range(KEYS)])
            for i in range(200):
                await box.submit(f"user-{i}", {"n": i})
            assert await box.drained(30)
        assert len(set(fences)) == KEYS  # one namespace floor: no fence is ever repeated
        assert len(seen) == 200
        assert await gate.backend.footprint() == 0
    finally:
        await gate.aclose()
    assert _names(redis_url, namespace) == [f"inturn:{namespace}:fence".encode()]


async def test_idle_users_leave_no_key_on_a_cluster(redis_cluster: RedisCluster) -> None:
    """On a Cluster: no key per user either, and no hint lingers in the sweeper's sets
    (each slot keeps its own set, which the drain's last take empties)."""
    namespace = f"fpc{secrets.token_hex(3)}"
    url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in redis_cluster.startup_nodes)
    gate = inturn.Gate.from_url(url, namespace=namespace)
    done: list[str] = []

    async def handle(message: inturn.Message) -> None:
        done.append(message.key)

    box = gate.mailbox("inbox", handler=handle, sweep_interval=None)
    users = [f"user-{i}" for i in range(300)]
    try:
        async with asyncio.timeout(120):
            await _take_each(gate, users, batch=20)  # a Cluster client's pool is bounded
            for user in users:
                await box.submit(user, {"u": user})
            assert await box.drained(60)
        assert sorted(done) == sorted(users)
        assert await gate.backend.mb_hinted("inbox") == []  # type: ignore[attr-defined]
    finally:
        await gate.aclose()
    client = redis.RedisCluster(*redis_cluster.startup_nodes[0])
    try:
        names = list(client.scan_iter(match=f"inturn:{namespace}:*", target_nodes="primaries"))
    finally:
        client.close()
    space = KeySpace(namespace)
    kinds = {space.parse(n.decode()) for n in names}
    assert kinds == {(None, None, "fence")}, kinds  # the slots' floors, nothing per user
    floors = {space.fence_floor(u, cluster=True).encode() for u in users}
    assert set(names) <= floors


async def test_fences_grow_across_idle_periods_handoffs_and_a_clock_step_back(
    redis_url: str,
) -> None:
    """A key idle in between (nothing of it left), handed off between tasks, and a floor
    ahead of the clock (what a clock that stepped back looks like): fences still grow."""
    namespace = f"fm{secrets.token_hex(3)}"
    gate = inturn.Gate.from_url(redis_url, namespace=namespace)
    floor = KeySpace(namespace).fence_floor("k")
    fences: list[int] = []

    async def hold(pause: float) -> None:
        async with gate.turn("k", timeout=30) as turn:
            fences.append(turn.fence)
            await asyncio.sleep(pause)

    try:
        async with asyncio.timeout(60):
            await hold(0)
            assert _names(redis_url, namespace) == [floor.encode()]  # idle: nothing of "k"
            await asyncio.gather(*(hold(0.001) for _ in range(20)))  # hand-offs, local ones
            with redis.Redis.from_url(redis_url) as client:
                ahead = fences[-1] + 3_600_000_000  # the clock "went back" an hour
                client.set(floor, ahead)
            await asyncio.gather(*(hold(0) for _ in range(5)))
            await hold(0)
        assert fences == sorted(set(fences)), fences
        assert fences[-6:] == list(range(ahead + 1, ahead + 7))  # floor + 1 each
    finally:
        await gate.aclose()


async def test_fences_grow_across_a_restart_with_persistence(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """The floor survives a crash with AOF on (and the clock covers what it might lose)."""
    server = make_redis_server({"appendonly": "yes", "appendfsync": "always"})
    namespace = f"fr{secrets.token_hex(3)}"
    floor = KeySpace(namespace).fence_floor("k")
    before: list[int] = []
    for _ in range(2):
        gate = inturn.Gate.from_url(server.url, namespace=namespace)
        try:
            async with gate.turn("k", timeout=10) as turn:
                before.append(turn.fence)
        finally:
            await gate.aclose()
        with redis.Redis.from_url(server.url) as client:
            ahead = before[-1] + 3_600_000_000
            client.set(floor, ahead)  # a floor only persistence can give back
        server.kill()
        server.start()
        gate = inturn.Gate.from_url(server.url, namespace=namespace)
        try:
            async with gate.turn("k", timeout=10) as turn:
                before.append(turn.fence)
        finally:
            await gate.aclose()
        assert before[-1] == ahead + 1
    assert before == sorted(set(before))
