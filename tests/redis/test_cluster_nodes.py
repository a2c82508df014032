"""On a real 3-master Cluster, scripts go to their master's own connection, and a stale
slot map (a resharding, a fail-over) is followed through redis-py's cluster client."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any

import pytest
import redis

import inturn
from inturn import RedisBackend
from inturn._backends.redis._keys import KeySpace, slot_of
from tests.redis.test_keys_and_cluster import cluster_url
from tests.servers import RedisCluster


def _users_on_every_master(client: Any, namespace: str) -> dict[str, str]:
    """One user per master: master name -> user."""
    space = KeySpace(namespace)
    users: dict[str, str] = {}
    masters = {n.name for n in client.nodes_manager.slots_cache[0][:1]}
    masters |= {nodes[0].name for nodes in client.nodes_manager.slots_cache.values()}
    n = 0
    while len(users) < len(masters):
        user = f"user-{n}"
        slot = client.keyslot(space.turn_keys(user, cluster=True)[0])
        users.setdefault(client.nodes_manager.slots_cache[slot][0].name, user)
        n += 1
    return users


def _mislead(client: Any, key_name: str) -> tuple[int, str]:
    """Point redis-py's slot map for ``key_name`` at a wrong master; return the slot and the
    right master's name."""
    manager = client.nodes_manager
    slot = client.keyslot(key_name)
    right = manager.slots_cache[slot][0]
    wrong = next(n[0] for n in manager.slots_cache.values() if n[0].name != right.name)
    manager.slots_cache[slot] = [wrong]
    return slot, right.name


async def test_async_scripts_use_a_connection_per_master_and_follow_a_stale_map(
    redis_cluster: RedisCluster,
) -> None:
    namespace = f"n{secrets.token_hex(3)}"
    gate = inturn.Gate.from_url(cluster_url(redis_cluster), namespace=namespace)
    try:
        async with gate.turn("warm-up"):
            pass
        state = gate.backend._state()  # type: ignore[attr-defined]
        nodes, client = state.nodes, state.client
        users = _users_on_every_master(client, namespace)
        assert len(users) == 3
        fences = []
        for user in users.values():
            async with gate.turn(user) as turn:
                fences.append(turn.fence)
        assert set(nodes._muxes) == set(users)  # one pipelined connection per master
        assert nodes.redirected == 0

        user = users[next(iter(users))]
        key_name = KeySpace(namespace).turn_keys(user, cluster=True)[0]
        slot, right = _mislead(client, key_name)
        async with gate.turn(user, timeout=10) as turn:  # MOVED: redis-py finds the master
            assert turn.fence > 0
        assert nodes.redirected == 1
        assert client.nodes_manager.slots_cache[slot][0].name == right  # the map is mended
        async with gate.turn(user, timeout=10):
            pass
        assert nodes.redirected == 1  # and the next call goes straight to the master
        assert await gate.backend.footprint() == 0
    finally:
        await gate.aclose()


async def test_sync_scripts_use_a_connection_per_master_and_follow_a_stale_map(
    redis_cluster: RedisCluster,
) -> None:
    namespace = f"n{secrets.token_hex(3)}"
    gate = inturn.Gate.from_url(cluster_url(redis_cluster), namespace=namespace)

    def run() -> None:
        backend: Any = gate.sync_backend
        nodes, client = backend._nodes, backend._client
        users = _users_on_every_master(client, namespace)
        for user in users.values():
            with gate.turn_sync(user, timeout=10):
                pass
        assert set(nodes._muxes) == set(users)
        assert nodes.redirected == 0
        user = users[next(iter(users))]
        key_name = KeySpace(namespace).turn_keys(user, cluster=True)[0]
        slot, right = _mislead(client, key_name)
        with gate.turn_sync(user, timeout=10) as turn:
            assert turn.fence > 0
        assert nodes.redirected == 1
        assert client.nodes_manager.slots_cache[slot][0].name == right
        with gate.turn_sync(user, timeout=10):
            pass
        assert nodes.redirected == 1

    try:
        await asyncio.to_thread(run)
    finally:
        await gate.aclose()


