"""Failovers on real servers: a Cluster with replicas whose master dies, a Sentinel whose
old master is paused and comes back. Each test is bounded and cleans up after itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import pytest
import redis
import redis.cluster

import inturn
from inturn._backends.redis import RedisBackend
from tests.servers import HOST, RedisSentinel, RedisServer


def _namespace() -> str:
    return f"fo{secrets.token_hex(4)}"


class ReplicatedCluster:
    """3 masters, each with one replica; a dead master is replaced within ~1-2 s."""

    def __init__(self) -> None:
        options = {"cluster-enabled": "yes", "cluster-node-timeout": "1000"}
        self.nodes = [RedisServer(options) for _ in range(6)]

    def start(self) -> ReplicatedCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create"]
            + [f"{HOST}:{node.port}" for node in self.nodes]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.wait_ok()
        return self

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def master_of(self, name: str) -> int:
        """The port of the master serving ``name``'s slot."""
        with redis.cluster.RedisCluster(host=HOST, port=self._live().port) as client:
            return int(client.get_node_from_key(name).port)

    def _live(self) -> RedisServer:
        return next(n for n in self.nodes if n.running)

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node says the cluster is ok and every master has a replica."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                live = [n for n in self.nodes if n.running]
                states = []
                for node in live:
                    with redis.Redis(port=node.port) as client:
                        states.append(client.cluster("info").get("cluster_state") == "ok")
                        if client.info("replication")["role"] == "slave":
                            states.append(
                                client.info("replication").get("master_link_status") == "up"
                            )
                if all(states):
                    return
            time.sleep(0.1)
        raise AssertionError("the cluster did not settle")

    def wait_ok_without(self, dead: RedisServer, timeout: float = 30) -> None:
        """Until a replica took ``dead``'s slots and the live nodes say the cluster is ok."""
        deadline = time.monotonic() + timeout
        live = [n for n in self.nodes if n.running and n is not dead]
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                with redis.Redis(port=live[0].port, decode_responses=True) as client:
                    lines = client.execute_command("CLUSTER", "NODES")
                if isinstance(lines, dict):  # redis-py parses it
                    flags = [v["flags"] for k, v in lines.items() if k.endswith(f":{dead.port}")]
                    failed = any("fail" in f and "fail?" not in f for f in flags)
                else:
                    failed = any(
                        f":{dead.port}@" in line and ",fail " in line.replace("fail?", "")
                        for line in str(lines).splitlines()
                    )
                if failed and all(
                    redis.Redis(port=n.port).cluster("info").get("cluster_state") == "ok"
                    for n in live
                ):
                    return
            time.sleep(0.05)
        raise AssertionError("no replica took over")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[ReplicatedCluster]:
    made = ReplicatedCluster()
    try:
        yield made.start()
    finally:
        made.stop()


def _raw_redis_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("redis")


