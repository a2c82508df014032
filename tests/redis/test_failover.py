"""Failovers on real servers: a Cluster with replicas whose master dies, a Sentinel whose
old master is paused and comes back. Each test is bounded and cleans up after itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import pytest
import redis
import redis.cluster

import inturn
from inturn._backends.redis import RedisBackend
from tests.servers import HOST, RedisServer


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

    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(c) for c in (holder(), waiter(), poke(stop))]
    try:
        await asyncio.wait_for(held.wait(), 10)
        await asyncio.sleep(0.3)  # the waiter is in line
        killed = time.monotonic()
        master.kill()
        await asyncio.to_thread(cluster.wait_ok_without, master)
        settled = time.monotonic() - killed
        await asyncio.sleep(1.0)
        let_go.set()
        await asyncio.wait_for(asyncio.gather(*tasks[:2]), 35)
    finally:
        stop.set()
        let_go.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await gate.aclose()
        master.start()
        await asyncio.to_thread(cluster.wait_ok)
    print(f"settled {settled:.2f}s after the kill; {outcome}")
    assert not escaped, escaped
    assert "granted" in outcome, outcome
    assert "holder" not in outcome, outcome
    if lease > 2 * settled:  # the lease outlived the window: its renewal resumed
        assert (outcome["lost"], outcome["check"]) == (None, True), outcome
    else:
        assert outcome["lost"] in (None, "expired", "taken"), outcome
        assert outcome["check"] == (outcome["lost"] is None), outcome


async def _nowait(gate: inturn.Gate) -> None:
    async with gate.turn_nowait("k"):
        pass


async def _claim(dedup: Any, n: int) -> None:
    async with dedup.claim("k", f"id{n}"):
        pass
