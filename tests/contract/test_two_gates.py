"""Two gates on one URL and namespace are one backend, on every engine.

They exclude each other (also ``memory://``, whose gates in one process share one
state per namespace), and a task that holds a key through one gate and asks
through the other gets its own turn back instead of waiting for itself.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

import inturn


@pytest.fixture
async def twins(
    request: pytest.FixtureRequest, backend_name: str
) -> AsyncIterator[tuple[inturn.Gate, inturn.Gate]]:
    if backend_name == "memory":
        url = "memory://"
    elif backend_name == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = request.getfixturevalue("postgres_dsn")
    namespace = f"t{secrets.token_hex(4)}"
    a = inturn.Gate.from_url(url, namespace=namespace)
    b = inturn.Gate.from_url(url, namespace=namespace)
    yield a, b
    await a.aclose()
    await b.aclose()


async def test_two_gates_exclude_each_other(twins: tuple[inturn.Gate, inturn.Gate]) -> None:
    """A holder through one gate makes the key busy through the other; FIFO hands it on."""
    a, b = twins
    order: list[str] = []

    async def try_b() -> None:
        async with b.turn_nowait("u"):
            pass

    async with a.turn("u") as first:
        with pytest.raises(inturn.Busy):
            await asyncio.ensure_future(try_b())  # another task: not a re-entry

        async def second() -> int:
            async with b.turn("u", timeout=10) as turn:
                order.append("b")
                return turn.fence

        waiting = asyncio.ensure_future(second())
        await asyncio.sleep(0.1)
        order.append("a")
    assert await waiting > first.fence
    assert order == ["a", "b"]


async def test_holding_through_one_gate_and_asking_through_the_other(
    twins: tuple[inturn.Gate, inturn.Gate],
) -> None:
    """The same task asking again through the twin gate re-enters: no self-deadlock."""
    a, b = twins
    async with a.turn("u") as outer, asyncio.timeout(5), b.turn("u") as inner:
        assert inner is outer


async def test_gates_of_other_namespaces_stay_apart() -> None:
    """memory:// gates of two namespaces do not exclude each other."""
    a = inturn.Gate.from_url("memory://", namespace="one")
    b = inturn.Gate.from_url("memory://", namespace="two")
    try:
        async with a.turn("u"), b.turn_nowait("u"):
            pass
    finally:
        await a.aclose()
        await b.aclose()


async def test_closing_the_last_memory_gate_drops_its_state() -> None:
    """The shared state lives while a gate of the namespace is open, not longer."""
    a = inturn.Gate.from_url("memory://", namespace="closing")
    dedup = a.dedup("scope")
    async with dedup.claim("u", "m1"):
        pass
    await a.aclose()
    b = inturn.Gate.from_url("memory://", namespace="closing")
    try:
        async with b.dedup("scope").claim("u", "m1"):  # not a duplicate: a fresh state
            pass
    finally:
        await b.aclose()
