"""What the Redis engine tells an operator: statistics() and diagnose(), on real servers."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable

import pytest
import redis

from inturn._backends.base import BoxState, Diagnostics, Finding
from inturn._backends.redis import RedisBackend
from inturn._backends.redis._keys import KeySpace
from inturn._backends.redis._urls import masked
from tests.servers import RedisCluster, RedisSentinel, RedisServer

MakeServer = Callable[..., RedisServer]
LEASE = 10.0


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend.from_url(redis_url, namespace=f"st{secrets.token_hex(3)}")
    yield backend
    await backend.aclose()


async def _diagnose(url: str) -> Diagnostics:
    backend = RedisBackend.from_url(url)
    try:
        return await asyncio.wait_for(backend.diagnose(), 30)
    finally:
        await backend.aclose()


def _finding(findings: tuple[Finding, ...], check: str) -> Finding:
    [finding] = [f for f in findings if f.check == check]
    return finding


async def test_statistics_shows_a_held_key_with_its_line(backend: RedisBackend) -> None:
    """A held key with two waiters: its holder, fence, lease left and waiting=2."""
    grant = await backend.join("user:1", "holder-token", LEASE)
    assert grant is not None
    assert await backend.join("user:1", "w1", LEASE) is None
    assert await backend.join("user:1", "w2", LEASE) is None
    assert await backend.join("other", "solo", LEASE) is not None
    stats = await backend.statistics()
    assert stats.namespace == backend._process.keys.namespace
    assert [s.key for s in stats.keys] == ["other", "user:1"]
    state = stats.keys[1]
    assert state.holder == "holder-token"
    assert state.fence == grant.fence
    assert state.waiting == 2
    assert state.lease_left is not None
    assert 0 < state.lease_left <= LEASE
    assert stats.keys[0].waiting == 0
    assert not stats.truncated
    only = await backend.statistics("user:1")
    assert [s.key for s in only.keys] == ["user:1"]
    for token in ("w1", "w2"):
        await backend.leave("user:1", token)
    await backend.release("user:1", "holder-token")
    await backend.release("other", "solo")
    assert (await backend.statistics()).keys == ()


async def test_statistics_for_one_key_takes_it_literally(backend: RedisBackend) -> None:
    """A key with glob characters matches only itself in the SCAN pattern."""
    for key in ("a*", "ab", "a?", "[a]", "a"):
        assert await backend.join(key, f"t{key}", LEASE) is not None
    for key in ("a*", "a?", "[a]", "a"):
        assert [s.key for s in (await backend.statistics(key)).keys] == [key]


async def test_statistics_shows_boxes_and_dead_letters(backend: RedisBackend) -> None:
    """A queued box (queued, in flight, draining), dead letters per mailbox, and truncation."""
    for i in range(3):
        await backend.mb_submit(
            "inbox",
            "u{1}",
            f"m{i}",
            max_pending=10,
            drop_oldest=False,
            token="drainer",
            lease=LEASE,
            take=1 if i == 0 else 0,
        )
    await backend.mb_dead("inbox", ["d1", "d2"])
    await backend.mb_dead("other", ["d3"])
    stats = await backend.statistics()
    assert stats.boxes == (BoxState("inbox", "u{1}", queued=2, in_flight=1, draining=True),)
    assert dict(stats.dead_letters) == {"inbox": 2, "other": 1}
    assert stats.keys == ()
    await backend.join("a", "t1", LEASE)
    await backend.join("b", "t2", LEASE)
    small = await backend.statistics(limit=2)
    assert small.truncated
    assert len(small.keys) + len(small.boxes) == 2
    assert dict(small.dead_letters) == {"inbox": 2, "other": 1}
    for_key = await backend.statistics("u{1}")
    assert for_key.boxes == stats.boxes
    assert for_key.keys == ()
    twin_stats = await asyncio.to_thread(backend.sync_twin().statistics)
    assert twin_stats.boxes == stats.boxes


async def test_statistics_on_a_cluster_scans_every_master(redis_cluster: RedisCluster) -> None:
    """On a Cluster, busy keys on every master are found."""
    url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in redis_cluster.startup_nodes)
    backend = RedisBackend.from_url(url, namespace=f"cs{secrets.token_hex(3)}")
    try:
        keys = [f"user-{i}" for i in range(12)]
        for key in keys:
            assert await backend.join(key, f"t-{key}", LEASE) is not None
        stats = await backend.statistics()
        assert sorted(s.key for s in stats.keys) == sorted(keys)
        assert all(s.holder == f"t-{s.key}" for s in stats.keys)
        diagnostics = await backend.diagnose()
        assert diagnostics.topology == "cluster"
        assert diagnostics.version
        assert diagnostics.facts["maxmemory-policy"] == "noeviction"  # every master's
        assert _finding(diagnostics.findings, "eviction_policy").level == "ok"
        assert _finding(diagnostics.findings, "scripts").level == "ok"
        for key in keys:
            await backend.release(key, f"t-{key}")
    finally:
        await backend.aclose()


async def test_diagnose_an_evicting_server(make_redis_server: MakeServer) -> None:
    """maxmemory-policy allkeys-lru is an error finding that says how to fix it."""
    server = make_redis_server({"maxmemory": "64mb", "maxmemory-policy": "allkeys-lru"})
    diagnostics = await _diagnose(server.url)
    assert not diagnostics.ok
    finding = _finding(diagnostics.findings, "eviction_policy")
    assert finding.level == "error"
    assert "set maxmemory-policy noeviction" in finding.message
    assert diagnostics.facts["maxmemory-policy"] == "allkeys-lru"


async def test_diagnose_a_server_without_aof(make_redis_server: MakeServer) -> None:
    """noeviction without AOF: ok, with a warning about what a restart loses."""
    server = make_redis_server({"maxmemory-policy": "noeviction"})
    diagnostics = await _diagnose(server.url)
    assert diagnostics.ok
    assert diagnostics.backend == "redis"
    assert diagnostics.topology == "standalone"
    assert diagnostics.server == server.url
    assert diagnostics.version == diagnostics.facts["redis_version"]
    assert diagnostics.facts["appendonly"] == "no"
    persistence = _finding(diagnostics.findings, "persistence")
    assert persistence.level == "warning"
    assert "restart loses" in persistence.message
    assert _finding(diagnostics.findings, "eviction_policy").level == "ok"
    assert _finding(diagnostics.findings, "scripts").level == "ok"


async def test_diagnose_aof_everysec(make_redis_server: MakeServer) -> None:
    """appendfsync everysec: a warning that about 1 s can be lost."""
    server = make_redis_server({"appendonly": "yes", "appendfsync": "everysec"})
    diagnostics = await _diagnose(server.url)
    assert diagnostics.ok
    assert "about 1 s" in _finding(diagnostics.findings, "persistence").message


async def test_diagnose_without_rights(make_redis_server: MakeServer) -> None:
    """A user without CONFIG gets a warning; without scripting an error; the password is masked."""
    server = make_redis_server()
    with redis.Redis.from_url(server.url) as admin:
        admin.acl_setuser(
            "limited",
            enabled=True,
            passwords=["+s3cret"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-@scripting", "-config"],
        )
    url = server.url.replace("redis://", "redis://limited:s3cret@")
    diagnostics = await _diagnose(url)
    assert not diagnostics.ok
    assert _finding(diagnostics.findings, "scripts").level == "error"
    assert _finding(diagnostics.findings, "eviction_policy").level == "warning"
    assert "s3cret" not in diagnostics.server
    assert "***" in diagnostics.server


async def test_diagnose_an_unreachable_server(make_redis_server: MakeServer) -> None:
    """A server that is down is one error finding, not an exception."""
    server = make_redis_server()
    server.kill()
    diagnostics = await _diagnose(server.url)
    assert not diagnostics.ok
    assert _finding(diagnostics.findings, "reachable").level == "error"


def test_masked_urls_and_key_names() -> None:
    """Passwords never reach a report; every name the engine builds parses back."""
    assert masked("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert masked("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert masked("redis+sentinel://pw@h:1/m") == "redis+sentinel://***@h:1/m"
    assert masked("redis://h:1/0") == "redis://h:1/0"
    assert masked("redis://h:1/0?password=pw&db=2") == "redis://h:1/0?password=***&db=2"
    space = KeySpace("ns:{x}")
    for key in ("plain", "a:b}{c", "ключ %25"):
        owner, line, _, _ = space.turn_keys(key)
        assert space.parse(owner) == (key, None, "o")
        assert space.parse(line) == (key, None, "q")
        for name in space.mailbox_keys("in:box", key):
            assert space.parse(name)[:2] == (key, "in:box")  # type: ignore[index]
    assert space.parse(space.mailbox_index("in:box")[1]) == (None, "in:box", "dead")
    assert space.parse("inturn:other:{k}:o") is None


async def test_diagnose_through_sentinel(redis_sentinel: RedisSentinel, redis_url: str) -> None:
    """A redis+sentinel:// backend reports the sentinel topology and the primary's facts."""
    diagnostics = await _diagnose(redis_sentinel.url)
    assert diagnostics.topology == "sentinel"
    assert diagnostics.server == redis_sentinel.url
    assert diagnostics.version
    assert _finding(diagnostics.findings, "scripts").level == "ok"
