"""Fixtures of the operators' calls: gates on each engine, sharing one namespace per test.

The servers are the session's (see ``tests/conftest.py``): a real ``redis-server``
and a throwaway PostgreSQL cluster, each test on a clean database and namespace.
Two gates of one test are two engines as two processes would have them (for
PostgreSQL: each with its own local lines), except on ``memory://``, whose gates of
one namespace share the process's state.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

import inturn

ENGINES = ["memory", "redis", "postgres"]


@dataclass
class Engine:
    """One engine for one test: its URL, a namespace, and the gates made (closed after)."""

    name: str
    url: str
    namespace: str = field(default_factory=lambda: f"ops{secrets.token_hex(4)}")
    gates: list[inturn.Gate] = field(default_factory=list)

    def gate(self, **options: float) -> inturn.Gate:
        made = inturn.Gate.from_url(self.url, namespace=self.namespace, **options)  # type: ignore[arg-type]
        self.gates.append(made)
        return made


def _url(request: pytest.FixtureRequest, name: str) -> str:
    if name == "memory":
        return "memory://"
    if name == "redis":
        return str(request.getfixturevalue("redis_url"))
    if name == "postgres":
        return f"{request.getfixturevalue('postgres_dsn')}?audit=1"
    raise AssertionError(name)


async def _close(engines: list[Engine]) -> None:
    for made in engines:
        for gate in reversed(made.gates):
            await gate.aclose()


@pytest.fixture(params=ENGINES)
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    """Each engine in turn."""
    made = Engine(str(request.param), _url(request, str(request.param)))
    yield made
    await _close([made])


@pytest.fixture
async def engines(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[str], Engine]]:
    """An engine by name, for tests of one engine's own behaviour."""
    made: list[Engine] = []

    def make(name: str) -> Engine:
        made.append(Engine(name, _url(request, name)))
        return made[-1]

    yield make
    await _close(made)
