"""Statistics and diagnostics on every backend: what ``inturn status`` and ``doctor`` show.

A snapshot names each busy key with its holder, fence, lease left and line
length, each non-empty mailbox queue, and the dead letters per mailbox; an idle
namespace shows nothing. Diagnostics name the backend and report findings.
"""

from __future__ import annotations

import asyncio
import time

import inturn
from tests.contract.conftest import Driver


async def test_a_held_key_with_a_line(driver: Driver) -> None:
    """One holder and two waiters: holder, fence, lease left and waiting=2 are reported."""
    gate = driver.gate
    holder = driver.hold("stats-key")
    await holder.wait_granted()
    waiters = [driver.hold("stats-key") for _ in range(2)]
    deadline = time.monotonic() + 5
    while True:
        snap = await gate.statistics("stats-key")
        if (snap.keys and snap.keys[0].waiting == 2) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert len(snap.keys) == 1
    state = snap.keys[0]
    assert state.key == "stats-key"
    assert state.waiting == 2
    assert state.fence == holder.fence
    assert state.holder
    assert state.lease_left is not None
    assert 0 < state.lease_left <= gate.lease
    await holder.release()
    for w in waiters:
        await w.wait_granted()
        await w.release()
    assert (await gate.statistics("stats-key")).keys == ()


async def test_an_idle_namespace_shows_nothing(gate: inturn.Gate) -> None:
    """Nothing busy, nothing queued: an empty snapshot of the gate's namespace."""
    async with gate.turn("idle-1"):
        pass
    snap = await gate.statistics()
    assert snap.keys == ()
    assert snap.boxes == ()
    assert not snap.truncated


async def test_mailbox_queues_and_dead_letters(gate: inturn.Gate) -> None:
    """A queue with a drainer at work, and a dead letter, show in the snapshot."""
    release = asyncio.Event()
    entered = asyncio.Event()

    async def handler(msg: inturn.Message) -> None:
        if msg.payload == "poison":
            raise ValueError("no")
        entered.set()
        await release.wait()

    box = gate.mailbox("stats-box", handler=handler, max_attempts=1)
    await box.submit("p", "poison")
    await box.submit("u", 1)
    await asyncio.wait_for(entered.wait(), 5)
    await box.submit("u", 2)
    await box.submit("u", 3)
    snap = await gate.statistics()
    boxes = {(b.mailbox, b.key): b for b in snap.boxes}
    assert boxes[("stats-box", "u")].queued == 2
    assert boxes[("stats-box", "u")].draining
    release.set()
    assert await box.drained(10)
    snap = await gate.statistics()
    assert snap.boxes == ()
    assert snap.dead_letters.get("stats-box") == 1


async def test_limit_truncates(gate: inturn.Gate) -> None:
    """More busy keys than ``limit``: at most ``limit`` listed, ``truncated`` set."""
    held = [gate.turn(f"many-{n}") for n in range(5)]
    for request in held:
        await request.__aenter__()
    try:
        snap = await gate.statistics(limit=3)
        assert len(snap.keys) == 3
        assert snap.truncated
    finally:
        for request in held:
            await request.__aexit__(None, None, None)


async def test_diagnose_names_the_backend(gate: inturn.Gate) -> None:
    """diagnose() answers with the backend's name, its server (no password) and findings."""
    report = await gate.diagnose()
    assert isinstance(report, inturn.Diagnostics)
    assert report.backend in {"memory", "redis", "postgresql"}
    assert ":secret@" not in report.server
    assert all(f.level in {"ok", "warning", "error"} for f in report.findings)
