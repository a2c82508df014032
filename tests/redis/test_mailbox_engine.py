"""The Redis engine's mailbox operations, async and sync, against a real redis-server.

These drive the backend contract directly (``mb_*``), not the ``Mailbox`` feature layer.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator

import pytest
import redis

from inturn._backends.base import Grant, ResumeStatus, SubmitStatus, Submitted, Taken
from inturn._backends.redis import RedisBackend, SyncRedisBackend

LEASE = 5.0


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend.from_url(redis_url, namespace=f"mb{secrets.token_hex(3)}")
    yield backend
    await backend.aclose()


def _names(redis_url: str, backend: RedisBackend) -> list[str]:
    """Every key name the backend's namespace holds now."""
    prefix = backend._process.keys.prefix
    with redis.Redis.from_url(redis_url) as client:
        return sorted(k.decode() for k in client.scan_iter(match=prefix + "*"))


async def _submit(
    backend: RedisBackend, key: str, message: str, token: str, take: int = 0
) -> Submitted:
    return await backend.mb_submit(
        "box",
        key,
        message,
        max_pending=10,
        drop_oldest=False,
        token=token,
        lease=LEASE,
        take=take,
    )


async def test_submit_statuses_and_first_take(backend: RedisBackend) -> None:
    """The first submitter becomes the drainer (with its first take); the next only queues."""
    first = await _submit(backend, "u", "m1", "d1", take=5)
    assert first.status is SubmitStatus.DRAINER
    assert first.first == Taken(messages=("m1",))
    second = await _submit(backend, "u", "m2", "d2", take=5)
    assert second.status is SubmitStatus.QUEUED
    assert second.first is None
    plain = await _submit(backend, "v", "m", "d3")
    assert plain.status is SubmitStatus.DRAINER
    assert plain.first is None


async def test_full_queue_refuses_or_drops(backend: RedisBackend) -> None:
    """max_pending refuses a message, or drops the oldest with drop_oldest."""
    for i in range(2):
        await backend.mb_submit(
            "box", "u", f"m{i}", max_pending=2, drop_oldest=False, token="d", lease=LEASE
        )
    refused = await backend.mb_submit(
        "box", "u", "x", max_pending=2, drop_oldest=False, token="d", lease=LEASE
    )
    assert refused.status is SubmitStatus.REFUSED
    dropped = await backend.mb_submit(
        "box", "u", "y", max_pending=2, drop_oldest=True, token="e", lease=LEASE
    )
    assert (dropped.status, dropped.dropped) == (SubmitStatus.QUEUED, 1)
    assert await backend.mb_pending("box", "u") == 2


async def test_not_before_is_stored_and_honoured(backend: RedisBackend, redis_url: str) -> None:
    """A retry's not_before holds the head back (retry_in), then it is taken; nothing is left."""
    await _submit(backend, "u", '{"opaque": true}', "d")
    taken = await backend.mb_take("box", "u", "d", limit=5, lease=LEASE, ack=False)
    assert taken.messages == ('{"opaque": true}',)
    await backend.mb_retry("box", "u", "d", ["again"], not_before=time.time() + 0.4)
    assert any(n.endswith(":m:box:n") for n in _names(redis_url, backend))
    waiting = await backend.mb_take("box", "u", "d", limit=5, lease=LEASE, ack=True)
    assert waiting.messages == ()
    assert not waiting.lost_role
    assert 0.2 < waiting.retry_in <= 0.4
    await asyncio.sleep(waiting.retry_in + 0.05)
    taken = await backend.mb_take("box", "u", "d", limit=5, lease=LEASE, ack=True)
    assert taken.messages == ("again",)
    assert not any(n.endswith(":m:box:n") for n in _names(redis_url, backend))
    empty = await backend.mb_take("box", "u", "d", limit=5, lease=LEASE, ack=True)
    assert empty == Taken()
    assert await backend.footprint() == 0
    assert _names(redis_url, backend) == []  # the hint set went with the last message


async def test_no_key_left_when_a_retried_box_is_dropped(
    backend: RedisBackend, redis_url: str
) -> None:
    """A resumed box keeps its retry time; a box that empties before it leaves no key behind."""
    await _submit(backend, "u", "m", "d", take=1)
    await backend.mb_retry("box", "u", "d", ["m"], not_before=time.time() + 60)
    assert (await backend.mb_take("box", "u", "d", limit=1, lease=LEASE, ack=True)).retry_in > 50
    # The sweeper resumes a box whose drainer died: the not-before still holds.
    with redis.Redis.from_url(redis_url) as client:
        client.delete(backend._process.keys.mailbox_keys("box", "u")[2])  # the role lapses
    assert await backend.mb_resume("box", "u", "s", lease=LEASE) is ResumeStatus.RESUMED
    assert (await backend.mb_take("box", "u", "s", limit=1, lease=LEASE, ack=False)).retry_in > 50
    with redis.Redis.from_url(redis_url) as client:  # an operator purges the queue
        client.delete(backend._process.keys.mailbox_keys("box", "u")[0])
    assert await backend.mb_take("box", "u", "s", limit=1, lease=LEASE, ack=True) == Taken()
    assert await backend.footprint() == 0
    assert _names(redis_url, backend) == []


