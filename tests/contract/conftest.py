"""The contract suite's fixtures: one gate per backend, driven from coroutines or threads.

To add a backend, add its name to ``BACKENDS`` and a branch to ``make_gate``; every
test in this folder then runs against it, in both modes.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest

import inturn
from inturn.testing import History

T = TypeVar("T")

BACKENDS = ["memory", "redis", "postgres"]
MODES = ["async", "sync"]


def make_gate(request: pytest.FixtureRequest, backend: str, **options: float) -> inturn.Gate:
    if backend == "memory":  # a namespace of its own: memory:// state is per namespace
        namespace = f"t{secrets.token_hex(4)}"
        return inturn.Gate.from_url("memory://", namespace=namespace, **options)  # type: ignore[arg-type]
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        namespace = f"t{secrets.token_hex(4)}"
        return inturn.Gate.from_url(url, namespace=namespace, **options)  # type: ignore[arg-type]
    if backend == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        namespace = f"t{secrets.token_hex(4)}"
        return inturn.Gate.from_url(dsn, namespace=namespace, **options)  # type: ignore[arg-type]
    raise AssertionError(f"unknown backend {backend}")


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def gate(request: pytest.FixtureRequest, backend_name: str) -> AsyncIterator[inturn.Gate]:
    g = make_gate(request, backend_name)
    yield g
    await g.aclose()


@pytest.fixture
def gate_factory(request: pytest.FixtureRequest, backend_name: str) -> Callable[..., inturn.Gate]:
    """Gates with other options (a short lease, say) on the same backend."""
    return lambda **options: make_gate(request, backend_name, **options)


def in_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``fn`` in a new thread; the returned future resolves on this loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: object) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)  # type: ignore[arg-type]
        else:
            future.set_exception(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result: object = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(deliver, False, exc)
        else:
            loop.call_soon_threadsafe(deliver, True, result)

    threading.Thread(target=run, daemon=True).start()
    return future


class Holder:
    """Holds a key's turn until told to let go, from a task (async) or a thread (sync)."""

    def __init__(self, driver: Driver, key: str | int, *, timeout: float | None = None) -> None:
        self.driver = driver
        self.key = key
        self.timeout = timeout
        self.granted = asyncio.Event()
        self.fence = 0
        self._go_async = asyncio.Event()
        self._go_sync = threading.Event()
        self.done: asyncio.Future[None] | None = None

    def start(self) -> Holder:
        gate, loop = self.driver.gate, asyncio.get_running_loop()
        if self.driver.mode == "async":

            async def run() -> None:
                async with gate.turn(self.key, timeout=self.timeout) as turn:
                    self.fence = turn.fence
                    self.granted.set()
                    await self._go_async.wait()

            self.done = asyncio.ensure_future(run())
        else:

            def run_sync() -> None:
                with gate.turn_sync(self.key, timeout=self.timeout) as turn:
                    self.fence = turn.fence
                    loop.call_soon_threadsafe(self.granted.set)
                    self._go_sync.wait()

            self.done = in_thread(run_sync)
        return self

    async def wait_granted(self, within: float = 5.0) -> None:
        assert self.done is not None
        waiter = asyncio.ensure_future(self.granted.wait())
        finished, _ = await asyncio.wait(
            {waiter, self.done}, timeout=within, return_when="FIRST_COMPLETED"
        )
        waiter.cancel()
        if self.done in finished:
            self.done.result()  # raise its error
        assert self.granted.is_set(), f"not granted within {within}s"

    async def release(self) -> None:
        self._go_async.set()
        self._go_sync.set()
        assert self.done is not None
        await self.done


class Driver:
    """Runs turns in one of the two modes: ``async`` (tasks) or ``sync`` (threads)."""

    def __init__(self, gate: inturn.Gate, mode: str) -> None:
        self.gate = gate
        self.mode = mode

    def hold(self, key: str | int, *, timeout: float | None = None) -> Holder:
        return Holder(self, key, timeout=timeout).start()

    async def run(
        self,
        key: str | int,
        history: History,
        *,
        hold: float = 0.0,
        timeout: float | None = None,
        worker: str = "w",
    ) -> None:
        """Take the turn, record a span of ``hold`` seconds, release."""
        gate = self.gate
        if self.mode == "async":
            async with gate.turn(key, timeout=timeout) as turn:
                with history.span(turn, worker):
                    await asyncio.sleep(hold)
            return

        def run_sync() -> None:
            with gate.turn_sync(key, timeout=timeout) as turn, history.span(turn, worker):
                time.sleep(hold)

        await in_thread(run_sync)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def driver(gate: inturn.Gate, mode: str) -> Driver:
    return Driver(gate, mode)
