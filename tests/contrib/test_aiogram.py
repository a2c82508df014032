"""inturn.contrib.aiogram with real aiogram polling a fake Bot API, on memory:// and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.fsm.storage.base import StorageKey
from aiogram.types import Message

import inturn
from inturn.contrib.aiogram import (
    DedupMiddleware,
    InturnEventIsolation,
    MailboxMiddleware,
    feed_from_mailbox,
    turn_key,
)
from tests.contrib._gates import assert_idle, overlaps
from tests.fakes.telegram import FakeTelegram


@pytest.fixture
def tg() -> Iterator[FakeTelegram]:
    with FakeTelegram() as fake:
        yield fake


def make_bot(tg: FakeTelegram) -> Bot:
    return Bot(tg.token, session=AiohttpSession(api=TelegramAPIServer.from_base(tg.url)))


@contextlib.asynccontextmanager
async def polling(
    tg: FakeTelegram, dp: Dispatcher, bot: Bot | None = None, recorder: Recorder | None = None
) -> AsyncIterator[Bot]:
    """Polls until the block ends, then lets running handlers finish before it stops."""
    bot = bot or make_bot(tg)
    polls = tg.polls
    task = asyncio.create_task(dp.start_polling(bot, handle_signals=False, polling_timeout=1))
    try:
        while tg.polls == polls and not task.done():  # noqa: ASYNC110 (a counter in a thread)
            await asyncio.sleep(0.01)
        yield bot
    finally:
        if recorder is not None:
            await recorder.settled()
        if not task.done():
            await dp.stop_polling()
        await task


class Recorder:
    """A handler that records each body's span per user and replies with the text."""

    def __init__(self, work: float = 0.05) -> None:
        self.work = work
        self.spans: dict[int, list[tuple[float, float]]] = {}
        self.started = asyncio.Event()
        self.calls = 0
        self.running = 0

    async def __call__(self, message: Message) -> None:
        assert message.from_user is not None
        self.calls += 1
        self.running += 1
        self.started.set()
        start = time.monotonic()
        try:
            await asyncio.sleep(self.work)
            await message.answer(f"re {message.text}")
        finally:
            self.running -= 1
        self.spans.setdefault(message.from_user.id, []).append((start, time.monotonic()))

    async def settled(self) -> None:
        while self.running:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the turn's release after the handler

    def register(self, dp: Dispatcher) -> Dispatcher:
        async def handle(message: Message) -> None:  # aiogram runs only real coroutine functions
            await self(message)

        dp.message()(handle)
        return dp


def isolated(gate: inturn.Gate, recorder: Recorder, **kwargs: Any) -> Dispatcher:
    dp = Dispatcher(events_isolation=InturnEventIsolation(gate, **kwargs))
    dp.update.outer_middleware(DedupMiddleware(gate))
    return recorder.register(dp)


async def test_a_users_burst_runs_one_at_a_time_in_order(
    tg: FakeTelegram, gate: inturn.Gate
) -> None:
    recorder = Recorder(work=0.08)
    async with polling(tg, isolated(gate, recorder), recorder=recorder):
        for n in range(5):  # 5 messages in 300 ms, while earlier ones are still being handled
            tg.send_text(user_id=1, text=f"m{n}")
            await asyncio.sleep(0.06)
        await tg.wait_for_async(lambda sent: len(sent) == 5)
    assert [c.text for c in tg.sent] == [f"re m{n}" for n in range(5)]
    assert overlaps(recorder.spans[1]) == 0
    await assert_idle(gate)


async def test_without_isolation_aiogram_overlaps_a_users_updates(tg: FakeTelegram) -> None:
    """The control: aiogram's default (handle_as_tasks, no isolation) runs them side by side."""
    recorder = Recorder(work=0.2)
    dp = recorder.register(Dispatcher())
    async with polling(tg, dp, recorder=recorder):
        for n in range(5):
            tg.send_text(user_id=1, text=f"m{n}")
            await asyncio.sleep(0.06)
        await tg.wait_for_async(lambda sent: len(sent) == 5)
    assert overlaps(recorder.spans[1]) > 0


