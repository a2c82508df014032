"""The Redis backend under faults: a killed, paused, stopped or restarted server, a lease lost
behind the holder's back, a full server, an evicting server, and a waiter whose process died.

Every test runs against a real `redis-server` (a private one when the test breaks it) and is
bounded in time: a fault must end in an exception or a grant, never in a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis
import redis.asyncio

import inturn
from inturn._backends.redis._shared import CONNECT_TIMEOUT
from tests.servers import RedisServer


@pytest.fixture(autouse=True)
def _collect_abandoned_connections() -> Iterator[None]:
    """Finalise, here, the sockets these tests abandon on purpose.

    A request that gives up at its deadline leaves redis-py's connection blocked on
    a stalled server; redis-py cannot close it without awaiting the server, so it is
    dropped and closed by the garbage collector, with a ResourceWarning. Collect it
    inside this module, where that is expected, not in some later test.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


SLACK = 0.5
"""Seconds a failure may arrive after the caller's timeout (scheduling, one cleanup call)."""

MakeServer = Callable[..., RedisServer]


def _namespace() -> str:
    return f"f{secrets.token_hex(4)}"


def _owner_key(namespace: str, key: str) -> str:
    # Alphanumeric namespaces and keys are not escaped (see inturn._backends.redis._keys).
    return f"inturn:{namespace}:{{{key}}}:o"


def _line_key(namespace: str, key: str) -> str:
    return f"inturn:{namespace}:{{{key}}}:q"


