"""@gate.serialize busy policies (wait, skip, latest, cancel), fences and bad input."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time

import pytest

import inturn
from inturn.testing import History, check_history


async def test_wait_serialises_per_user_and_runs_users_in_parallel(gate: inturn.Gate) -> None:
    """wait: one user's calls never overlap and go in order; other users are not held up."""
    history = History()

    @gate.serialize(key="user_id")
    async def send_ai_response(user_id: int, text: str, fence: int = 0) -> int:
        start = time.monotonic()
        await asyncio.sleep(0.005)
        history.add(
            inturn.testing.Span(str(user_id), fence, start, start, start, time.monotonic(), text)
        )
        return fence

    fences = await asyncio.gather(*(send_ai_response(i % 4, f"m{i}") for i in range(40)))
    check_history(history.spans, fifo=False)
    assert len(set(fences)) == 40  # every call got its own turn's fence


async def test_skip_raises_skipped_when_busy(gate: inturn.Gate) -> None:
    """skip: a call while the user is busy (held, or held by plain turn code) raises Skipped."""
    entered = asyncio.Event()
    release = asyncio.Event()

    @gate.serialize(key="user_id")
    async def chat(user_id: int) -> None:
        entered.set()
        await release.wait()

    @gate.serialize(key="user_id", on_busy="skip")
    async def proactive(user_id: int) -> str:
        return "sent"

    task = asyncio.ensure_future(chat(7))
    await entered.wait()
    with pytest.raises(inturn.Skipped) as info:
        await proactive(7)
    assert isinstance(info.value, inturn.InturnError)
    assert info.value.key == "7"
    assert await proactive(8) == "sent"  # another user is free
    release.set()
    await task
    assert await proactive(7) == "sent"
    other = await asyncio.ensure_future(gate.turn(7).__aenter__())  # held by another task
    with pytest.raises(inturn.Skipped):
        await proactive(7)
    await holder_release(gate, other)


async def test_latest_keeps_only_the_newest_waiting_call(gate: inturn.Gate) -> None:
    """latest: older waiting calls raise Superseded at once; only the newest runs."""
    ran: list[int] = []

    @gate.serialize(key="user_id", on_busy="latest")
    async def answer(user_id: int, n: int) -> int:
        ran.append(n)
        return n

    holder = await gate.turn(1).__aenter__()
    calls = []
    for n in range(5):
        calls.append(asyncio.ensure_future(answer(1, n)))
        await asyncio.sleep(0.02)
    done, _ = await asyncio.wait(calls[:4], timeout=2)
    assert len(done) == 4, "older waiters should be superseded while the key is still held"
    for call in calls[:4]:
        with pytest.raises(inturn.Superseded):
            call.result()
    await holder_release(gate, holder)
    assert await asyncio.wait_for(calls[4], 5) == 4
    assert ran == [4]


async def test_cancel_stops_the_running_call(gate: inturn.Gate) -> None:
    """cancel: the running call is cancelled and raises Superseded; the new call runs."""
    started = asyncio.Event()

    @gate.serialize(key="user_id", on_busy="cancel")
    async def answer(user_id: int, text: str) -> str:
        started.set()
        await asyncio.sleep(0 if text == "fixed" else 30)
        return text

    first = asyncio.ensure_future(answer(1, "typo"))
    await started.wait()
    t0 = time.monotonic()
    assert await asyncio.wait_for(answer(1, "fixed"), 5) == "fixed"
    assert time.monotonic() - t0 < 2
    with pytest.raises(inturn.Superseded):
        await first


async def test_cancel_does_not_touch_other_users(gate: inturn.Gate) -> None:
    """cancel only cancels the same user's call."""
    started = asyncio.Event()

    @gate.serialize(key="user_id", on_busy="cancel")
    async def answer(user_id: int, wait: float) -> int:
        started.set()
        await asyncio.sleep(wait)
        return user_id

    slow = asyncio.ensure_future(answer(1, 0.3))
    await started.wait()
    assert await answer(2, 0) == 2
    assert await slow == 1


