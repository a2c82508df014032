"""On a real 3-master Cluster, scripts go to their master's own connection, and a stale
slot map (a resharding, a fail-over) is followed through redis-py's cluster client."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import inturn
from inturn._backends.redis._keys import KeySpace
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
