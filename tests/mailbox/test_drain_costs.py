"""What the cheaper drain path must still do: renew a long drain's role, count stored bytes,
claim ids in a batch that mixes messages with and without one, take the key's turn with a
batch only when nobody holds or waits for it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import inturn
from inturn._backends.base import MailboxBackend, SubmitStatus


async def test_a_drain_longer_than_the_lease_keeps_its_role(gate: inturn.Gate) -> None:
    """The role is renewed from a third of the lease on (a timer, then a renewing task):
    a handler that runs for several leases keeps it, so the sweeper resumes nothing and
    a message submitted meanwhile waits for the same drainer, in order."""
    short = inturn.Gate(gate.backend, lease=0.3)
    started, seen = asyncio.Event(), []

    async def handler(msg: inturn.Message) -> None:
        started.set()
        seen.append(msg.payload)
        if msg.payload == 0:
            await asyncio.sleep(1.2)  # four leases

    box = short.mailbox("long-drain", handler=handler, sweep_interval=None)
    await box.submit("u", 0)
    await asyncio.wait_for(started.wait(), 10)
    await box.submit("u", 1)
    await asyncio.sleep(0.8)  # the role would have lapsed twice without renewals
    assert await box.is_draining("u")
    assert await box.sweep() == 0
    assert await box.drained(30)
    assert seen == [0, 1]
    assert not await box.is_draining("u")


async def test_the_size_limit_counts_the_stored_text(gate: inturn.Gate) -> None:
    """A non-ASCII payload is stored escaped (6 bytes a character): the limit counts that."""

    async def handler(msg: inturn.Message) -> None: ...

    box = gate.mailbox("sizes", handler=handler, max_payload_bytes=200)
    await box.submit("u", "x" * 20)
    with pytest.raises(inturn.InvalidPayload, match="max_payload_bytes"):
        await box.submit("u", "é" * 20)  # 40 bytes of UTF-8, 120 stored: over, with the envelope
    assert await box.drained(30)


async def test_a_batch_mixing_ids_and_none_claims_only_the_ids(gate: inturn.Gate) -> None:
    """Messages without an id skip the claims; with one, a resubmit is handled once."""
    handled: list[object] = []

    async def handler(batch: list[inturn.Message]) -> None:
        handled.extend(m.payload for m in batch)

    box = gate.mailbox("mixed", handler=handler, batch=True)
    await box.submit("u", "a", id="1")
    await box.submit("u", "b")
    assert await box.drained(30)
    await box.submit("u", "a again", id="1")  # a duplicate: claimed before, skipped
    await box.submit("u", "c")
    assert await box.drained(30)
    assert handled == ["a", "b", "c"]


async def test_a_batch_comes_with_the_keys_turn_only_when_it_is_free(gate: inturn.Gate) -> None:
    """The engine call behind a drain without JOINs: a submit that makes a drainer grants
    it the key's turn with the first batch only when nobody holds or waits for the turn;
    a release-and-take keeps the turn for the next batch (a new fence) only when nobody
    waits, and hands it to a waiter otherwise. Either way the turn excludes everyone else."""
    b = gate.backend
    if "postgres" in type(b).__module__:
        pytest.skip("PostgreSQL grants no turn with a batch: its drainer joins the line")
    assert isinstance(b, MailboxBackend)
    args: dict[str, Any] = {"max_pending": 10, "drop_oldest": False, "lease": 5.0, "take": 1}

    held = await b.join("busy", "holder", 5.0)  # held: the batch comes without the turn
    assert held is not None
    done = await b.mb_submit("bx", "busy", "m0", token="r0", turn=("t0", 5.0), **args)
    assert done.first is not None
    assert done.first.messages == ("m0",)
    assert done.first.turn is None
    assert not await b.is_held("busy", "t0")
    await b.release("busy", "holder")
    done = await b.mb_take("bx", "busy", "r0", limit=1, lease=5.0, ack=True)  # m0 handled
    assert done.messages == ()

    done = await b.mb_submit("bx", "u", "m1", token="r1", turn=("t1", 5.0), **args)
    assert done.status == SubmitStatus.DRAINER
    assert done.first is not None
    assert done.first.messages == ("m1",)
    first = done.first.turn
    assert first is not None
    assert await b.is_held("u", "t1")
    assert await b.try_acquire("u", "other", 5.0) is None  # the turn excludes others

    await b.mb_submit("bx", "u", "m2", token="r9", turn=("t9", 5.0), **args)  # queued
    kept = await b.mb_release_take(
        "bx", "u", "r1", "t1", limit=1, lease=5.0, ack=True, turn=("t2", 5.0)
    )
    assert kept.messages == ("m2",)
    assert kept.turn is not None
    assert kept.turn.fence > first.fence
    assert await b.is_held("u", "t2")
    assert not await b.is_held("u", "t1")

    assert await b.join("u", "waiter", 5.0) is None  # someone waits: it goes first
    await b.mb_submit("bx", "u", "m3", token="r9", turn=("t9", 5.0), **args)
    handed = await b.mb_release_take(
        "bx", "u", "r1", "t2", limit=1, lease=5.0, ack=True, turn=("t3", 5.0)
    )
    assert handed.messages == ("m3",)
    assert handed.turn is None
    grant = await b.wait("u", "waiter", 5.0)
    assert grant is not None
    assert grant.fence > kept.turn.fence
    assert not await b.is_held("u", "t3")
    await b.release("u", "waiter")
    empty = await b.mb_take("bx", "u", "r1", limit=1, lease=5.0, ack=True)
    assert empty.messages == ()
    assert not empty.lost_role

    # A plain take (a drainer that did not submit: a Celery worker, after a debounce)
    # asks for the turn the same way.
    stored = await b.mb_submit("bx", "v", "m4", token="r2", **{**args, "take": 0})
    assert stored.status == SubmitStatus.DRAINER
    assert await b.join("v", "holder", 5.0) is not None
    busy = await b.mb_take("bx", "v", "r2", limit=1, lease=5.0, ack=False, turn=("t4", 5.0))
    assert busy.messages == ("m4",)
    assert busy.turn is None
    await b.release("v", "holder")
    free = await b.mb_take("bx", "v", "r2", limit=1, lease=5.0, ack=False, turn=("t5", 5.0))
    assert free.messages == ("m4",)  # in flight, delivered again
    assert free.turn is not None
    assert await b.is_held("v", "t5")
    await b.release("v", "t5")
    empty = await b.mb_take("bx", "v", "r2", limit=1, lease=5.0, ack=True, turn=("t6", 5.0))
    assert empty.messages == ()
    assert not empty.lost_role
    assert await b.footprint() == 0  # every turn released, every box given up
