"""What the cheaper drain path must still do: renew a long drain's role, count stored bytes,
claim ids in a batch that mixes messages with and without one."""

from __future__ import annotations

import asyncio

import pytest

import inturn


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