@pytest.mark.slow
@pytest.mark.parametrize("lease", [1.5, 8.0])
async def test_cluster_master_dies_under_a_holder_and_a_waiter(
    cluster: ReplicatedCluster, lease: float
) -> None:
    """The master of the key's slot is killed; its replica takes over within a few seconds.

    No raw redis-py error escapes (join, wait, renew, release, nowait, dedup, mailbox,
    statistics); the waiter (timeout 30) is granted; the holder's renewal either resumed
    or, if its lease lapsed in the window, turn.lost is set: never silently stopped.
    """
    namespace = _namespace()
    gate = inturn.Gate.from_url(cluster.url, namespace=namespace, lease=lease)
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    owner = backend._process.keys.turn_keys("k")[0]
    master = cluster.node(cluster.master_of(owner))
    escaped: list[BaseException] = []
    held = asyncio.Event()
    let_go = asyncio.Event()
    outcome: dict[str, Any] = {}
    box = gate.mailbox("fo", handler=lambda m: None, sweep_interval=None)
    dedup = gate.dedup("fo", window=60)

    async def holder() -> None:
        try:
            async with gate.turn("k") as turn:
                held.set()
                await let_go.wait()
                outcome["lost"] = turn.lost_reason
                outcome["check"] = await turn.check()
        except BaseException as exc:
            outcome["holder"] = exc
            if _raw_redis_error(exc):
                escaped.append(exc)

    async def waiter() -> None:
        await held.wait()
        try:
            async with gate.turn("k", timeout=30):
                outcome["granted"] = time.monotonic()
        except BaseException as exc:
            outcome["waiter"] = exc
            if _raw_redis_error(exc):
                escaped.append(exc)

    async def poke(stop: asyncio.Event) -> None:
        """Other paths, again and again through the window."""
        n = 0
        while not stop.is_set():
            n += 1
            calls: list[Callable[[], Awaitable[Any]]] = [
                partial(_nowait, gate),
                partial(_claim, dedup, n),
                partial(box.submit, "k", {"n": n}),
                gate.statistics,
            ]
            for call in calls:
                try:
                    await asyncio.wait_for(call(), 5)
                except (inturn.Busy, inturn.Duplicate, inturn.BackendUnavailable, TimeoutError):
                    pass
                except BaseException as exc:
                    if _raw_redis_error(exc):
                        escaped.append(exc)
                    else:
                        raise
            await asyncio.sleep(0.05)

    # A thread holds another key of the same master through the window (turn_sync).
    same = next(
        f"s{i}"
        for i in range(1000)
        if cluster.master_of(backend._process.keys.turn_keys(f"s{i}")[0]) == master.port
    )
    sync_held = threading.Event()
    sync_go = threading.Event()

    def sync_holder() -> None:
        try:
            with gate.turn_sync(same) as turn:
                sync_held.set()
                sync_go.wait(30)
                outcome["sync_lost"] = turn.lost_reason
                outcome["sync_check"] = turn.check()
        except BaseException as exc:
            outcome["sync_holder"] = exc
            if _raw_redis_error(exc):
                escaped.append(exc)

    thread = threading.Thread(target=sync_holder, daemon=True)
    thread.start()
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(c) for c in (holder(), waiter(), poke(stop))]
    try:
        assert await asyncio.to_thread(sync_held.wait, 10)
        await asyncio.wait_for(held.wait(), 10)
        await asyncio.sleep(0.3)  # the waiter is in line
        killed = time.monotonic()
        master.kill()
        await asyncio.to_thread(cluster.wait_ok_without, master)
        settled = time.monotonic() - killed
        await asyncio.sleep(1.0)
        let_go.set()
        sync_go.set()
        await asyncio.wait_for(asyncio.gather(*tasks[:2]), 35)
        await asyncio.to_thread(thread.join, 15)
    finally:
        stop.set()
        let_go.set()
        sync_go.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await gate.aclose()
        master.start()
        await asyncio.to_thread(cluster.wait_ok)
    print(f"settled {settled:.2f}s after the kill; {outcome}")
    assert not escaped, escaped
    assert "granted" in outcome, outcome
    assert "holder" not in outcome, outcome
    assert "sync_holder" not in outcome, outcome
    for lost, check in (("lost", "check"), ("sync_lost", "sync_check")):
        if lease > 2 * settled:  # the lease outlived the window: its renewal resumed
            assert (outcome[lost], outcome[check]) == (None, True), outcome
        else:
            assert outcome[lost] in (None, "expired", "taken"), outcome
            assert outcome[check] == (outcome[lost] is None), outcome


async def _nowait(gate: inturn.Gate) -> None:
    async with gate.turn_nowait("k"):
        pass


async def _claim(dedup: Any, n: int) -> None:
    async with dedup.claim("k", f"id{n}"):
        pass


# -- Sentinel: the old master paused, a failover, and the old master back --------------


class FailoverSentinel(RedisSentinel):
    """A Sentinel that fails ``mymaster`` over half a second after it stops answering."""

    def _launch(self, port: int, bus_port: int) -> None:
        super()._launch(port, bus_port)
        for line in (
            ("down-after-milliseconds", "500"),
            ("failover-timeout", "2000"),
        ):
            with redis.Redis(port=port) as client:
                client.execute_command("SENTINEL", "SET", self.service, *line)


@pytest.fixture
def sentinel_pair(
    make_redis_server: Callable[..., RedisServer],
) -> Iterator[tuple[RedisServer, RedisServer, FailoverSentinel]]:
    primary = make_redis_server()
    replica = make_redis_server({"replicaof": f"{HOST} {primary.port}"})
    sentinel = FailoverSentinel(primary.port)
    sentinel.start()
    try:
        deadline = time.monotonic() + 20
        with redis.Redis(port=sentinel.port, decode_responses=True) as client:
            while not client.execute_command("SENTINEL", "REPLICAS", sentinel.service):
                assert time.monotonic() < deadline, "the sentinel did not find the replica"
                time.sleep(0.1)
        yield primary, replica, sentinel
    finally:
        primary.resume()
        sentinel.stop()