async def test_resume_statuses(backend: RedisBackend, redis_url: str) -> None:
    """mb_resume: IDLE with nothing to drain, LIVE under a live drainer, RESUMED after it died."""
    assert await backend.mb_resume("box", "u", "s", lease=LEASE) is ResumeStatus.IDLE
    await _submit(backend, "u", "m1", "d", take=1)
    await _submit(backend, "u", "m2", "x")
    assert await backend.mb_resume("box", "u", "s", lease=LEASE) is ResumeStatus.LIVE
    with redis.Redis.from_url(redis_url) as client:
        client.delete(backend._process.keys.mailbox_keys("box", "u")[2])
    assert await backend.mb_resume("box", "u", "s", lease=LEASE) is ResumeStatus.RESUMED
    assert await backend.mb_draining("box", "u")
    taken = await backend.mb_take("box", "u", "s", limit=5, lease=LEASE, ack=False)
    assert taken.messages == ("m1", "m2")  # the in-flight one first
    assert (await backend.mb_take("box", "u", "d", limit=5, lease=LEASE, ack=True)).lost_role
    await backend.mb_done("box", "u", "s")
    assert await backend.mb_take("box", "u", "s", limit=5, lease=LEASE, ack=True) == Taken()
    assert await backend.mb_resume("box", "u", "s", lease=LEASE) is ResumeStatus.IDLE


async def test_sync_twin_mailbox_end_to_end(backend: RedisBackend, redis_url: str) -> None:
    """Every mailbox operation of the sync twin, from a thread, on the async twin's keys."""
    twin = backend.sync_twin()
    assert isinstance(twin, SyncRedisBackend)
    assert twin.never_blocks is False

    def run() -> None:
        submitted = twin.mb_submit(
            "box", "k", "a", max_pending=5, drop_oldest=False, token="d", lease=LEASE, take=2
        )
        assert submitted.status is SubmitStatus.DRAINER
        assert submitted.first == Taken(messages=("a",))
        assert (
            twin.mb_submit(
                "box", "k", "b", max_pending=5, drop_oldest=False, token="x", lease=LEASE
            ).status
            is SubmitStatus.QUEUED
        )
        assert twin.mb_pending("box", "k") == 1
        assert twin.mb_draining("box", "k")
        assert twin.mb_hinted("box") == ["k"]
        assert twin.mb_renew("box", "k", "d", lease=LEASE)
        assert not twin.mb_renew("box", "k", "x", lease=LEASE)
        twin.mb_retry("box", "k", "d", ["a2"], not_before=time.time() + 0.3)
        waiting = twin.mb_take("box", "k", "d", limit=5, lease=LEASE, ack=True)
        assert 0 < waiting.retry_in <= 0.3
        time.sleep(waiting.retry_in + 0.05)
        assert twin.mb_take("box", "k", "d", limit=5, lease=LEASE, ack=True).messages == (
            "a2",
            "b",
        )
        twin.mb_dead("box", ["dead-a2"])
        twin.mb_done("box", "k", "d")
        assert twin.mb_dead_letters("box", 10) == ["dead-a2"]
        assert twin.mb_resume("box", "k", "s", lease=LEASE) is ResumeStatus.LIVE
        assert twin.mb_take("box", "k", "d", limit=5, lease=LEASE, ack=True) == Taken()
        assert not twin.mb_draining("box", "k")
        assert twin.mb_resume("box", "k", "s", lease=LEASE) is ResumeStatus.IDLE
        twin.mb_hint("box", "k", False)
        assert twin.mb_hinted("box") == []

    await asyncio.wait_for(asyncio.to_thread(run), 30)
    assert await backend.mb_dead_letters("box", 10) == ["dead-a2"]
    assert _names(redis_url, backend) == [backend._process.keys.mailbox_index("box")[1]]


def test_sync_release_take_hands_the_turn_to_a_waiting_thread(redis_url: str) -> None:
    """Sync mb_release_take releases the drainer's turn to a thread waiting in this process
    (woken at once, with the next fence) and takes the next batch, in one script."""
    backend = RedisBackend.from_url(redis_url, namespace=f"rt{secrets.token_hex(3)}")
    twin = backend.sync_twin()
    try:
        held = twin.join("k", "drainer", LEASE)
        assert held is not None
        assert twin.join("k", "next", LEASE) is None
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(twin.wait("k", "next", 10)))
        waiter.start()
        twin.mb_submit(
            "box", "k", "m1", max_pending=5, drop_oldest=False, token="d", lease=LEASE, take=1
        )
        twin.mb_submit("box", "k", "m2", max_pending=5, drop_oldest=False, token="x", lease=LEASE)
        began = time.monotonic()
        taken = twin.mb_release_take("box", "k", "d", "drainer", limit=5, lease=LEASE, ack=True)
        assert taken.messages == ("m2",)
        waiter.join(10)
        assert time.monotonic() - began < 1.0
        grant = got[0]
        assert isinstance(grant, Grant)
        assert grant.fence > held.fence
        assert twin.is_held("k", "next")
        twin.release("k", "next")
        twin.mb_done("box", "k", "d")
        assert twin.mb_take("box", "k", "d", limit=5, lease=LEASE, ack=True) == Taken()
        assert twin.footprint() == 0
    finally:
        asyncio.run(backend.aclose())
