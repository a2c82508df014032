"""The mailbox on every backend: FIFO per key, no overlap, at least once, batches, failures."""

from __future__ import annotations

import asyncio
import time

import pytest

import inturn
from inturn.testing import History, Span, check_history


class Recorder:
    """A handler that records each call as a span: (key, fence, start, end, payloads)."""

    def __init__(self, hold: float = 0.0) -> None:
        self.history = History()
        self.payloads: dict[str, list[object]] = {}
        self.hold = hold

    async def __call__(self, msg: inturn.Message | list[inturn.Message]) -> None:
        batch = msg if isinstance(msg, list) else [msg]
        start = time.monotonic()
        await asyncio.sleep(self.hold)
        key = batch[0].key
        self.payloads.setdefault(key, []).extend(m.payload for m in batch)
        end = time.monotonic()
        self.history.add(Span(key, batch[0].fence, start, start, start, end, "handler"))


async def test_every_message_once_in_order_per_key(gate: inturn.Gate) -> None:
    """50 keys x 8 messages submitted interleaved: each key's messages run once, in order."""
    handler = Recorder(hold=0.001)
    box = gate.mailbox("inbox", handler=handler)
    for n in range(8):
        for user in range(50):
            await box.submit(user, {"n": n}, id=f"{user}-{n}")
    await asyncio.wait_for(box.drained(), 60)
    check_history(handler.history.spans, fifo=False)
    assert len(handler.payloads) == 50
    for payloads in handler.payloads.values():
        assert payloads == [{"n": n} for n in range(8)]
    assert await gate.backend.footprint() == 0


async def test_submit_returns_before_the_handler_runs(gate: inturn.Gate) -> None:
    """submit() only stores: it returns while the handler still works (background drain)."""
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(msg: inturn.Message) -> None:
        entered.set()
        await release.wait()

    box = gate.mailbox("slow", handler=slow)
    await asyncio.wait_for(box.submit("u", 1), 2)
    await asyncio.wait_for(entered.wait(), 5)  # the drain runs in the background
    await asyncio.wait_for(box.submit("u", 2), 2)
    assert await box.pending("u") == 1
    assert await box.is_draining("u")
    release.set()
    await box.drained()
    assert not await box.is_draining("u")


async def test_inline_drain(gate: inturn.Gate) -> None:
    """drain="inline": the submitting call drains before it returns."""
    handler = Recorder()
    box = gate.mailbox("inline", handler=handler, drain="inline")
    await box.submit("u", "a")
    assert handler.payloads == {"u": ["a"]}


async def test_turn_callers_interleave_between_messages(gate: inturn.Gate) -> None:
    """A gate.turn caller waiting for the key runs between two messages, never beside one."""
    order: list[str] = []
    started = asyncio.Event()

    async def handler(msg: inturn.Message) -> None:
        order.append(f"msg{msg.payload}")
        started.set()
        await asyncio.sleep(0.05)

    box = gate.mailbox("chat", handler=handler)
    for n in range(4):
        await box.submit("u", n)
    await started.wait()

    async def proactive() -> None:
        async with gate.turn("u"):
            order.append("proactive")

    await asyncio.wait_for(asyncio.gather(proactive(), box.drained()), 10)
    assert order == ["msg0", "proactive", "msg1", "msg2", "msg3"]


async def test_batch_coalesces_what_arrived_meanwhile(gate: inturn.Gate) -> None:
    """batch=True: messages that arrived while the previous call ran come as one batch."""
    batches: list[list[object]] = []

    async def reply(msgs: list[inturn.Message]) -> None:
        batches.append([m.payload for m in msgs])
        await asyncio.sleep(0.1)

    box = gate.mailbox("coalesce", handler=reply, batch=True)
    await box.submit("u", "hi")
    await asyncio.sleep(0.02)
    for text in ("are you there?", "hello??", "hmm"):
        await box.submit("u", text)
    await box.drained()
    assert batches == [["hi"], ["are you there?", "hello??", "hmm"]]


