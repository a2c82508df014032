"""Closing a gate while turns wait in line: the waits end at once, with a clear error.

On every backend, from coroutines (``await gate.aclose()``) and threads (``gate.close()``):
each waiter raises ``BackendUnavailable(transient=False)`` naming its key, well before any
timeout; a turn held at that moment leaves its block without an error; the closed gate's
waiters leave the server's line, so a waiter of another gate on the same key gets the turn
as soon as the holder releases; and the Redis backend opens no connection on a loop it was
closed on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Sequence

import pytest
import redis

import inturn
from tests.redis.test_keys_and_cluster import cluster_url
from tests.servers import RedisServer

WAITERS = 3
ENDED_WITHIN = 2.0
"""Seconds within which every waiter must have ended after the close began (on an idle
machine it takes milliseconds; the waiters' own timeouts are far longer)."""


def _gate(
    request: pytest.FixtureRequest, backend: str, namespace: str, lease: float = 30.0
) -> inturn.Gate:
    if backend == "memory":
        return inturn.Gate.from_url("memory://", namespace=namespace, lease=lease)
    if backend == "cluster":
        url = cluster_url(request.getfixturevalue("redis_cluster"))
    elif backend == "sentinel":
        url = request.getfixturevalue("redis_sentinel").url
    else:
        url = request.getfixturevalue("redis_url" if backend == "redis" else "postgres_dsn")
    return inturn.Gate.from_url(url, namespace=namespace, lease=lease)


def _check_closed(error: BaseException | None) -> None:
    """The error of a call the close ended or refused: BackendUnavailable, not transient,
    saying the gate (or backend) was closed."""
    assert isinstance(error, inturn.BackendUnavailable), repr(error)
    assert error.transient is False, repr(error)
    assert "closed" in str(error), str(error)


def _check_closed_error(error: BaseException | None, key: str) -> None:
    _check_closed(error)
    assert "closed while" in str(error), str(error)
    assert repr(key) in str(error), str(error)


async def _aclose_and_wait(gate: inturn.Gate, tasks: Sequence[asyncio.Future[None]]) -> None:
    """Close ``gate`` on this loop: every task must have ended within ENDED_WITHIN of it
    (waited for longer, so that one still waiting shows as such, not as a hang)."""
    began = time.monotonic()
    await gate.aclose()
    done, _ = await asyncio.wait(tasks, timeout=ENDED_WITHIN + 8)
    ended = time.monotonic() - began
    assert len(done) == len(tasks), f"{len(tasks) - len(done)} still waiting"
    assert ended < ENDED_WITHIN, f"they ended {ended:.2f}s after the close began"


async def _holder_and_waiters(
    gate: inturn.Gate, let_go: asyncio.Event
) -> tuple[asyncio.Future[None], list[asyncio.Future[None]]]:
    """A task holding "k" until ``let_go``, and WAITERS tasks in line behind it (timeout
    30 s; a grant to one of them fails it)."""
    held = asyncio.Event()

    async def hold() -> None:
        async with gate.turn("k"):
            held.set()
            await let_go.wait()

    async def wait() -> None:
        async with gate.turn("k", timeout=30):
            raise AssertionError("granted after the gate closed")

    holder = asyncio.ensure_future(hold())
    await asyncio.wait_for(held.wait(), 10)
    waiters = [asyncio.ensure_future(wait()) for _ in range(WAITERS)]
    await asyncio.sleep(0.3)  # all in line
    return holder, waiters


@pytest.mark.parametrize("backend", ["memory", "redis", "cluster", "sentinel", "postgres"])
async def test_async_waiters_end_when_the_gate_closes(
    request: pytest.FixtureRequest, backend: str
) -> None:
    gate = _gate(request, backend, f"c{secrets.token_hex(4)}")
    let_go = asyncio.Event()
    holder, waiters = await _holder_and_waiters(gate, let_go)
    assert not any(w.done() for w in waiters)
    await _aclose_and_wait(gate, waiters)
    for waiter in waiters:
        _check_closed_error(waiter.exception(), "k")
    let_go.set()  # the holder's body ran on; leaving its block raises nothing
    await asyncio.wait_for(holder, 10)


@pytest.mark.parametrize("backend", ["memory", "redis", "cluster", "sentinel", "postgres"])
def test_thread_waiters_end_when_the_gate_closes(
    request: pytest.FixtureRequest, backend: str
) -> None:
    gate = _gate(request, backend, f"c{secrets.token_hex(4)}")
    held, let_go = threading.Event(), threading.Event()
    outcomes: dict[str, BaseException | None] = {}

    def run(name: str, body: Callable[[], None], timeout: float | None) -> None:
        try:
            with gate.turn_sync("k", timeout=timeout):
                body()
        except BaseException as exc:
            outcomes[name] = exc
        else:
            outcomes[name] = None

    def granted_late() -> None:
        raise AssertionError("granted after the gate closed")

    def holding() -> None:
        held.set()
        let_go.wait(30)

    holder = threading.Thread(target=run, args=("holder", holding, None), daemon=True)
    holder.start()
    assert held.wait(10)
    waiters = [
        threading.Thread(target=run, args=(f"w{i}", granted_late, 30), daemon=True)
        for i in range(WAITERS)
    ]
    for thread in waiters:
        thread.start()
    time.sleep(0.5)  # all in line
    assert not outcomes
    began = time.monotonic()
    gate.close()
    for thread in waiters:
        thread.join(began + ENDED_WITHIN + 3 - time.monotonic())
    ended = time.monotonic() - began
    assert all(not t.is_alive() for t in waiters), "a waiter still waits"
    assert ended < ENDED_WITHIN, f"the waiters ended {ended:.2f}s after the close began"
    for i in range(WAITERS):
        _check_closed_error(outcomes[f"w{i}"], "k")
    let_go.set()
    holder.join(10)
    assert not holder.is_alive()
    assert outcomes["holder"] is None, repr(outcomes["holder"])
    asyncio.run(gate.aclose())


@pytest.mark.parametrize("backend", ["memory", "redis", "postgres"])
@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_waiter_of_another_gate_is_not_held_up_by_the_closed_gates_waiters(
    request: pytest.FixtureRequest, backend: str, mode: str
) -> None:
    """The closed gate's waiters were ahead of it: they left the server's line, so it gets
    the turn as soon as the holder releases (not when their liveness or lease lapses)."""
    namespace = f"c{secrets.token_hex(4)}"
    closing, other = _gate(request, backend, namespace), _gate(request, backend, namespace)
    let_go = asyncio.Event()
    try:
        async with other.turn("k") as held:  # the holder: released below
            waiters: list[asyncio.Future[None]] = []
            for _ in range(WAITERS):
                waiters.append(asyncio.ensure_future(_wait_in(closing, mode, let_go)))
                await asyncio.sleep(0.1)  # in line in this order, ahead of `later`
            later = asyncio.ensure_future(_granted_after(other))
            await asyncio.sleep(0.3)
            assert held.fence
            assert not later.done()
            await _close(closing, mode)
            await asyncio.wait(waiters, timeout=ENDED_WITHIN + 3)
            for waiter in waiters:
                assert waiter.done()
                _check_closed_error(waiter.exception(), "k")
            released = time.monotonic()
        await _granted_soon_after(later, released, timeout=15)
    finally:
        let_go.set()
        await closing.aclose()
        await other.aclose()


@pytest.mark.parametrize("backend", ["memory", "redis", "sentinel", "postgres"])
@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_turn_held_across_the_close_ends_when_its_block_exits(
    request: pytest.FixtureRequest, backend: str, mode: str
) -> None:
    """Its body runs on after the close; leaving the block raises nothing and ends the turn,
    so a waiter of another gate gets it then, not when the lease (20 s) runs out."""
    namespace = f"c{secrets.token_hex(4)}"
    closing = _gate(request, backend, namespace, lease=20)
    other = _gate(request, backend, namespace, lease=20)
    held, let_go = threading.Event(), threading.Event()
    exits: list[BaseException | None] = []

    def body() -> None:
        held.set()
        assert let_go.wait(30)

    async def hold_async() -> None:
        async with closing.turn("k"):
            await asyncio.to_thread(body)

    def hold_sync() -> None:
        with closing.turn_sync("k"):
            body()

    async def hold() -> None:
        try:
            await (hold_async() if mode == "async" else asyncio.to_thread(hold_sync))
        except BaseException as exc:
            exits.append(exc)
        else:
            exits.append(None)

    try:
        holder = asyncio.ensure_future(hold())
        assert await asyncio.to_thread(held.wait, 10)
        later = asyncio.ensure_future(_granted_after(other))
        await asyncio.sleep(0.3)
        assert not later.done()
        await _close(closing, mode)
        await asyncio.sleep(0.2)
        assert not later.done()  # the holder still holds: its body runs on
        let_go.set()
        await asyncio.wait_for(holder, 10)
        released = time.monotonic()
        assert exits == [None], repr(exits)
        await _granted_soon_after(later, released, timeout=25)
    finally:
        let_go.set()
        await closing.aclose()
        await other.aclose()


async def _close(gate: inturn.Gate, mode: str) -> None:
    """Close the gate's side that ``mode`` uses: aclose() for tasks, close() for threads."""
    if mode == "async":
        await gate.aclose()
    else:
        await asyncio.to_thread(gate.close)


async def _wait_in(gate: inturn.Gate, mode: str, let_go: asyncio.Event) -> None:
    """Wait for the turn of "k" (a task or a thread); a granted turn is held until let go."""
    if mode == "async":
        async with gate.turn("k", timeout=30):
            await let_go.wait()
        return

    def in_thread() -> None:
        with gate.turn_sync("k", timeout=30):
            while not let_go.is_set():
                time.sleep(0.05)

    await asyncio.to_thread(in_thread)


async def _granted_after(gate: inturn.Gate) -> float:
    async with gate.turn("k", timeout=30):
        return time.monotonic()


async def _granted_soon_after(
    later: asyncio.Future[float], released: float, timeout: float
) -> None:
    """``later`` (a :func:`_granted_after`) got the turn within ENDED_WITHIN of ``released``."""
    granted = await asyncio.wait_for(later, timeout)
    assert granted - released < ENDED_WITHIN, f"granted {granted - released:.2f}s late"


def _clients(server: RedisServer) -> int:
    """Connections to ``server`` besides the one asking."""
    with redis.Redis.from_url(server.url) as admin:
        return len(admin.client_list()) - 1


async def test_redis_refuses_calls_on_a_loop_it_was_closed_on(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    """After aclose(), nothing on that loop keeps a connection open: the holder's release
    goes over a connection of its own, closed after it; the waiters' cleanups open none; a
    later call is refused with a clear error. Other loops go on."""
    server = make_redis_server()
    gate = inturn.Gate.from_url(server.url, namespace="closing")
    let_go = asyncio.Event()
    holder, waiters = await _holder_and_waiters(gate, let_go)
    await gate.aclose()
    let_go.set()
    await asyncio.wait_for(holder, 10)  # released on a connection of its own
    await asyncio.wait(waiters, timeout=5)
    for waiter in waiters:
        _check_closed_error(waiter.exception(), "k")
    await asyncio.sleep(0.3)  # the cleanups in the background have run
    assert await asyncio.to_thread(_clients, server) == 0
    owner = gate.backend._process.keys.turn_keys("k")[0]  # type: ignore[attr-defined]
    with redis.Redis.from_url(server.url) as admin:  # the release did end the turn
        assert admin.exists(owner) == 0
    with pytest.raises(inturn.BackendUnavailable, match="closed on this event loop") as caught:
        await gate.is_busy("k")
    assert caught.value.transient is False
    assert await asyncio.to_thread(_clients, server) == 0

    async def elsewhere() -> bool:  # another event loop of the process: served as before
        async with gate.turn("other"):
            busy = await gate.is_busy("other")
        await gate.aclose()
        return busy

    assert await asyncio.to_thread(asyncio.run, elsewhere()) is True


RACING_ROUNDS = 20
RACING_THREADS = 6


def _racing_round(gate: inturn.Gate, key: str, close_after: float) -> list[BaseException | None]:
    """RACING_THREADS threads ask for ``key`` (held elsewhere) at once while ``gate`` closes
    ``close_after`` seconds later; returns how each ended (None: it got the turn)."""
    start = threading.Barrier(RACING_THREADS + 1)
    outcomes: list[BaseException | None] = []

    def ask() -> None:
        start.wait(10)
        try:
            with gate.turn_sync(key, timeout=30):
                pass
        except BaseException as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)

    threads = [threading.Thread(target=ask, daemon=True) for _ in range(RACING_THREADS)]
    for thread in threads:
        thread.start()
    start.wait(10)
    time.sleep(close_after)
    began = time.monotonic()
    gate.close()
    for thread in threads:
        thread.join(ENDED_WITHIN + 3)
    ended = time.monotonic() - began
    assert all(not t.is_alive() for t in threads), "a thread still waits"
    assert ended < ENDED_WITHIN, f"the threads ended {ended:.2f}s after the close began"
    return outcomes


@pytest.mark.parametrize("backend", ["redis", "cluster"])
def test_threads_joining_as_the_gate_closes_leave_nobody_in_the_redis_line(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """A JOIN still on its way when close() takes the waiters out of their lines may reach
    Redis after closing's LEAVE: that thread leaves again, so nobody of the closed gate
    stays in line (a waiter of another gate would wait behind it until it lapsed)."""
    namespace = f"c{secrets.token_hex(4)}"
    holder = _gate(request, backend, namespace)
    left: list[int] = []
    try:
        for round_ in range(RACING_ROUNDS):
            gate = _gate(request, backend, namespace)
            with gate.turn_sync("warm-up"):  # the threads' side is connected and listening
                pass
            key = f"k{round_}"
            with holder.turn_sync(key):
                outcomes = _racing_round(gate, key, close_after=0.0005 * (round_ % 4))
                stats = holder.sync_backend.statistics(key)  # type: ignore[attr-defined]
                left.append(stats.keys[0].waiting if stats.keys else 0)
            for outcome in outcomes:  # the key was held: nobody got it
                assert isinstance(outcome, inturn.BackendUnavailable), repr(outcome)
                assert outcome.transient is False
    finally:
        holder.close()
    assert sum(left) == 0, f"tokens left in line per round: {left}"


@pytest.mark.parametrize("backend", ["memory", "redis", "postgres"])
def test_a_thread_that_asks_after_the_close_is_refused(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """The threads' side made after close() (nobody had used it before) is closed too: a
    thread that asks then fails at once instead of waiting in line through a side that
    nobody will ever close."""
    namespace = f"c{secrets.token_hex(4)}"
    holder, gate = _gate(request, backend, namespace), _gate(request, backend, namespace)
    try:
        gate.close()
        outcome: list[BaseException | None] = []

        def ask() -> None:  # in a thread of its own: this one, holding "k", would re-enter
            try:
                with gate.turn_sync("k", timeout=ENDED_WITHIN + 3):
                    outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        with holder.turn_sync("k"):
            began = time.monotonic()
            thread = threading.Thread(target=ask, daemon=True)
            thread.start()
            thread.join(ENDED_WITHIN + 5)
            assert time.monotonic() - began < ENDED_WITHIN, "it waited in line"
        assert isinstance(outcome[0], inturn.BackendUnavailable), repr(outcome[0])
        assert outcome[0].transient is False
    finally:
        holder.close()


@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_requests_on_a_gate_still_connecting_end_when_it_closes(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """Tasks whose first request waits for the loop's wake-up channel to be subscribed
    (nothing is in line yet) also end at the close, with the same non-transient error,
    instead of waiting out the connect timeout (5 s)."""
    namespace = f"c{secrets.token_hex(4)}"
    holder, gate = _gate(request, backend, namespace), _gate(request, backend, namespace)

    async def ask() -> None:
        async with gate.turn("k", timeout=30):
            raise AssertionError("granted after the gate closed")

    try:
        async with holder.turn("k"):
            asking = [asyncio.ensure_future(ask()) for _ in range(WAITERS)]
            for _ in range(3):  # each is now waiting for the subscription (a round trip away)
                await asyncio.sleep(0)
            await _aclose_and_wait(gate, asking)
        for task in asking:
            _check_closed(task.exception())
    finally:
        await holder.aclose()


@pytest.mark.parametrize("backend", ["redis", "cluster", "postgres"])
@pytest.mark.parametrize("warm", [False, True])
def test_threads_racing_the_close_end_when_it_closes(
    request: pytest.FixtureRequest, backend: str, warm: bool
) -> None:
    """Threads that ask as the gate closes end at once, whether their first request still
    waits for the gate to connect (Redis: the wake-up channel; PostgreSQL: the pool) or
    the gate was in use (``warm``), and none goes on through connections made anew."""
    namespace = f"c{secrets.token_hex(4)}"
    holder, gate = _gate(request, backend, namespace), _gate(request, backend, namespace)
    if warm:
        with gate.turn_sync("warm-up"):
            pass
    try:
        with holder.turn_sync("k"):
            outcomes = _racing_round(gate, "k", close_after=0.0)
        assert len(outcomes) == RACING_THREADS
        for outcome in outcomes:
            _check_closed(outcome)
    finally:
        holder.close()


CALLING_ROUNDS = 16
CALLING = 4
"""Threads (or tasks) calling while the gate closes, in each round."""


def _calling_gate(
    request: pytest.FixtureRequest, backend: str, server: RedisServer | None
) -> tuple[inturn.Gate, inturn.Mailbox]:
    namespace = f"c{secrets.token_hex(4)}"
    if server is not None:  # a server of the test's own: its connections can be counted
        gate = inturn.Gate.from_url(server.url, namespace=namespace)
    else:
        gate = _gate(request, backend, namespace)
    return gate, gate.mailbox("inbox", handler=_ignore)


def _ignore(message: object) -> None:
    """A mailbox handler (nothing is submitted)."""


def _check_refused(errors: Sequence[BaseException], server: RedisServer | None) -> None:
    """Each caller ended with the non-transient closed error; on a server of the test's
    own, no connection stayed open."""
    assert len(errors) == CALLING
    for error in errors:
        _check_closed(error)
    if server is not None:
        assert _clients(server) == 0


def _call_until_refused(
    gate: inturn.Gate, mailbox: inturn.Mailbox, n: int, start: threading.Barrier
) -> BaseException:
    """Thread ``n``: turns of its own keys (each checked on the server with
    ``turn.check()``) and a mailbox's queue length, over and over; returns the error
    that ended it (the close, at the latest the first call after it)."""
    start.wait(10)
    try:
        for i in itertools.count():
            with gate.turn_sync(f"t{n}.{i % 3}", timeout=10) as turn:
                turn.check()
            mailbox.pending_sync(f"t{n}")
    except BaseException as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize("backend", ["redis", "cluster", "sentinel", "postgres"])
def test_calls_of_threads_racing_the_close_fail_only_with_the_closed_error(
    request: pytest.FixtureRequest, make_redis_server: Callable[[], RedisServer], backend: str
) -> None:
    """Threads busy with turns (and ``turn.check()``) and a mailbox's queue length while
    the gate closes: whatever call the close cuts short, or comes after it, fails with
    the non-transient closed error, never with what a cut connection made the client
    library raise; and on Redis no connection stays open once close() returned."""
    server = make_redis_server() if backend == "redis" else None
    for round_ in range(CALLING_ROUNDS):
        gate, mailbox = _calling_gate(request, backend, server)
        start = threading.Barrier(CALLING + 1)
        with concurrent.futures.ThreadPoolExecutor(CALLING) as pool:
            calls = [
                pool.submit(_call_until_refused, gate, mailbox, n, start) for n in range(CALLING)
            ]
            start.wait(10)
            time.sleep(0.002 * (round_ % 6))  # cold (the first turns connecting) to warm
            gate.close()
            done, _ = concurrent.futures.wait(calls, timeout=ENDED_WITHIN + 3)
            assert len(done) == CALLING, "a thread still calls"
        _check_refused([call.result() for call in calls], server)


async def _acall_until_refused(gate: inturn.Gate, mailbox: inturn.Mailbox, n: int) -> None:
    """Task ``n``: as :func:`_call_until_refused`, plus ``gate.is_busy``; raises the error
    that ended it."""
    for i in itertools.count():
        async with gate.turn(f"t{n}.{i % 3}", timeout=10) as turn:
            await turn.check()
        await mailbox.pending(f"t{n}")
        await gate.is_busy(f"t{n}.0")


@pytest.mark.parametrize("backend", ["redis", "cluster", "sentinel", "postgres"])
async def test_calls_of_tasks_racing_the_close_fail_only_with_the_closed_error(
    request: pytest.FixtureRequest, make_redis_server: Callable[[], RedisServer], backend: str
) -> None:
    """The same with tasks of one event loop and ``await gate.aclose()``: no call ends with
    another error, and no connection a call took or made as the close ran stays open."""
    server = make_redis_server() if backend == "redis" else None
    for round_ in range(CALLING_ROUNDS):
        gate, mailbox = _calling_gate(request, backend, server)
        calls = [
            asyncio.ensure_future(_acall_until_refused(gate, mailbox, n)) for n in range(CALLING)
        ]
        await asyncio.sleep(0.002 * (round_ % 8))
        await gate.aclose()
        done, _ = await asyncio.wait(calls, timeout=ENDED_WITHIN + 3)
        assert len(done) == CALLING, "a task still calls"
        errors = [call.exception() for call in calls]
        _check_refused([e for e in errors if e is not None], server)