async def test_external_cancellation_stays_cancellation(gate: inturn.Gate) -> None:
    """A call cancelled by its caller raises CancelledError, not Superseded."""

    @gate.serialize(key="user_id", on_busy="cancel")
    async def answer(user_id: int) -> None:
        await asyncio.sleep(30)

    task = asyncio.ensure_future(answer(1))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_sync_function_in_threads(gate: inturn.Gate) -> None:
    """A plain def is serialised across threads, with the fence passed in."""
    history = History()

    @gate.serialize(key="user_id")
    def work(user_id: int, fence: int = 0) -> int:
        start = time.monotonic()
        time.sleep(0.002)
        history.add(
            inturn.testing.Span(str(user_id), fence, start, start, start, time.monotonic(), "t")
        )
        return fence

    threads = [threading.Thread(target=work, args=(i % 3,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    check_history(history.spans, fifo=False)
    assert len(history.spans) == 24


def test_sync_skip_and_latest(gate: inturn.Gate) -> None:
    """skip and latest work on a plain def too (latest: superseded calls step aside)."""

    @gate.serialize(key="k", on_busy="skip")
    def nudge(k: str) -> str:
        return "ok"

    with gate.turn_sync("a"), pytest.raises(inturn.Skipped):
        in_other_thread(lambda: nudge("a"))
    assert nudge("a") == "ok"

    ran: list[int] = []

    @gate.serialize(key="k", on_busy="latest")
    def newest(k: str, n: int) -> None:
        ran.append(n)

    errors: list[BaseException] = []
    with gate.turn_sync("b"):
        threads = []
        for n in range(3):
            t = threading.Thread(target=catch(errors, lambda n=n: newest("b", n)))
            t.start()
            threads.append(t)
            time.sleep(0.05)
    for t in threads:
        t.join(30)
    assert ran == [2]
    assert len(errors) == 2
    assert all(isinstance(e, inturn.Superseded) for e in errors)


def test_cancel_on_a_plain_def_is_refused(gate: inturn.Gate) -> None:
    with pytest.raises(inturn.ConfigurationError, match="async"):

        @gate.serialize(key="k", on_busy="cancel")
        def f(k: str) -> None: ...


def test_bad_configuration(gate: inturn.Gate) -> None:
    """Unknown policy or parameter: ConfigurationError at decoration time."""
    with pytest.raises(inturn.ConfigurationError, match="on_busy"):
        gate.serialize(key="k", on_busy="drop")  # type: ignore[arg-type]
    with pytest.raises(inturn.ConfigurationError, match="user"):

        @gate.serialize(key="user")
        async def f(k: str) -> None: ...

    with pytest.raises(inturn.ConfigurationError, match="dedup"):

        @gate.serialize(key="k", dedup="msg")
        async def g(k: str) -> None: ...


async def test_key_resolving_to_none_names_the_parameter(gate: inturn.Gate) -> None:
    @gate.serialize(key="user_id")
    async def f(user_id: int | None) -> None: ...

    with pytest.raises(ValueError, match="user_id"):
        await f(None)

    @gate.serialize(key=lambda chat, **_: chat.get("id"))
    async def g(chat: dict[str, int]) -> None: ...

    with pytest.raises(ValueError, match="key"):
        await g({})
    await g({"id": 5})


async def test_signature_and_name_are_kept(gate: inturn.Gate) -> None:
    async def send(user_id: int, text: str = "") -> str:
        """Doc."""
        return text

    wrapped = gate.serialize(key="user_id")(send)
    assert inspect.signature(wrapped) == inspect.signature(send)
    assert wrapped.__name__ == "send"
    assert wrapped.__doc__ == "Doc."
    assert await wrapped(1, text="hi") == "hi"


async def test_explicit_fence_argument_is_kept(gate: inturn.Gate) -> None:
    @gate.serialize(key="k")
    async def f(k: str, fence: int | None = None) -> int | None:
        return fence

    assert await f("a", fence=3) == 3
    injected = await f("a")
    assert injected is not None
    assert injected > 3 or injected > 0


async def holder_release(gate: inturn.Gate, turn: inturn.Turn) -> None:
    await gate.backend.release(turn.key, turn._token)


def catch(errors: list[BaseException], fn):  # type: ignore[no-untyped-def]
    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    return run


def in_other_thread(fn):  # type: ignore[no-untyped-def]
    box: list[BaseException] = []
    t = threading.Thread(target=catch(box, fn))
    t.start()
    t.join(30)
    if box:
        raise box[0]
