"""Key encoding (injective, one hash tag per user) and the turn on a real Redis Cluster."""

from __future__ import annotations

import asyncio
import secrets
import threading

import pytest
from redis.crc import key_slot

import inturn
from inturn._backends.redis._keys import SLOTS, KeySpace, encode, slot_of, slot_tag
from inturn.testing import History, check_history
from tests.servers import RedisCluster

HOSTILE = [
    "a:b",
    "a%3Ab",
    "{x}",
    "}{",
    "{",
    "}",
    "line\nbreak",
    "tab\there",
    " ",
    "%",
    "%25",
    "ключ",
    "🙂",
    "e\u0301",
    "\u00e9",
    "x" * 1024,
    "é" * 512,
    "1",
    "01",
]


def test_encoding_is_injective_and_tag_safe() -> None:
    """Distinct keys never share a Redis name, and none escapes its hash tag."""
    space = KeySpace("ns:{odd}")
    names = [space.turn_keys(k, cluster=True) for k in HOSTILE]
    assert len({n[0] for n in names}) == len(HOSTILE)
    for key, group in zip(HOSTILE, names, strict=True):
        assert "{" not in encode(key)
        assert "}" not in encode(key)
        # The floor and the hint set a script touches beside them lie in the user's slot.
        group = [*group, *space.mailbox_keys("in:box", key)]
        group.append(space.hint_set("in:box", key, cluster=True))
        assert len({key_slot(n.encode()) for n in group}) == 1, key
        assert key_slot(group[0].encode()) == slot_of(key)
        assert group[0].startswith("inturn:ns%3A%7Bodd%7D:{")


def test_namespace_cannot_collide_with_a_key() -> None:
    """The namespace is encoded too: no namespace/key pair imitates another."""
    a = KeySpace("a:b").turn_keys("c")[0]
    b = KeySpace("a").turn_keys("b:c")[0]
    assert a != b


async def test_hostile_keys_on_a_real_server(redis_url: str) -> None:
    """Every hostile key gets its own turn on a real server; nothing is left behind."""
    gate = inturn.Gate.from_url(redis_url, namespace="hostile:{ns}")
    async with asyncio.timeout(30):
        outer = [await gate.turn(k).__aenter__() for k in HOSTILE]
        for k in HOSTILE:  # each is held: a second request for it must wait
            assert await gate.is_busy(k)
        for turn in outer:
            await gate.backend.release(turn.key, turn._token)
    assert await gate.backend.footprint() == 0
    await gate.aclose()


def cluster_url(cluster: RedisCluster) -> str:
    return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes)


async def test_cluster_async_and_sync_keep_the_contract(redis_cluster: RedisCluster) -> None:
    """On a 3-master Cluster: no overlap, FIFO, fences, across slots, from tasks and threads."""
    gate = inturn.Gate.from_url(cluster_url(redis_cluster), namespace=f"c{secrets.token_hex(3)}")
    history = History()
    keys = [f"user-{i}" for i in range(6)] + HOSTILE[:6]
    assert len({key_slot(KeySpace("x").turn_keys(k)[0].encode()) for k in keys}) > 3

    async def task(i: int) -> None:
        async with gate.turn(keys[i % len(keys)], timeout=30) as turn:
            with history.span(turn, f"task{i}"):
                await asyncio.sleep(0.002)

    def thread(i: int) -> None:
        with gate.turn_sync(keys[i % len(keys)], timeout=30) as turn, history.span(turn, f"th{i}"):
            pass

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    await asyncio.wait_for(asyncio.gather(*(task(i) for i in range(60))), 60)
    for t in threads:
        await asyncio.to_thread(t.join, 30)
    report = check_history(history.spans)
    assert report.spans == 72
    assert await gate.backend.footprint() == 0
    await gate.aclose()


@pytest.mark.parametrize("scheme", ["redis+cluster://", "redis+sentinel://"])
def test_multi_host_urls_need_hosts(scheme: str) -> None:
    """A malformed multi-host URL is a clear ConfigurationError."""
    with pytest.raises(inturn.ConfigurationError):
        inturn.Gate.from_url(scheme + ":bad")


def test_sentinel_url_needs_a_service_name() -> None:
    with pytest.raises(inturn.ConfigurationError, match="service name"):
        inturn.Gate.from_url("redis+sentinel://127.0.0.1:26379")


def test_every_slot_has_a_short_tag() -> None:
    """The slot tags that name a slot's shared keys: one per slot, each hashing to it."""
    tags = [slot_tag(slot) for slot in range(SLOTS)]
    assert all(key_slot(f"x{{{tag}}}".encode()) == slot for slot, tag in enumerate(tags))
    assert max(len(tag) for tag in tags) <= 3
    space = KeySpace("n")
    assert space.parse(space.fence_floor("u", cluster=True)) == (None, None, "fence")
    assert space.parse(space.fence_floor("u")) == (None, None, "fence")
    assert space.parse(space.hint_set("box", "u", cluster=True)) == (None, "box", "hint")