async def test_a_batch_of_one_poll_keeps_its_order(tg: FakeTelegram, gate: inturn.Gate) -> None:
    """Eight updates of one user that arrive in one getUpdates answer run in their order."""
    recorder = Recorder(work=0.02)
    async with polling(tg, isolated(gate, recorder), recorder=recorder):
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
    async with polling(tg, isolated(gate, recorder), recorder=recorder):
        uid = tg.send_text(user_id=2, text="once")
        tg.redeliver(uid)  # before: in the same poll, or the next
        await asyncio.wait_for(recorder.started.wait(), 5)
        tg.redeliver(uid)  # during its handler
        await tg.wait_for_async(lambda sent: len(sent) == 1)
        tg.redeliver(uid)  # after its reply
        tg.send_text(user_id=2, text="barrier")  # in line behind every redelivery
        await tg.wait_for_async(lambda sent: len(sent) == 2)
    assert [c.text for c in tg.sent] == ["re once", "re barrier"]
    assert recorder.calls == 2
    await assert_idle(gate)


async def test_without_dedup_a_redelivered_update_is_answered_again(tg: FakeTelegram) -> None:
    """The control: the isolation alone orders duplicates; it does not drop them."""
    recorder = Recorder(work=0.05)
    async with inturn.Gate.from_url("memory://") as gate:
        dp = recorder.register(Dispatcher(events_isolation=InturnEventIsolation(gate)))
        async with polling(tg, dp, recorder=recorder):
            tg.redeliver(tg.send_text(user_id=2, text="twice"))
            await tg.wait_for_async(lambda sent: len(sent) == 2)
    assert [c.text for c in tg.sent] == ["re twice", "re twice"]


async def test_thirty_users_run_in_parallel(tg: FakeTelegram, gate: inturn.Gate) -> None:
    recorder = Recorder(work=0.5)
    async with polling(tg, isolated(gate, recorder), recorder=recorder):
        started = time.monotonic()
        for user in range(100, 130):
            tg.send_text(user_id=user, text="hi")
        await tg.wait_for_async(lambda sent: len(sent) == 30, timeout=20)
        wall = time.monotonic() - started
    assert sorted(c.chat_id for c in tg.sent) == list(range(100, 130))  # type: ignore[type-var]
    assert wall < 30 * 0.5 / 3, wall  # serially 15 s; typically under 1 s
    await assert_idle(gate)


async def test_chat_scope_serializes_a_group_and_keys_follow_the_scope(
    tg: FakeTelegram, gate: inturn.Gate
) -> None:
    recorder = Recorder(work=0.08)
    async with polling(tg, isolated(gate, recorder, scope="chat"), recorder=recorder):
        for n in range(4):  # four members of one group
            tg.send_text(user_id=10 + n, text=f"g{n}", chat_id=-500)
        await tg.wait_for_async(lambda sent: len(sent) == 4)
    assert [c.text for c in tg.sent] == [f"re g{n}" for n in range(4)]
    assert overlaps([s for spans in recorder.spans.values() for s in spans]) == 0
    key = StorageKey(bot_id=7, chat_id=-500, user_id=10)
    assert InturnEventIsolation(gate, scope="chat").key_for(key) == turn_key(7, "chat", -500)
    assert InturnEventIsolation(gate).key_for(key) == "tg:7:user:10"
    with pytest.raises(inturn.ConfigurationError):
        InturnEventIsolation(gate, scope="bot")  # type: ignore[arg-type]
    await assert_idle(gate)


