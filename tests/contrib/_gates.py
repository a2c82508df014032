"""Gates on each backend the Telegram integrations are tested on."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator

import pytest

import inturn


@pytest.fixture(params=["memory", "redis", "postgres"])
def backend_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url" if request.param == "redis" else "postgres_dsn")
    return url


@pytest.fixture
async def gate(backend_url: str) -> AsyncIterator[inturn.Gate]:
    gate = inturn.Gate.from_url(backend_url, namespace=f"tg{secrets.token_hex(4)}")
    yield gate
    await gate.aclose()


async def assert_idle(gate: inturn.Gate, timeout: float = 5.0) -> None:
    """Nothing is left per user once every update is handled (a last release may be on its
    way when the last reply was recorded: it has `timeout` seconds to land)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await gate.statistics()
        footprint = await gate.backend.footprint()
        if (stats.keys, stats.boxes, footprint) == ((), (), 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert stats.keys == ()
    assert stats.boxes == ()
    assert footprint == 0


def overlaps(spans: list[tuple[float, float]]) -> int:
    """How many of the (start, end) spans began before the previous one ended."""
    ordered = sorted(spans)
    return sum(1 for a, b in itertools.pairwise(ordered) if b[0] < a[1])
