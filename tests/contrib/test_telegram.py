"""inturn.contrib.telegram with real python-telegram-bot polling a fake Bot API, on memory://
and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from telegram import Update
from telegram.ext import Application, ContextTypes, MessageHandler, filters

import inturn
from inturn.contrib.telegram import InturnUpdateProcessor, turn_key
from tests.contrib._gates import assert_idle, overlaps
from tests.fakes.telegram import FakeTelegram


@pytest.fixture
def tg() -> Iterator[FakeTelegram]:
    with FakeTelegram() as fake:
        yield fake


class Recorder:
    """A handler that records each body's span per user and replies with the text."""

    def __init__(self, work: float = 0.05) -> None:
        self.work = work
        self.spans: dict[int, list[tuple[float, float]]] = {}
        self.started = asyncio.Event()
        self.calls = 0
        self.running = 0
        self.peak = 0

    async def __call__(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None
        assert update.effective_user is not None
        self.calls += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.started.set()
        start = time.monotonic()
        try:
            await asyncio.sleep(self.work)
            await update.message.reply_text(f"re {update.message.text}")
        finally:
            self.running -= 1
        self.spans.setdefault(update.effective_user.id, []).append((start, time.monotonic()))

    async def settled(self) -> None:
        while self.running:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the turn's release after the handler


@contextlib.asynccontextmanager
async def polling(
    tg: FakeTelegram, recorder: Recorder, processor: Any
) -> AsyncIterator[Application[Any, Any, Any, Any, Any, Any]]:
    app = (
        Application.builder()
        .token(tg.token)
        .base_url(f"{tg.url}/bot")
        .concurrent_updates(processor)
        .build()
    )
    app.add_handler(MessageHandler(filters.TEXT, recorder))
    async with app:
        assert app.updater is not None
        polls = tg.polls
        await app.updater.start_polling(timeout=1, poll_interval=0)
        await app.start()
        while tg.polls == polls:  # noqa: ASYNC110 (a counter in the server's thread)
            await asyncio.sleep(0.01)
        try:
            yield app
        finally:
            await recorder.settled()
            await app.updater.stop()
            await app.stop()


async def test_a_users_burst_runs_one_at_a_time_in_order(
    tg: FakeTelegram, gate: inturn.Gate
) -> None:
    recorder = Recorder(work=0.08)
    async with polling(tg, recorder, InturnUpdateProcessor(gate, 16)):
        for n in range(5):  # 5 messages in 300 ms, while earlier ones are still being handled
            tg.send_text(user_id=1, text=f"m{n}")
            await asyncio.sleep(0.06)
        await tg.wait_for_async(lambda sent: len(sent) == 5)
    assert [c.text for c in tg.sent] == [f"re m{n}" for n in range(5)]
    assert overlaps(recorder.spans[1]) == 0
    await assert_idle(gate)


async def test_without_the_processor_ptb_overlaps_a_users_updates(tg: FakeTelegram) -> None:
    """The control: PTB's own concurrent_updates runs one user's updates side by side."""
    recorder = Recorder(work=0.2)
    async with polling(tg, recorder, 16):
        for n in range(5):
            tg.send_text(user_id=1, text=f"m{n}")
            await asyncio.sleep(0.06)
        await tg.wait_for_async(lambda sent: len(sent) == 5)
    assert overlaps(recorder.spans[1]) > 0


async def test_a_batch_of_one_poll_keeps_its_order(tg: FakeTelegram, gate: inturn.Gate) -> None:
    """Eight updates of one user that arrive in one getUpdates answer run in their order."""
    recorder = Recorder(work=0.02)
    async with polling(tg, recorder, InturnUpdateProcessor(gate, 16)):
        for user in (1, 2):
            for n in range(8):
                tg.send_text(user_id=user, text=f"u{user}m{n}")
        await tg.wait_for_async(lambda sent: len(sent) == 16)
    for user in (1, 2):
        texts = [c.text for c in tg.sent if c.chat_id == user]
        assert texts == [f"re u{user}m{n}" for n in range(8)]
        assert overlaps(recorder.spans[user]) == 0
    await assert_idle(gate)


async def test_an_update_delivered_three_times_is_answered_once(
    tg: FakeTelegram, gate: inturn.Gate
) -> None:
    recorder = Recorder(work=0.3)
    async with polling(tg, recorder, InturnUpdateProcessor(gate, 16)):
        uid = tg.send_text(user_id=2, text="once")
        tg.redeliver(uid)  # before
        await asyncio.wait_for(recorder.started.wait(), 5)
        tg.redeliver(uid)  # during its handler
        await tg.wait_for_async(lambda sent: len(sent) == 1)
        tg.redeliver(uid)  # after its reply
        tg.send_text(user_id=2, text="barrier")  # in line behind every redelivery
        await tg.wait_for_async(lambda sent: len(sent) == 2)
    assert [c.text for c in tg.sent] == ["re once", "re barrier"]
    assert recorder.calls == 2
    await assert_idle(gate)


async def test_dedup_none_handles_every_delivery(tg: FakeTelegram) -> None:
    recorder = Recorder(work=0.05)
    async with (
        inturn.Gate.from_url("memory://") as gate,
        polling(tg, recorder, InturnUpdateProcessor(gate, 16, dedup=None)),
    ):
        tg.redeliver(tg.send_text(user_id=2, text="twice"))
        await tg.wait_for_async(lambda sent: len(sent) == 2)
    assert [c.text for c in tg.sent] == ["re twice", "re twice"]


async def test_thirty_users_run_in_parallel(tg: FakeTelegram, gate: inturn.Gate) -> None:
    recorder = Recorder(work=0.5)
    async with polling(tg, recorder, InturnUpdateProcessor(gate, 64)):
        started = time.monotonic()
        for user in range(100, 130):
            tg.send_text(user_id=user, text="hi")
        await tg.wait_for_async(lambda sent: len(sent) == 30, timeout=20)
        wall = time.monotonic() - started
    assert sorted(c.chat_id for c in tg.sent) == list(range(100, 130))  # type: ignore[type-var]
    assert wall < 30 * 0.5 / 3, wall  # serially 15 s; typically under 1 s
    await assert_idle(gate)


async def test_one_users_backlog_does_not_use_up_the_handler_slots(
    tg: FakeTelegram, gate: inturn.Gate
) -> None:
    """With 2 slots, 8 queued updates of user 1 leave room for user 2 at once."""
    recorder = Recorder(work=0.15)
    processor = InturnUpdateProcessor(gate, 2)
    async with polling(tg, recorder, processor) as app:
        assert app.concurrent_updates == 2
        for n in range(8):
            tg.send_text(user_id=1, text=f"m{n}")
        await asyncio.wait_for(recorder.started.wait(), 5)
        tg.send_text(user_id=2, text="other")
        await tg.wait_for_async(lambda sent: any(c.chat_id == 2 for c in sent), timeout=5)
        mine = [c for c in tg.sent if c.chat_id == 1]
        assert len(mine) <= 2  # user 2 was answered long before user 1's backlog (8 x 0.15 s)
        await tg.wait_for_async(lambda sent: len(sent) == 9, timeout=10)
    assert recorder.peak <= 2
    assert [c.text for c in tg.sent if c.chat_id == 1] == [f"re m{n}" for n in range(8)]
    await assert_idle(gate)


async def test_two_processes_share_each_users_turn_and_dedup(redis_url: str) -> None:
    """Two applications with their own gates on one Redis both receive every update (two
    webhook workers behind a retrying balancer): each update is answered once, and a user's
    handlers never overlap across them."""
    recorder = Recorder(work=0.05)
    namespace = f"tg{secrets.token_hex(4)}"
    with FakeTelegram() as tg:
        async with (
            inturn.Gate.from_url(redis_url, namespace=namespace) as gate_a,
            inturn.Gate.from_url(redis_url, namespace=namespace) as gate_b,
            polling(tg, recorder, InturnUpdateProcessor(gate_a, 16)),
            polling(tg, recorder, InturnUpdateProcessor(gate_b, 16)),
        ):
            ids = []
            for n in range(6):
                for user in (1, 2):
                    ids.append(tg.send_text(user_id=user, text=f"u{user}m{n}"))
                await asyncio.sleep(0.03)
            for update_id in ids:  # and each once more, to whichever polls first
                tg.redeliver(update_id)
            await tg.wait_for_async(lambda sent: len(sent) >= 12, timeout=10)
            await asyncio.sleep(0.3)  # room for a wrong extra reply
            await assert_idle(gate_a)
    texts = sorted(c.text or "" for c in tg.sent)
    assert texts == sorted(f"re u{u}m{n}" for u in (1, 2) for n in range(6))
    assert overlaps(recorder.spans[1]) == 0
    assert overlaps(recorder.spans[2]) == 0


def test_keys_follow_the_scope_and_updates_without_either_run_free() -> None:
    bot_update = {
        "update_id": 1,
        "message": {
            "message_id": 1,
            "date": 0,
            "chat": {"id": -500, "type": "group", "title": "g"},
            "from": {"id": 10, "is_bot": False, "first_name": "u"},
            "text": "x",
        },
    }
    from telegram import Bot

    bot = Bot("777:secret")
    update = Update.de_json(bot_update, bot)
    gate = inturn.Gate.from_url("memory://")
    assert InturnUpdateProcessor(gate).key_for(update) == turn_key(777, "user", 10)
    assert InturnUpdateProcessor(gate, scope="chat").key_for(update) == "tg:777:chat:-500"
    poll = Update(update_id=2)  # e.g. a poll's state: neither a user nor a chat
    assert InturnUpdateProcessor(gate).key_for(poll) is None
    assert InturnUpdateProcessor(gate).key_for("a custom update") is None
    with pytest.raises(inturn.ConfigurationError):
        InturnUpdateProcessor(gate, scope="bot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        InturnUpdateProcessor(gate, 0)
