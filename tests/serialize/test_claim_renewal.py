"""A dedup claim is renewed while its claimant runs, on every backend.

An LLM call can outlast the claim's lease; a redelivered duplicate must still
find the id in progress, and the first run's result must still be recorded. If
the claim is taken over all the same (a newer turn claims the id), the first
claimant is told: ``claim.lost`` and a WARNING.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

import inturn


async def test_a_long_run_keeps_duplicates_out(gate: inturn.Gate) -> None:
    """Running 1 s on a 0.3 s claim: a duplicate is in progress, then done with the result."""
    dedup = gate.dedup("long-llm")
    async with dedup.claim("u", "m1", lease=0.3) as claim:
        await asyncio.sleep(1.0)
        with pytest.raises(inturn.Duplicate) as during:
            async with dedup.claim("u", "m1", lease=0.3):
                pass
        assert during.value.state == "in_progress"
        claim.result = "answer"
    assert not claim.lost
    with pytest.raises(inturn.Duplicate) as after:
        async with dedup.claim("u", "m1"):
            pass
    assert after.value.state == "done"
    assert after.value.result == "answer"


async def test_a_long_run_keeps_duplicates_out_from_threads(gate: inturn.Gate) -> None:
    """The thread twin renews too (on the timer thread's pool)."""
    dedup = gate.dedup("long-llm-sync")

    def run() -> str:
        with dedup.claim_sync("u", "m1", lease=0.3) as claim:
            time.sleep(1.0)
            try:
                with dedup.claim_sync("u", "m1", lease=0.3):
                    pass
            except inturn.Duplicate as dup:
                state = dup.state
            claim.result = "answer"
        assert not claim.lost
        return state

    assert await asyncio.to_thread(run) == "in_progress"


async def test_a_claim_taken_over_is_reported(
    gate: inturn.Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """A newer turn's claim (greater fence) takes the id over: the first claimant learns it."""
    dedup = gate.dedup("taken-over")
    with caplog.at_level(logging.WARNING, logger="inturn"):
        async with dedup.claim("u", "m1", fence=1, lease=0.3) as first:
            async with dedup.claim("u", "m1", fence=2, lease=5):
                await asyncio.sleep(0.5)  # the first claim's renewal runs meanwhile
            assert first.lost
    assert any("was taken over" in r.getMessage() for r in caplog.records)
