"""The mailbox's thread face on every backend: def handlers, submit_sync, threads drain.

Celery's prefork workers and other thread-based code use this face; it runs the
same drain flow as the async face, so it keeps the same promises: per-key FIFO,
no two messages of a key at once, each message once, retries then dead letters,
and a dead drainer's queue resumed by the sweeper.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import inturn
from inturn.testing import History, Span, check_history


class SyncRecorder:
    """A def handler that records each call as a span (key, fence, start, end)."""

    def __init__(self, hold: float = 0.0) -> None:
        self.history = History()
        self.payloads: dict[str, list[object]] = {}
        self.hold = hold
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, msg: inturn.Message | list[inturn.Message]) -> None:
        batch = msg if isinstance(msg, list) else [msg]
        start = time.monotonic()
        time.sleep(self.hold)
        key = batch[0].key
        with self._lock:
            self.payloads.setdefault(key, []).extend(m.payload for m in batch)
            self.threads.add(threading.current_thread().name)
        end = time.monotonic()
        self.history.add(Span(key, batch[0].fence, start, start, start, end, "handler"))


def _submit_from_threads(box: inturn.Mailbox, users: int, messages: int) -> None:
    """Each user's messages are submitted in order by one thread; users interleave."""

    def user(u: int) -> None:
        for n in range(messages):
            box.submit_sync(u, {"n": n}, id=f"{u}-{n}")

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


async def test_threads_submit_and_drain_in_order(gate: inturn.Gate) -> None:
    """20 users x 6 messages from 20 threads: each key's messages run once, in order."""
    handler = SyncRecorder(hold=0.001)
    box = gate.mailbox("sync-inbox", handler=handler)
    await asyncio.to_thread(_submit_from_threads, box, 20, 6)
    assert await asyncio.to_thread(box.drained_sync, 60)
    check_history(handler.history.spans, fifo=False)
    assert len(handler.payloads) == 20
    for payloads in handler.payloads.values():
        assert payloads == [{"n": n} for n in range(6)]
    assert all(name.startswith("inturn-drain") for name in handler.threads)
    assert await gate.backend.footprint() == 0


async def test_inline_sync_drain_runs_in_the_submitting_thread(gate: inturn.Gate) -> None:
    """drain="inline": submit_sync returns after the handler ran, in the caller's thread."""
    handler = SyncRecorder()
    box = gate.mailbox("sync-inline", handler=handler, drain="inline")

    def submit() -> str:
        box.submit_sync("u", "a")
        return threading.current_thread().name

    caller = await asyncio.to_thread(submit)
    assert handler.payloads == {"u": ["a"]}
    assert handler.threads == {caller}


async def test_async_submit_with_a_def_handler_drains_in_a_thread(gate: inturn.Gate) -> None:
    """A def handler with await submit(): the drain runs in a worker thread, not the loop."""
    loop_thread = threading.current_thread().name
    handler = SyncRecorder(hold=0.01)
    box = gate.mailbox("sync-from-loop", handler=handler, batch=True)
    for n in range(3):
        await box.submit("u", n)
    assert await box.drained(30)
    assert sum(handler.payloads["u"], start=0) == 3  # type: ignore[arg-type]
    assert handler.payloads["u"][0] == 0
    assert loop_thread not in handler.threads


async def test_submit_sync_with_an_async_handler_says_what_to_do(gate: inturn.Gate) -> None:
    """An async handler cannot be drained by submit_sync: a clear ConfigurationError."""

    async def handler(msg: inturn.Message) -> None: ...

    box = gate.mailbox("async-only", handler=handler)
    with pytest.raises(inturn.ConfigurationError, match=r"await mailbox\.submit"):
        box.submit_sync("u", 1)