@pytest.mark.slow
async def test_sentinel_old_master_back_cannot_keep_a_stale_holder(
    sentinel_pair: tuple[RedisServer, RedisServer, FailoverSentinel],
) -> None:
    """The master is paused; Sentinel promotes its replica, where another process takes
    the key; the old master comes back. A process that was connected to it must not hold
    the key as well without learning it within about one renewal interval."""
    primary, replica, sentinel = sentinel_pair
    lease = 1.5
    namespace = _namespace()
    old_side = inturn.Gate.from_url(sentinel.url, namespace=namespace, lease=lease)
    new_side = inturn.Gate.from_url(sentinel.url, namespace=namespace, lease=lease)
    try:
        async with old_side.turn("warm"):  # connected to the master, before the pause
            pass
        primary.pause()
        deadline = time.monotonic() + 20
        while sentinel.master_addr() != (HOST, replica.port):
            assert time.monotonic() < deadline, "no failover"
            await asyncio.sleep(0.05)
        async with new_side.turn("k", timeout=15) as held:
            primary.resume()
            await asyncio.sleep(0.05)
            outcome: dict[str, float | None] = {}

            async def stale_side() -> None:  # a task of its own: turns are re-entrant per task
                try:
                    async with old_side.turn("k", timeout=3) as stale:
                        # Granted while the other holds it: the stale master said yes.
                        outcome["stale_at"] = begun = time.monotonic()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stale.lost.wait(), 6)
                        outcome["learnt"] = (
                            time.monotonic() - begun if stale.lost.is_set() else None
                        )
                except inturn.TurnTimeout:
                    pass  # it waited in line on the new master: the right answer

            await stale_side_task(stale_side)
            stale_at, learnt = outcome.get("stale_at"), outcome.get("learnt")
            print(f"stale grant: {stale_at is not None}; learnt in {learnt}")
            if stale_at is not None:
                assert learnt is not None, "the stale holder never learnt it lost the turn"
                assert learnt < lease / 3 + 0.8
            assert not held.lost.is_set()
    finally:
        primary.resume()
        await old_side.aclose()
        await new_side.aclose()


async def stale_side_task(body: Callable[[], Awaitable[None]]) -> None:
    await asyncio.ensure_future(body())


@pytest.mark.slow
def test_sentinel_old_master_back_sync_twin(
    sentinel_pair: tuple[RedisServer, RedisServer, FailoverSentinel],
) -> None:
    """The same from threads: the sync twin's connections to the old master are retired
    once Sentinel names the new one, so the join waits in line there (or, if it got a
    stale grant, its holder learns within about one renewal interval)."""
    import threading

    primary, replica, sentinel = sentinel_pair
    lease = 1.5
    namespace = _namespace()
    old_side = inturn.Gate.from_url(sentinel.url, namespace=namespace, lease=lease)
    new_side = inturn.Gate.from_url(sentinel.url, namespace=namespace, lease=lease)
    outcome: dict[str, Any] = {}

    def stale_side() -> None:
        try:
            with old_side.turn_sync("k", timeout=3) as stale:
                begun = time.monotonic()
                stale.lost.wait(6)
                outcome["learnt"] = time.monotonic() - begun if stale.lost.is_set() else None
        except inturn.TurnTimeout:
            outcome["waited"] = True
        except BaseException as exc:
            outcome["error"] = exc

    try:
        with old_side.turn_sync("warm"):
            pass
        primary.pause()
        deadline = time.monotonic() + 20
        while sentinel.master_addr() != (HOST, replica.port):
            assert time.monotonic() < deadline, "no failover"
            time.sleep(0.05)
        with new_side.turn_sync("k", timeout=15) as held:
            primary.resume()
            time.sleep(0.05)
            thread = threading.Thread(target=stale_side, daemon=True)
            thread.start()
            thread.join(15)
            assert not thread.is_alive()
            assert not held.lost.is_set()
        print(outcome)
        assert "error" not in outcome, outcome
        if "learnt" in outcome:
            assert outcome["learnt"] is not None
            assert outcome["learnt"] < lease / 3 + 0.8
    finally:
        primary.resume()
        old_side.close()
        new_side.close()