async def test_a_sweep_reads_the_hints_of_every_master_in_one_call_each(
    redis_cluster: RedisCluster,
) -> None:
    """The sweeper's hint sets (one per slot) are read with one script call per master,
    from tasks and threads, and every user with a stored message is found."""
    namespace = f"n{secrets.token_hex(3)}"
    gate = inturn.Gate.from_url(cluster_url(redis_cluster), namespace=namespace)
    try:
        async with gate.turn("warm-up"):
            pass
        state = gate.backend._state()  # type: ignore[attr-defined]
        users = list(_users_on_every_master(state.client, namespace).values())
        users += [f"more-{n}" for n in range(20)]
        for user in users:
            await gate.backend.mb_submit(  # type: ignore[attr-defined]
                "box", user, "m", max_pending=10, drop_oldest=False, token="t", lease=5.0
            )
        redirected = state.nodes.redirected
        assert await gate.backend.mb_hinted("box") == sorted(users)  # type: ignore[attr-defined]
        assert set(state.nodes._muxes) == {
            n[0].name for n in state.client.nodes_manager.slots_cache.values()
        }
        assert state.nodes.redirected == redirected
        hinted = await asyncio.to_thread(gate.sync_backend.mb_hinted, "box")  # type: ignore[attr-defined]
        assert hinted == sorted(users)
    finally:
        await gate.aclose()


def _wait_for_replication(cluster: RedisCluster, timeout: float = 30.0) -> None:
    """Until every replica's link to its master is up (a new Cluster syncs them after)."""
    deadline = time.monotonic() + timeout
    while True:
        up = 0
        for node in cluster.nodes:
            with redis.Redis(port=node.port) as client:
                info = client.info("replication")
            up += info.get("role") == "slave" and info.get("master_link_status") == "up"
        if up == cluster.masters * cluster.replicas:
            return
        assert time.monotonic() < deadline, "the replicas did not sync"
        time.sleep(0.1)


async def test_a_submit_waits_for_its_masters_replica_on_a_cluster(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With ?wait_replicas=1 on a Cluster with a replica per master, a submit returns once
    its master's replica has the message (tasks and threads); with the replicas paused it
    waits wait_timeout and says so."""
    cluster = RedisCluster(3, replicas=1).start()
    _wait_for_replication(cluster)
    url = cluster_url(cluster) + "?wait_replicas=1&wait_timeout=0.5"
    backend = RedisBackend.from_url(url, namespace=f"w{secrets.token_hex(3)}")
    twin = backend.sync_twin()

    def copies(user: str) -> int:
        """On how many nodes (masters and replicas) the user's queue holds a message."""
        queue = backend._process.keys.mailbox_keys("box", user)[0]
        found = 0
        for node in cluster.nodes:
            with redis.Redis(port=node.port) as client:
                client.execute_command("READONLY")
                with contextlib.suppress(redis.exceptions.ResponseError):  # MOVED
                    found += int(client.llen(queue)) > 0
        return found

    try:
        for n in range(6):
            user = f"user-{n}"
            if n % 2:
                await asyncio.to_thread(
                    twin.mb_submit,
                    "box",
                    user,
                    "m",
                    max_pending=9,
                    drop_oldest=False,
                    token="t",
                    lease=5.0,
                )
            else:
                await backend.mb_submit(
                    "box", user, "m", max_pending=9, drop_oldest=False, token="t", lease=5.0
                )
            assert copies(user) == 2  # the master and its replica, when acknowledged
        assert not [r for r in caplog.records if "replicas" in r.getMessage()]
        master = cluster.master_of_slot(slot_of("late"))
        others = [node for node in cluster.nodes if node is not master]
        for node in others:
            node.pause()
        try:
            started = time.monotonic()
            await backend.mb_submit(
                "box", "late", "m", max_pending=9, drop_oldest=False, token="t", lease=5.0
            )
            took = time.monotonic() - started
        finally:
            for node in others:
                node.resume()
        assert 0.45 < took < 3.0
        assert any("acknowledged by 0 of 1 replicas" in r.getMessage() for r in caplog.records)
        # A call its master redirects goes through redis-py, without WAIT: said so.
        state = backend._state()
        _mislead(state.client, backend._process.keys.mailbox_keys("box", "moved")[0])
        await backend.mb_submit(
            "box", "moved", "m", max_pending=9, drop_oldest=False, token="t", lease=5.0
        )
        assert state.nodes.redirected == 1
        assert any("without waiting for replicas" in r.getMessage() for r in caplog.records)
    finally:
        twin.close()
        await backend.aclose()
        cluster.stop()
