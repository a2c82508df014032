"""Messages of one key submitted concurrently from one event loop are queued in call order,
on every engine (PostgreSQL's pool sends each submit on a connection of its own, where a
later call can overtake an earlier one)."""

from __future__ import annotations

import asyncio

import inturn


async def test_concurrent_submits_of_one_key_keep_call_order(gate: inturn.Gate) -> None:
    seen: list[int] = []

    async def handler(msg: inturn.Message) -> None:
        seen.append(int(msg.payload["n"]))

    box = gate.mailbox("order", handler=handler)
    rounds = 4
    for r in range(rounds):  # each round: 25 tasks started in order, all at once
        await asyncio.gather(
            *(box.submit("u1", {"n": r * 25 + i}, id=r * 25 + i) for i in range(25))
        )
    assert await box.drained(timeout=30)
    assert seen == list(range(rounds * 25))
    await box.aclose()