async def test_debounce_gathers_a_burst(gate: inturn.Gate) -> None:
    """debounce: a burst typed in quick succession becomes one batch and one reply."""
    batches: list[int] = []

    async def reply(msgs: list[inturn.Message]) -> None:
        batches.append(len(msgs))

    box = gate.mailbox("burst", handler=reply, batch=True, debounce=0.15)
    for text in ("hi", "are you there?", "hello??"):
        await box.submit("u", text)
        await asyncio.sleep(0.03)
    await box.drained()
    assert batches == [3]


async def test_pending_tells_the_handler_what_waits(gate: inturn.Gate) -> None:
    """msg.pending() counts the newer messages waiting for the key."""
    seen: list[int] = []
    all_in = asyncio.Event()

    async def handler(msg: inturn.Message) -> None:
        await all_in.wait()  # the first call waits until every message is stored
        seen.append(await msg.pending())

    box = gate.mailbox("count", handler=handler)
    for n in range(4):
        await box.submit("u", n)
    all_in.set()
    await box.drained()
    assert seen == [3, 2, 1, 0]


async def test_poison_message_goes_to_dead_letters(gate: inturn.Gate) -> None:
    """A message that keeps failing is retried, then dead-lettered; the key goes on."""
    done: list[object] = []
    attempts: list[int] = []

    async def handler(msg: inturn.Message) -> None:
        if msg.payload == "poison":
            attempts.append(msg.attempt)
            raise ValueError("cannot parse")
        done.append(msg.payload)

    box = gate.mailbox("dlq", handler=handler, max_attempts=3, backoff=(0.01, 0.02))
    await box.submit("u", "poison", id="p1")
    await box.submit("u", "next")
    await asyncio.wait_for(box.drained(), 10)
    assert attempts == [1, 2, 3]
    assert done == ["next"]
    [letter] = await box.dead_letters()
    assert letter.key == "u"
    assert letter.payload == "poison"
    assert letter.attempts == 3
    assert "cannot parse" in letter.error


async def test_a_failure_is_retried_in_place(gate: inturn.Gate) -> None:
    """A failed message is retried before the key's later messages (FIFO kept)."""
    order: list[object] = []
    failed = False

    async def handler(msg: inturn.Message) -> None:
        nonlocal failed
        if msg.payload == 1 and not failed:
            failed = True
            raise RuntimeError("LLM timeout")
        order.append(msg.payload)

    box = gate.mailbox("retry", handler=handler, backoff=(0.01,))
    for n in range(3):
        await box.submit("u", n)
    await box.drained()
    assert order == [0, 1, 2]


async def test_duplicate_ids_have_one_effect(gate: inturn.Gate) -> None:
    """A resubmitted id (a webhook retry) is processed once."""
    handler = Recorder()
    box = gate.mailbox("dups", handler=handler)
    for _ in range(3):
        await box.submit("u", "x", id=101)
    await box.submit("v", "x", id=101)  # another user's id 101 is another message
    await box.drained()
    assert handler.payloads == {"u": ["x"], "v": ["x"]}


async def test_bounds_reject_or_drop_oldest(gate: inturn.Gate) -> None:
    """max_pending rejects with MailboxFull, or drops the oldest; others are unaffected."""
    release = asyncio.Event()
    handled: list[object] = []

    async def handler(msg: inturn.Message) -> None:
        await release.wait()
        handled.append(msg.payload)

    box = gate.mailbox("bounded", handler=handler, max_pending=2)
    await box.submit("u", 0)  # in flight
    await asyncio.sleep(0.05)
    await box.submit("u", 1)
    await box.submit("u", 2)
    with pytest.raises(inturn.MailboxFull) as info:
        await box.submit("u", 3)
    assert info.value.key == "u"
    await box.submit("other", "fine")
    dropping = gate.mailbox("dropping", handler=handler, max_pending=2, overflow="drop_oldest")
    await dropping.submit("w", "d0")  # in flight ("u" would wait for u's turn, held above)
    await asyncio.sleep(0.05)
    for n in range(1, 4):
        await dropping.submit("w", f"d{n}")
    release.set()
    await box.drained()
    await dropping.drained()
    assert sorted(map(str, handled)) == sorted(["0", "1", "2", "fine", "d0", "d2", "d3"])


