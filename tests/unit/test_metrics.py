"""Metrics hooks: the gate counts grants, waits, timeouts, lost leases, skips, dedup hits."""

from __future__ import annotations

import asyncio

import pytest

import inturn


async def test_turn_counts_and_timings() -> None:
    gate = inturn.Gate(lease=5.0)
    async with gate.turn("k"):
        with pytest.raises(inturn.TurnTimeout):
            async with asyncio.timeout(5):
                await asyncio.ensure_future(_enter(gate, "k", 0.01))
        with pytest.raises(inturn.Busy):
            await asyncio.ensure_future(_enter_nowait(gate, "k"))
    async with gate.turn("k", max_hold=0.05):
        await asyncio.sleep(0.15)
    snap = gate.metrics.snapshot()  # type: ignore[attr-defined]
    assert snap["turns_granted"] == 2
    assert snap["turn_timeouts"] == 1
    assert snap["turns_busy"] == 1
    assert snap["leases_lost{reason=max_hold}"] == 1
    hold = snap["turn_hold_seconds"]
    assert isinstance(hold, inturn.Summary)
    assert hold.count == 2
    assert hold.max >= 0.15


async def test_serialize_and_mailbox_counts() -> None:
    gate = inturn.Gate()

    @gate.serialize(key="u", dedup="m")
    async def f(u: int, m: int) -> int:
        return m

    await f(1, 1)
    await f(1, 1)

    async def handler(msg: inturn.Message) -> None:
        if msg.payload == "bad":
            raise ValueError("bad")

    box = gate.mailbox("b", handler=handler, max_attempts=1)
    await box.submit("u", "ok")
    await box.submit("u", "bad")
    await box.drained()
    snap = gate.metrics.snapshot()  # type: ignore[attr-defined]
    assert (
        snap[
            "dedup_duplicates{scope=tests.unit.test_metrics.test_serialize_and_mailbox_counts.<locals>.f}"
        ]
        == 1
    )
    assert snap["mailbox_submitted{mailbox=b}"] == 2
    assert snap["mailbox_handled{mailbox=b}"] == 1
    assert snap["mailbox_dead_letters{mailbox=b}"] == 1


def test_a_custom_sink_receives_everything() -> None:
    seen: list[tuple[str, float, dict[str, str]]] = []

    class Sink:
        def count(self, name: str, value: float = 1.0, **labels: str) -> None:
            seen.append((name, value, labels))

        def observe(self, name: str, value: float, **labels: str) -> None:
            seen.append((name, value, labels))

    gate = inturn.Gate(metrics=Sink())
    with gate.turn_sync("k"):
        pass
    assert [name for name, _, _ in seen] == [
        "turns_granted",
        "turn_wait_seconds",
        "turn_hold_seconds",
    ]


async def _enter(gate: inturn.Gate, key: str, timeout: float) -> None:
    async with gate.turn(key, timeout=timeout):
        pass


async def _enter_nowait(gate: inturn.Gate, key: str) -> None:
    async with gate.turn_nowait(key):
        pass


async def test_log_records_can_hide_user_keys(caplog: pytest.LogCaptureFixture) -> None:
    """log_keys("hash"): records name a short stable hash, never the user id; grants are
    logged at DEBUG, give-ups and lost leases at WARNING, with key and fence attributes."""
    import logging

    gate = inturn.Gate.from_url("memory://", namespace="privacy")
    inturn.log_keys("hash")
    try:
        with caplog.at_level(logging.DEBUG, logger="inturn"):
            async with gate.turn("alice@example.com") as turn:
                with pytest.raises(inturn.TurnTimeout):
                    await asyncio.ensure_future(_late(gate))
    finally:
        inturn.log_keys("full")
        await gate.aclose()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "alice" not in text
    granted = [r for r in caplog.records if "granted" in r.getMessage()]
    assert granted
    assert granted[0].levelno == logging.DEBUG
    assert granted[0].inturn_fence == turn.fence  # type: ignore[attr-defined]
    assert granted[0].inturn_key.startswith("#")  # type: ignore[attr-defined]
    gave_up = [r for r in caplog.records if "gave up" in r.getMessage()]
    assert gave_up
    assert gave_up[0].levelno == logging.WARNING
    with pytest.raises(inturn.ConfigurationError):
        inturn.log_keys("plain")  # type: ignore[arg-type]


async def _late(gate: inturn.Gate) -> None:
    async with gate.turn("alice@example.com", timeout=0.05):
        pass
