"""``turn.lost`` answers from the holder's own clock, on every backend.

A holder whose event loop was blocked past its lease must read ``lost`` as set the
moment it asks, before any timer had a chance to run; otherwise
``if not turn.lost.is_set(): write()`` right after a blocking call writes anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

import inturn


async def test_lost_is_set_right_after_the_loop_was_blocked(
    gate: inturn.Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """Blocked 0.5 s with a 0.3 s lease: lost is set at the first look, reason "expired"."""
    with caplog.at_level(logging.WARNING, logger="inturn"):
        async with gate.turn("blocked", lease=0.3) as turn:
            time.sleep(0.5)  # the loop cannot run the renewal timer
            assert turn.lost.is_set()
            assert turn.lost_reason == "expired"
    assert any("lost the turn of key 'blocked'" in r.getMessage() for r in caplog.records)


async def test_a_live_lease_reads_not_lost(gate: inturn.Gate) -> None:
    """The clock check does not invent losses: a renewed holder reads not lost."""
    async with gate.turn("alive", lease=0.3) as turn:
        for _ in range(5):
            await asyncio.sleep(0.1)
            assert not turn.lost.is_set()


async def test_check_after_the_block_says_released_not_lost(gate: inturn.Gate) -> None:
    """After the block exits, check() is False and the turn is not reported as lost."""
    async with gate.turn("done") as turn:
        pass
    assert not await turn.check()
    assert turn.lost_reason is None
    assert "released" in repr(turn)


async def test_sync_check_after_the_block_says_released_not_lost(gate: inturn.Gate) -> None:
    """The thread twin: check() after the block is False, with no loss recorded."""

    def run() -> inturn.SyncTurn:
        with gate.turn_sync("done-sync") as turn:
            pass
        assert not turn.check()
        return turn

    turn = await asyncio.to_thread(run)
    assert turn.lost_reason is None
    assert not turn.lost.is_set()