async def test_bad_payloads(gate: inturn.Gate) -> None:
    """Non-JSON or oversized payloads raise InvalidPayload (a ValueError) and store nothing."""
    box = gate.mailbox("strict", handler=Recorder(), max_payload_bytes=100)
    with pytest.raises(inturn.InvalidPayload):
        await box.submit("u", object())
    with pytest.raises(inturn.InvalidPayload, match="max_payload_bytes"):
        await box.submit("u", "x" * 200)
    assert await box.pending("u") == 0
    assert await gate.backend.footprint() == 0


async def test_one_users_flood_does_not_hold_up_others(gate: inturn.Gate) -> None:
    """While one user's 200 messages drain, another user's message is answered at once."""
    done_at: dict[str, float] = {}
    quiet_done = asyncio.Event()

    async def handler(msg: inturn.Message) -> None:
        await asyncio.sleep(0.002)
        done_at[msg.key] = time.monotonic()
        if msg.key == "quiet":
            quiet_done.set()

    box = gate.mailbox("flood", handler=handler)
    for n in range(200):
        await box.submit("flooder", n)
    t0 = time.monotonic()
    await box.submit("quiet", "hello")
    await asyncio.wait_for(quiet_done.wait(), 5)
    assert done_at["quiet"] - t0 < 0.3
    assert await box.pending("flooder") > 0  # still draining
    await box.drained()


async def test_skip_policy_sees_a_draining_mailbox(gate: inturn.Gate) -> None:
    """on_busy="skip" skips while the user's mailbox drains, even between two messages."""
    release = asyncio.Event()

    async def handler(msg: inturn.Message) -> None:
        await release.wait()

    box = gate.mailbox("chat2", handler=handler)

    @gate.serialize(key="user", on_busy="skip")
    async def proactive(user: str) -> str:
        return "sent"

    await box.submit("u", 1)
    await asyncio.sleep(0.02)
    with pytest.raises(inturn.Skipped):
        await proactive("u")
    release.set()
    await box.drained()
    assert await proactive("u") == "sent"


async def test_bad_configuration(gate: inturn.Gate) -> None:
    async def handler(msg: inturn.Message) -> None: ...

    with pytest.raises(inturn.ConfigurationError):
        gate.mailbox("a", handler="not a function")  # type: ignore[arg-type]
    with pytest.raises(inturn.ConfigurationError):
        gate.mailbox("b", handler=handler, max_pending=0)
    with pytest.raises(inturn.ConfigurationError):
        gate.mailbox("c", handler=handler, overflow="explode")  # type: ignore[arg-type]
    gate.mailbox("d", handler=handler)
    with pytest.raises(inturn.ConfigurationError, match="already"):
        gate.mailbox("d", handler=handler)


async def test_inline_drain_inside_the_keys_turn(gate: inturn.Gate) -> None:
    """An inline drain started by code holding the key's turn reuses it and ends."""
    handler = Recorder()
    box = gate.mailbox("nested", handler=handler, drain="inline")
    async with gate.turn("u"), asyncio.timeout(5):  # same task: the turn is re-entered
        await box.submit("u", "a")
        await box.submit("u", "b")
    assert handler.payloads == {"u": ["a", "b"]}
    assert await gate.backend.footprint() == 0


async def test_closing_right_after_a_submit_stops_the_sweeper_at_once(gate: inturn.Gate) -> None:
    """The first submit starts this loop's sweeper, whose first sweep is still opening its
    connection when the gate closes. A cancel that lands just as a call inside completes
    can be dropped by asyncio; the sweeper stops anyway (before: aclose waited its full
    10 s and left the sweeper running)."""
    handler = Recorder()
    box = gate.mailbox("closing", handler=handler, drain="inline")
    await box.submit("u", "a")
    started = time.monotonic()
    await box.aclose(timeout=10)
    assert time.monotonic() - started < 5
    assert box._sweeper is None
    assert handler.payloads == {"u": ["a"]}