async def test_mailbox_middleware_stores_updates_and_drains_them_in_turn(
    tg: FakeTelegram, gate: inturn.Gate
) -> None:
    recorder = Recorder(work=0.05)
    dp = Dispatcher()
    bot = make_bot(tg)
    mailbox = gate.mailbox("updates", handler=feed_from_mailbox(dp, bot))
    dp.update.outer_middleware(MailboxMiddleware(mailbox))
    got: list[inturn.Message] = []

    @dp.message()
    async def handle(message: Message, inturn_message: inturn.Message) -> None:
        got.append(inturn_message)
        await recorder(message)

    async with polling(tg, dp, bot, recorder):
        first = tg.send_text(user_id=3, text="m0")
        for n in range(1, 5):
            tg.send_text(user_id=3, text=f"m{n}")
        tg.redeliver(first)
        tg.send_text(user_id=4, text="other")
        await tg.wait_for_async(lambda sent: len(sent) == 6)
        assert await mailbox.drained(timeout=5)
    mine = [c.text for c in tg.sent if c.chat_id == 3]
    assert mine == [f"re m{n}" for n in range(5)]
    assert overlaps(recorder.spans[3]) == 0
    assert {m.key for m in got} == {"tg:424242:user:3", "tg:424242:user:4"}
    (m0,) = [m for m in got if m.id == str(first)]
    assert m0.payload["message"]["from"]["id"] == 3  # the update as Telegram sent it
    await assert_idle(gate)


async def test_webhook_retries_are_answered_once(tg: FakeTelegram, gate: inturn.Gate) -> None:
    """Webhook mode (aiohttp server): Telegram's retries of one update reach the bot while it
    is handled and after; it replies once, and the user's updates stay in order."""
    from aiogram.webhook.aiohttp_server import SimpleRequestHandler
    from aiohttp import web

    recorder = Recorder(work=0.2)
    dp = isolated(gate, recorder)
    bot = make_bot(tg)
    app = web.Application()
    SimpleRequestHandler(dispatcher=dp, bot=bot, secret_token="s3").register(app, path="/hook")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        await bot.set_webhook(f"http://{host}:{port}/hook", secret_token="s3")
        uid = tg.send_text(user_id=5, text="w0")  # POSTed by the fake in the background
        await asyncio.wait_for(recorder.started.wait(), 10)
        assert await asyncio.to_thread(tg.post_update, uid) == 200  # a retry, during
        tg.send_text(user_id=5, text="w1")
        await tg.wait_for_async(lambda sent: len(sent) == 2)
        assert await asyncio.to_thread(tg.post_update, uid) == 200  # a retry, after
        tg.send_text(user_id=5, text="w2")
        await tg.wait_for_async(lambda sent: len(sent) == 3)
        assert await asyncio.to_thread(tg.post_update, uid, secret_token="wrong") == 401
    finally:
        await runner.cleanup()
        await bot.session.close()
    assert [c.text for c in tg.sent] == ["re w0", "re w1", "re w2"]
    assert recorder.calls == 3
    await assert_idle(gate)


async def test_two_processes_share_each_users_turn_and_dedup(redis_url: str) -> None:
    """Two dispatchers with their own gates on one Redis both receive every update (two
    workers behind a retrying balancer): each is answered once, and a user's handlers never
    overlap across them."""
    recorder = Recorder(work=0.05)
    namespace = f"tg{secrets.token_hex(4)}"
    with FakeTelegram() as tg:
        async with (
            inturn.Gate.from_url(redis_url, namespace=namespace) as gate_a,
            inturn.Gate.from_url(redis_url, namespace=namespace) as gate_b,
            polling(tg, isolated(gate_a, recorder), recorder=recorder),
            polling(tg, isolated(gate_b, recorder), recorder=recorder),
        ):
            ids = []
            for n in range(6):
                for user in (1, 2):
                    ids.append(tg.send_text(user_id=user, text=f"u{user}m{n}"))
                await asyncio.sleep(0.03)
            for update_id in ids:  # and each once more, to whichever polls first
                tg.redeliver(update_id)
            await tg.wait_for_async(lambda sent: len(sent) >= 12)
            await asyncio.sleep(0.3)  # room for a wrong extra reply
            await assert_idle(gate_a)
    texts = sorted(c.text or "" for c in tg.sent)
    assert texts == sorted(f"re u{u}m{n}" for u in (1, 2) for n in range(6))
    assert overlaps(recorder.spans[1]) == 0
    assert overlaps(recorder.spans[2]) == 0