async def test_sync_failures_retry_then_dead_letter(gate: inturn.Gate) -> None:
    """A def handler that fails is retried after its backoff, then dead-lettered; the key
    goes on with its next message."""
    calls: list[tuple[object, int]] = []

    def flaky(msg: inturn.Message) -> None:
        calls.append((msg.payload, msg.attempt))
        if msg.payload == "poison":
            raise ValueError("bad input")

    box = gate.mailbox("sync-poison", handler=flaky, max_attempts=3, backoff=(0.05,))

    def submit() -> None:
        box.submit_sync("u", "poison")
        box.submit_sync("u", "next")

    await asyncio.to_thread(submit)
    assert await asyncio.to_thread(box.drained_sync, 30)
    assert calls == [("poison", 1), ("poison", 2), ("poison", 3), ("next", 1)]
    letters = await asyncio.to_thread(box.dead_letters_sync)
    assert [(d.payload, d.attempts) for d in letters] == [("poison", 3)]
    assert "ValueError: bad input" in letters[0].error


async def test_sync_message_knows_what_waits(gate: inturn.Gate) -> None:
    """msg.pending_sync() counts the newer messages of the key while the handler runs."""
    seen: list[int] = []
    go = threading.Event()

    def handler(msg: inturn.Message) -> None:
        if msg.payload == 0:
            go.wait(10)
            seen.append(msg.pending_sync())

    box = gate.mailbox("sync-pending", handler=handler)

    def submit() -> None:
        for n in range(3):
            box.submit_sync("u", n)
        go.set()

    await asyncio.to_thread(submit)
    assert await asyncio.to_thread(box.drained_sync, 30)
    assert seen == [2]


async def test_sync_sweep_resumes_a_dead_drainer(gate: inturn.Gate) -> None:
    """A drainer that died (its role lapsed) leaves messages; sweep_sync drains them."""
    short = inturn.Gate(gate.backend, lease=0.3)
    handler = SyncRecorder()
    box = short.mailbox("sync-sweep", handler=handler)
    store = short.sync_backend
    assert isinstance(store, inturn.SyncMailboxBackend)

    def strand() -> None:
        # A submit whose drainer never starts: the role is taken, then abandoned.
        done = store.mb_submit(
            "sync-sweep",
            "u",
            '{"k": "u", "g": "x", "i": null, "p": "stranded", "t": 0, "a": 0}',
            max_pending=10,
            drop_oldest=False,
            token="dead-drainer",
            lease=0.3,
        )
        assert done.status == inturn.SubmitStatus.DRAINER
        store.mb_hint("sync-sweep", "u", True)

    await asyncio.to_thread(strand)
    assert await asyncio.to_thread(box.sweep_sync) == 0  # the dead drainer's role is alive
    await asyncio.sleep(0.4)
    assert await asyncio.to_thread(box.sweep_sync) == 1
    assert await asyncio.to_thread(box.drained_sync, 30)
    assert handler.payloads == {"u": ["stranded"]}
    assert await asyncio.to_thread(box.sweep_sync) == 0


async def test_skip_policy_sees_a_draining_mailbox_from_threads(gate: inturn.Gate) -> None:
    """on_busy="skip" on a def asks the mailboxes too (as the async path does): a key whose
    queue has a live drainer is busy even while its turn is free between two messages."""

    def handler(msg: inturn.Message) -> None: ...

    box = gate.mailbox("sync-skip", handler=handler)
    store = gate.sync_backend
    assert isinstance(store, inturn.SyncMailboxBackend)

    @gate.serialize(key="user", on_busy="skip")
    def proactive(user: str) -> str:
        return "sent"

    def hold_the_role() -> None:
        done = store.mb_submit(
            "sync-skip",
            "u",
            '{"k": "u", "g": "x", "i": null, "p": 1, "t": 0, "a": 0}',
            max_pending=10,
            drop_oldest=False,
            token="drainer",
            lease=30,
        )
        assert done.status == inturn.SubmitStatus.DRAINER

    await asyncio.to_thread(hold_the_role)
    assert not await gate.is_busy("u")  # the turn itself is free
    assert await asyncio.to_thread(box.is_draining_sync, "u")
    with pytest.raises(inturn.Skipped, match="mailbox draining"):
        await asyncio.to_thread(proactive, "u")
    assert await asyncio.to_thread(proactive, "v") == "sent"
