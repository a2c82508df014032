"""Gates for the dedup and decorator tests: every backend that keeps dedup marks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import inturn
from tests.contract.conftest import make_gate


@pytest.fixture(params=["memory", "redis", "postgres"])
async def gate(request: pytest.FixtureRequest) -> AsyncIterator[inturn.Gate]:
    g = make_gate(request, str(request.param))
    yield g
    await g.aclose()
