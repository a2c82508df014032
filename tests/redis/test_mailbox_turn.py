"""A mailbox message's turn, granted with its batch (no JOIN), after a lost reply.

The submit that makes a drainer grants it the key's turn too when the turn is free,
and a release-and-take keeps the turn for the next batch when nobody waits. A reply
lost after the server ran either script must not leave a turn that nobody uses: the
key would be blocked until that turn's lease ran out (30 s here)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import inturn
from inturn._backends.redis._shared import SHAS
from tests.redis.test_reliability import LosingProxy, proxy  # noqa: F401  (a fixture)

LEASE = 30.0
"""Far longer than each test's time limit: a turn left to lapse would fail the test."""


async def test_a_submit_whose_reply_is_lost_still_gets_its_turn(
    proxy: Callable[[bytes], LosingProxy],  # noqa: F811
) -> None:
    """The resent submit finds its message stored and its turn granted: it answers with
    that turn, and the message is handled at once, not after the lease."""
    marker = f"lost-{secrets.token_hex(4)}"
    lossy = proxy(marker.encode())
    gate = inturn.Gate.from_url(lossy.url(), namespace=f"mt{secrets.token_hex(3)}", lease=LEASE)
    handled: list[int] = []

    async def handle(message: inturn.Message) -> None:
        handled.append(message.fence)

    box = gate.mailbox("inbox", handler=handle, sweep_interval=None)
    try:
        async with asyncio.timeout(10):
            await box.submit("u", marker)
            assert lossy.lost.is_set()
            assert await box.drained(8)
            async with gate.turn("u", timeout=2) as turn:  # free: nothing left holding it
                assert turn.fence > handled[0]
        assert len(handled) == 1
    finally:
        await gate.aclose()


async def test_a_release_and_take_whose_reply_is_lost_leaves_no_turn_behind(
    proxy: Callable[[bytes], LosingProxy],  # noqa: F811
) -> None:
    """The release-and-take that acknowledged the first message and kept the turn for the
    second loses its reply (it is not sent again: it acknowledged). The drainer releases
    the turn it may have been given and takes again: the second message is handled once,
    soon, and the key ends free."""
    lossy = proxy(SHAS["mb_release_take"][0].encode())
    gate = inturn.Gate.from_url(lossy.url(), namespace=f"mt{secrets.token_hex(3)}", lease=LEASE)
    go = asyncio.Event()
    handled: list[int] = []

    async def handle(message: inturn.Message) -> None:
        handled.append(message.payload)
        if message.payload == 0:
            await go.wait()

    box = gate.mailbox("inbox", handler=handle, sweep_interval=None)
    try:
        async with asyncio.timeout(10):
            await box.submit("u", 0)
            await box.submit("u", 1)
            go.set()
            assert await box.drained(8)
            assert lossy.lost.is_set()
            async with gate.turn("u", timeout=2):
                pass
        assert handled == [0, 1]
    finally:
        await gate.aclose()