class Holding:
    """Holds a key's turn in a task until `release()`."""

    def __init__(self, gate: inturn.Gate, key: str, **options: float) -> None:
        self.turn: inturn.Turn | None = None
        self._granted = asyncio.Event()
        self._done = asyncio.Event()
        self._task = asyncio.ensure_future(self._hold(gate, key, options))

    async def _hold(self, gate: inturn.Gate, key: str, options: dict[str, float]) -> None:
        async with gate.turn(key, **options) as turn:  # type: ignore[arg-type]
            self.turn = turn
            self._granted.set()
            await self._done.wait()

    async def granted(self) -> inturn.Turn:
        waiter = asyncio.ensure_future(self._granted.wait())
        await asyncio.wait((waiter, self._task), timeout=5, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._task.done():
            self._task.result()  # raises what the request raised
        assert self.turn is not None, "the holder was not granted within 5 s"
        return self.turn

    async def release(self) -> None:
        self._done.set()
        async with asyncio.timeout(10):
            await self._task


@contextlib.asynccontextmanager
async def _gate(
    url: str, *, namespace: str | None = None, **options: float
) -> AsyncIterator[inturn.Gate]:
    namespace = namespace or _namespace()
    gate = inturn.Gate.from_url(url, namespace=namespace, **options)  # type: ignore[arg-type]
    try:
        yield gate
    finally:
        await gate.aclose()


@dataclasses.dataclass
class Outcome:
    error: BaseException | None
    """What the request raised (None: granted)."""
    took: float
    """Seconds from the request to its end (after the resume if it was late)."""
    in_time: bool
    """Whether it ended within the bound."""

    def check(self, bound: float) -> None:
        assert self.in_time, (
            f"still running {bound:.1f}s after the request (it ended after {self.took:.2f}s, "
            f"with {self.error!r}, once the server was resumed)"
        )


async def _outcome(
    request: inturn.TurnRequest, bound: float, server: RedisServer | None = None
) -> Outcome:
    """Enter `request` (and leave at once) and report how it ended.

    If it is still running `bound` seconds after it started, a paused `server` is resumed so
    that it ends and the test stays short.
    """
    started = time.monotonic()
    ended: list[float] = []

    async def enter() -> None:
        async with request:
            pass

    task = asyncio.ensure_future(enter())
    task.add_done_callback(lambda _: ended.append(time.monotonic()))
    await asyncio.wait((task,), timeout=bound)
    in_time = task.done()
    if not in_time and server is not None:
        server.resume()
    try:
        async with asyncio.timeout(30):
            await asyncio.shield(task)
    except Exception as exc:
        error: BaseException | None = exc
    else:
        error = None
    return Outcome(error, ended[0] - started if ended else math.inf, in_time)


# -- an unreachable server: BackendUnavailable, never a hang ------------------------------


async def test_waiter_gets_backend_unavailable_when_the_server_is_killed(
    make_redis_server: MakeServer,
) -> None:
    """A waiter whose server is SIGKILLed raises BackendUnavailable within its timeout."""
    server = make_redis_server()
    async with _gate(server.url) as gate:
        holder = Holding(gate, "k")
        await holder.granted()
        asyncio.get_running_loop().call_later(0.3, server.kill)
        outcome = await _outcome(gate.turn("k", timeout=2), 2 + SLACK)
        print(f"async waiter, server killed: {outcome.error!r} after {outcome.took:.2f}s")
        outcome.check(2 + SLACK)
        assert isinstance(outcome.error, inturn.BackendUnavailable), outcome.error
        assert isinstance(outcome.error, ConnectionError)
        await holder.release()  # its release fails and is logged; it does not raise


def test_sync_waiter_gets_backend_unavailable_when_the_server_is_killed(
    make_redis_server: MakeServer,
) -> None:
    """The sync twin: a waiting thread whose server is SIGKILLed gets BackendUnavailable."""
    server = make_redis_server()
    gate = inturn.Gate.from_url(server.url, namespace=_namespace())
    granted, done = threading.Event(), threading.Event()

    def hold() -> None:
        with gate.turn_sync("k"):
            granted.set()
            done.wait(10)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert granted.wait(5)
        killer = threading.Timer(0.3, server.kill)
        killer.start()
        started = time.monotonic()
        # The sync wait's re-checks are not cut at the deadline (only JOIN is: see
        # docs/redis.md), but against a refused port a re-check fails at once: its connect
        # is not retried, and a dropped connection costs at most 0.3 s of retries.
        with pytest.raises(inturn.BackendUnavailable), gate.turn_sync("k", timeout=2):
            pass
        took = time.monotonic() - started
        killer.join()
        print(f"sync waiter, server killed: BackendUnavailable after {took:.2f}s")
        assert took <= 2 + SLACK, f"BackendUnavailable after {took:.2f}s"
    finally:
        done.set()
        holder.join(10)
        gate.close()
    assert not holder.is_alive()


async def test_request_to_a_paused_server_gives_up_at_its_timeout(
    make_redis_server: MakeServer,
) -> None:
    """A request to a stalled (SIGSTOPped) server raises BackendUnavailable at its timeout."""
    server = make_redis_server()
    async with _gate(server.url) as gate:
        async with gate.turn("warm"):  # connected and subscribed before the stall
            pass
        server.pause()
        try:
            outcome = await _outcome(gate.turn("k", timeout=1), 1 + SLACK, server)
        finally:
            server.resume()
    print(f"paused server, warm gate: {outcome.error!r} after {outcome.took:.2f}s")
    outcome.check(1 + SLACK)
    assert isinstance(outcome.error, inturn.BackendUnavailable), outcome.error


async def test_new_gate_on_a_paused_server_gives_up_at_its_timeout(
    make_redis_server: MakeServer,
) -> None:
    """A gate's first request to a stalled server raises BackendUnavailable at its timeout."""
    server = make_redis_server()
    server.pause()
    try:
        async with _gate(server.url) as gate:
            outcome = await _outcome(gate.turn("k", timeout=1), 1 + SLACK, server)
            server.resume()
            await asyncio.sleep(1)  # see test_aclose_right_after_a_stalled_server_resumes
    finally:
        server.resume()
    print(f"paused server, cold gate: {outcome.error!r} after {outcome.took:.2f}s")
    outcome.check(1 + SLACK)
    assert isinstance(outcome.error, inturn.BackendUnavailable), outcome.error


async def test_no_timeout_and_no_server_gives_backend_unavailable(
    make_redis_server: MakeServer,
) -> None:
    """With timeout=None and the server gone, the request fails within the connect timeout."""
    server = make_redis_server()
    url = server.url
    server.stop()
    async with _gate(url) as gate:
        outcome = await _outcome(gate.turn("k"), CONNECT_TIMEOUT + SLACK)
    print(f"stopped server, timeout=None: {outcome.error!r} after {outcome.took:.2f}s")
    outcome.check(CONNECT_TIMEOUT + SLACK)
    assert isinstance(outcome.error, inturn.BackendUnavailable), outcome.error


async def test_no_timeout_and_a_paused_server_gives_backend_unavailable(
    make_redis_server: MakeServer,
) -> None:
    """With timeout=None and a stalled server, the request fails within the connect timeout."""
    server = make_redis_server()
    server.pause()
    try:
        async with _gate(server.url) as gate:
            outcome = await _outcome(gate.turn("k"), CONNECT_TIMEOUT + SLACK, server)
            server.resume()
            await asyncio.sleep(1)  # see test_aclose_right_after_a_stalled_server_resumes
    finally:
        server.resume()
    print(f"paused server, timeout=None: {outcome.error!r} after {outcome.took:.2f}s")
    outcome.check(CONNECT_TIMEOUT + SLACK)
    assert isinstance(outcome.error, inturn.BackendUnavailable), outcome.error


async def test_aclose_right_after_a_stalled_server_resumes(
    make_redis_server: MakeServer,
) -> None:
    """gate.aclose() returns promptly even right after a stalled server came back."""
    server = make_redis_server()
    server.pause()
    gate = inturn.Gate.from_url(server.url, namespace=_namespace())
    listeners: list[asyncio.Task[None]] = []
    try:
        outcome = await _outcome(gate.turn("k", timeout=0.5), 1, server)  # resumes it
        assert isinstance(outcome.error, inturn.BackendUnavailable), outcome.error
        listeners = [s.listener for s in gate.backend._states.values() if s.listener]  # type: ignore[attr-defined]
        closing = asyncio.ensure_future(gate.aclose())
        await asyncio.wait((closing,), timeout=3)
        closed_in_time = closing.done()
        if not closed_in_time:
            for listener in listeners:  # a second cancel ends it (so the test leaks nothing)
                listener.cancel()
        async with asyncio.timeout(10):
            await closing
        assert closed_in_time, "gate.aclose() still running 3 s after it was called"
    finally:
        server.resume()


def test_sync_request_to_a_paused_server_gives_up_at_its_timeout(
    make_redis_server: MakeServer,
) -> None:
    """The sync twin: a request to a stalled server raises BackendUnavailable at its timeout."""
    server = make_redis_server()
    gate = inturn.Gate.from_url(server.url, namespace=_namespace())
    outcome: list[BaseException | None] = []

    def request() -> None:
        try:
            with gate.turn_sync("k", timeout=1):
                pass
        except Exception as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    try:
        with gate.turn_sync("warm"):  # connected and subscribed before the stall
            pass
        server.pause()
        started = time.monotonic()
        thread = threading.Thread(target=request, daemon=True)
        thread.start()
        thread.join(1 + SLACK)
        took = time.monotonic() - started
        in_time = not thread.is_alive()
        server.resume()
        thread.join(30)
        assert not thread.is_alive()
        assert in_time, f"still running {took:.2f}s after the request (ended with {outcome})"
        assert isinstance(outcome[0], inturn.BackendUnavailable), outcome
    finally:
        server.resume()
        gate.close()


@pytest.mark.parametrize(
    ("lease", "timeout", "expected"),
    [
        (3.0, 2.5, inturn.BackendUnavailable),  # a re-check (every 1 s) meets the stall
        (30.0, 1.0, inturn.TurnTimeout),  # no re-check before the deadline; then the leave
    ],
)
def test_sync_waiter_in_line_when_the_server_stalls_gives_up_at_its_timeout(
    make_redis_server: MakeServer, lease: float, timeout: float, expected: type[Exception]
) -> None:
    """A thread already waiting in line when the server stops answering: its re-checks are
    cut at its deadline, and the leave after a timeout is given LEAVE_GRACE (0.5 s), so the
    call ends by its timeout (plus that grace for the leave)."""
    server = make_redis_server()
    gate = inturn.Gate.from_url(server.url, namespace=_namespace(), lease=lease)
    outcome: list[BaseException | None] = []
    granted, done = threading.Event(), threading.Event()

    def hold() -> None:
        with gate.turn_sync("k"):
            granted.set()
            done.wait(30)

    def wait() -> None:
        try:
            with gate.turn_sync("k", timeout=timeout):
                pass
        except Exception as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    holder = threading.Thread(target=hold, daemon=True)
    waiter = threading.Thread(target=wait, daemon=True)
    try:
        holder.start()
        assert granted.wait(5)
        started = time.monotonic()
        waiter.start()
        time.sleep(0.3)  # in line: its JOIN was answered
        server.pause()
        waiter.join(timeout + 0.5 + SLACK)
        took = time.monotonic() - started
        in_time = not waiter.is_alive()
        server.resume()
        waiter.join(30)
        print(f"sync waiter in line, server paused: {outcome} after {took:.2f}s")
        assert in_time, f"still running {took:.2f}s after the request (ended with {outcome})"
        assert isinstance(outcome[0], expected), outcome
    finally:
        server.resume()
        done.set()
        holder.join(10)
        gate.close()


# -- a restart without persistence ----------------------------------------------------


async def test_gate_reconnects_after_a_restart_and_fences_keep_growing(
    make_redis_server: MakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """After an empty restart the gate takes turns again, with larger fences; the holder
    whose lease key vanished learns it (turn.lost, a WARNING)."""
    caplog.set_level(logging.WARNING, logger="inturn")
    server = make_redis_server()
    async with _gate(server.url, lease=0.6) as gate:
        holder = Holding(gate, "k")
        before = (await holder.granted()).fence
        async with gate.turn("other", timeout=2) as other:
            other_before = other.fence
        server.restart()
        turn = await holder.granted()
        async with asyncio.timeout(3):
            await turn.lost.wait()
        assert turn.lost_reason in ("taken", "expired")
        assert not await turn.check()
        lost = [r for r in caplog.records if "lost the turn" in r.getMessage()]
        assert lost
        assert lost[0].inturn_key == "k"  # type: ignore[attr-defined]
        assert lost[0].inturn_fence == before  # type: ignore[attr-defined]
        async with gate.turn("k", timeout=5) as again:
            assert again.fence > before
        async with gate.turn("other", timeout=5) as other:
            assert other.fence > other_before
        await holder.release()
        async with gate.turn("k", timeout=2) as last:
            assert last.fence > again.fence
        assert await gate.backend.footprint() == 0


async def test_waiter_across_a_restart_is_granted_and_the_old_holder_learns_it(
    make_redis_server: MakeServer,
) -> None:
    """A waiter whose line vanished in a restart re-joins and is granted with a larger fence,
    and the holder it overlapped with is told (turn.lost) within its lease."""
    server = make_redis_server()
    async with _gate(server.url, lease=0.6) as gate:
        holder = Holding(gate, "k")
        first = await holder.granted()
        waiter = Holding(gate, "k", timeout=5)
        await asyncio.sleep(0.2)
        assert waiter.turn is None
        server.restart()
        second = await waiter.granted()
        assert second.fence > first.fence
        async with asyncio.timeout(1.5):
            await first.lost.wait()
        await holder.release()
        await waiter.release()


# -- a lease lost behind the holder's back (failover without the write) -----------------


async def test_lost_owner_key_is_detected_and_reported(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An owner key that vanished (failover) lets another take the turn; the first holder
    gets turn.lost (reason "taken"), a WARNING with key and fence, check() False."""
    caplog.set_level(logging.WARNING, logger="inturn")
    namespace = _namespace()
    first_gate = inturn.Gate.from_url(redis_url, namespace=namespace, lease=0.6)
    second_gate = inturn.Gate.from_url(redis_url, namespace=namespace, lease=0.6)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        holder = Holding(first_gate, "user7")
        first = await holder.granted()
        owners = [k async for k in client.scan_iter(match=f"inturn:{namespace}:*")]
        owners = [k for k in owners if k.endswith(b"}:o")]
        assert owners == [_owner_key(namespace, "user7").encode()]
        await client.delete(*owners)
        async with second_gate.turn("user7", timeout=1) as second:
            assert second.fence > first.fence
            async with asyncio.timeout(1):  # renewal runs every lease / 3 = 0.2 s
                await first.lost.wait()
            assert first.lost_reason == "taken"
            assert not await first.check()
            assert await second.check()
        [record] = [r for r in caplog.records if "lost the turn" in r.getMessage()]
        assert record.levelno == logging.WARNING
        assert "user7" in record.getMessage()
        assert str(first.fence) in record.getMessage()
        assert record.inturn_key == "user7"  # type: ignore[attr-defined]
        assert record.inturn_fence == first.fence  # type: ignore[attr-defined]
        await holder.release()  # releasing a lost turn touches nothing and does not raise
        assert await first_gate.backend.footprint() == 0
    finally:
        await client.aclose()
        await first_gate.aclose()
        await second_gate.aclose()


# -- a full server ------------------------------------------------------------------------


async def _fill(client: redis.asyncio.Redis) -> int:
    """Write junk until even a tiny write is refused (OOM); return how many keys fit.

    Big values first, then small ones: a refused big SET only proves that its own query
    buffer did not fit, and a short command right after it may still be let in.
    """
    count = 0
    for size in (16384, 64):
        for _ in range(100_000):
            try:
                await client.set(f"junk:{count}", b"x" * size)
            except redis.exceptions.OutOfMemoryError:
                break
            count += 1
        else:
            pytest.fail("the server never ran out of memory")
    return count


async def _still_full(client: redis.asyncio.Redis) -> None:
    """Fill the server again until a small write right after is refused too (Redis frees
    query buffers of idle clients, so one refill can leave a little room)."""
    for _ in range(5):
        await _fill(client)
        try:
            await client.set("one more", b"x" * 64)
        except redis.exceptions.OutOfMemoryError:
            return
    pytest.fail("the server did not stay full")


def _full_server(make_redis_server: MakeServer) -> RedisServer:
    return make_redis_server({"maxmemory": "4mb", "maxmemory-policy": "noeviction"})


async def test_release_and_hand_off_still_work_at_maxmemory(
    make_redis_server: MakeServer,
) -> None:
    """At maxmemory with noeviction, a held turn is still renewed, released and handed to a
    waiter that joined before the server filled up."""
    server = _full_server(make_redis_server)
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        namespace = _namespace()
        async with _gate(server.url, namespace=namespace, lease=0.6) as gate:
            holder = Holding(gate, "k")
            first = await holder.granted()
            # Filling the server takes from 0.2 s to over 5 s (Redis frees query buffers as it
            # goes): the waiter's timeout must outlast that, or it times out before the release.
            waiter = Holding(gate, "k", timeout=30)
            await asyncio.sleep(0.1)
            assert await client.llen(_line_key(namespace, "k")) == 1
            assert await _fill(client) > 0
            for _ in range(4):  # renewals (every 0.2 s) and re-checks run while full
                await asyncio.sleep(0.2)
                await _fill(client)  # Redis shrinks idle query buffers: fill what they freed
            assert not first.lost.is_set()
            await _still_full(client)
            await holder.release()
            second = await waiter.granted()
            assert second.fence > first.fence
            await asyncio.sleep(0.4)
            assert not second.lost.is_set()
            await waiter.release()
            assert await gate.backend.footprint() == 0
    finally:
        await client.aclose()


async def test_join_on_a_full_server_gives_backend_unavailable(
    make_redis_server: MakeServer,
) -> None:
    """At maxmemory with noeviction, a new join raises BackendUnavailable and leaves nothing."""
    server = _full_server(make_redis_server)
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        async with _gate(server.url) as gate:
            async with gate.turn("warm", timeout=1):  # subscribed while there was room
                pass
            assert await _fill(client) > 0
            with pytest.raises(inturn.BackendUnavailable, match="out of memory"):
                async with gate.turn("new", timeout=1):
                    pass

            def sync_join() -> None:
                with (
                    pytest.raises(inturn.BackendUnavailable, match="out of memory"),
                    gate.turn_sync("new", timeout=1),
                ):
                    pass

            await asyncio.to_thread(sync_join)
            assert await gate.backend.footprint() == 0
    finally:
        await client.aclose()


# -- an evicting server -------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "warns"), [("allkeys-lru", True), ("noeviction", False)])
async def test_eviction_policy_is_checked_at_connect(
    make_redis_server: MakeServer, caplog: pytest.LogCaptureFixture, policy: str, warns: bool
) -> None:
    """A server that may evict keys gets a WARNING naming maxmemory-policy; noeviction none."""
    caplog.set_level(logging.WARNING, logger="inturn")
    server = make_redis_server({"maxmemory": "64mb", "maxmemory-policy": policy})
    async with _gate(server.url) as gate:
        async with gate.turn("k", timeout=2):
            pass
        async with gate.turn("k", timeout=2):
            pass
    warnings = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    if warns:
        [record] = warnings  # once per gate, not per turn
        assert record.levelno == logging.WARNING
        assert record.name == "inturn"
        assert policy in record.getMessage()
    else:
        assert warnings == []


# -- a waiter whose process died ------------------------------------------------------------

_WAITER = textwrap.dedent(
    """
    import asyncio, sys
    import inturn

    async def main():
        gate = inturn.Gate.from_url(sys.argv[1], namespace=sys.argv[2], lease=0.6)

        async def wait():
            async with gate.turn(sys.argv[3]):
                print("granted", flush=True)
                await asyncio.sleep(60)

        task = asyncio.ensure_future(wait())
        await asyncio.sleep(0.2)
        print("queued", flush=True)
        await task

    asyncio.run(main())
    """
)


async def test_waiter_whose_process_died_is_skipped(redis_url: str) -> None:
    """A waiter killed in line (SIGKILL) does not block the waiter behind it."""
    namespace = _namespace()
    client = redis.asyncio.Redis.from_url(redis_url)
    line = _line_key(namespace, "k")
    process = subprocess.Popen(
        [sys.executable, "-c", _WAITER, redis_url, namespace, "k"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        async with _gate(redis_url, namespace=namespace, lease=0.6) as gate:
            holder = Holding(gate, "k")
            await holder.granted()
            assert process.stdout is not None
            line_read = await asyncio.to_thread(process.stdout.readline)
            assert line_read == b"queued\n"
            assert await client.lrange(line, 0, -1) != []
            behind = Holding(gate, "k", timeout=10)
            await asyncio.sleep(0.1)
            assert await client.llen(line) == 2
            process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(process.wait, 5)
            released = time.monotonic()
            await holder.release()
            turn = await behind.granted()
            took = time.monotonic() - released
            print(f"dead waiter skipped: next waiter granted {took:.2f}s after the release")
            # The dead waiter may still look alive at the release (its mark lasts 0.6 s); then
            # it is granted a 0.6 s lease nobody renews, and the next waiter goes after it.
            assert took < 0.6 + 0.6 + SLACK
            assert turn.waited < 10
            await behind.release()
            assert await gate.backend.footprint() == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(5)
        if process.stdout is not None:
            process.stdout.close()
        await client.aclose()
