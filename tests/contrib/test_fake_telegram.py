"""The fake Bot API server against the real client libraries it stands in for."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.fakes.telegram import FakeTelegram


@pytest.fixture
def tg() -> Any:
    with FakeTelegram() as fake:
        yield fake


async def test_aiogram_polls_replies_and_sees_429(tg: FakeTelegram) -> None:
    from aiogram import Bot, Dispatcher
    from aiogram.client.session.aiohttp import AiohttpSession
    from aiogram.client.telegram import TelegramAPIServer
    from aiogram.exceptions import TelegramNotFound, TelegramRetryAfter
    from aiogram.types import Message

    bot = Bot(tg.token, session=AiohttpSession(api=TelegramAPIServer.from_base(tg.url)))
    me = await bot.get_me()
    assert me.username == "inturn_fake_bot"
    tg.fail_next("sendMessage", status=429, retry_after=3)
    with pytest.raises(TelegramRetryAfter) as info:
        await bot.send_message(1, "x")
    assert info.value.retry_after == 3
    with pytest.raises(TelegramNotFound, match="not implemented"):
        await bot.send_dice(1)
    assert await bot.delete_message(1, 5) is True
    assert [(c.method, c.chat_id, c.message_id) for c in tg.calls] == [("deleteMessage", 1, 5)]

    dp = Dispatcher()

    @dp.message()
    async def echo(message: Message) -> None:
        await message.bot.send_chat_action(message.chat.id, "typing")  # type: ignore[union-attr]
        sent = await message.answer(f"echo {message.text}")
        await sent.edit_text(f"edited {message.text}")

    task = asyncio.create_task(dp.start_polling(bot, handle_signals=False, polling_timeout=1))
    tg.send_text(user_id=7, text="hi")
    tg.send_text(user_id=8, text="/start")
    await tg.wait_for_async(lambda edits: len(edits) == 2, on="edits")
    await dp.stop_polling()
    await task
    await bot.session.close()
    replies = sorted((c.chat_id, c.text) for c in tg.sent)
    assert replies == [(7, "echo hi"), (8, "echo /start")]
    assert [a.action for a in tg.actions] == ["typing", "typing"]
    assert {e.text for e in tg.edits} == {"edited hi", "edited /start"}
    assert tg.pending == []  # the offset confirmed both


async def test_ptb_polls_replies_and_redelivery_comes_again(tg: FakeTelegram) -> None:
    from telegram import Update
    from telegram.error import RetryAfter
    from telegram.ext import Application, ContextTypes, MessageHandler, filters

    seen: list[int] = []

    async def echo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None
        seen.append(update.update_id)
        await update.message.reply_text(f"echo {update.message.text}")

    app = Application.builder().token(tg.token).base_url(f"{tg.url}/bot").build()
    app.add_handler(MessageHandler(filters.TEXT, echo))
    async with app:
        tg.fail_next("sendMessage", status=429, retry_after=2)
        with pytest.raises(RetryAfter):
            await app.bot.send_message(1, "x")
        assert app.updater is not None
        await app.updater.start_polling(timeout=1, poll_interval=0)
        await app.start()
        uid = tg.send_text(user_id=5, text="a")
        await tg.wait_for_async(lambda sent: len(sent) == 1)
        tg.redeliver(uid)
        await tg.wait_for_async(lambda sent: len(sent) == 2)
        await app.updater.stop()
        await app.stop()
    assert seen == [uid, uid]
    assert [c.text for c in tg.sent] == ["echo a", "echo a"]


def test_webhook_posts_and_sync_wait(tg: FakeTelegram) -> None:
    got: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append(
                {"secret": self.headers.get("X-Telegram-Bot-Api-Secret-Token"), **json.loads(body)}
            )
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        uid = tg.send_text(user_id=3, text="queued before the webhook")
        request = urllib.request.Request(
            f"{tg.url}/bot{tg.token}/setWebhook",
            data=json.dumps({"url": hook_url, "secret_token": "s3"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as response:
            assert json.load(response) == {"ok": True, "result": True}
        uid2 = tg.send_text(user_id=3, text="after")
        assert tg.post_update(uid2) == 200
        tg.wait_for(lambda posts: len(posts) == 3, on="webhook_posts")
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(u["update_id"] for u in got) == [uid, uid2, uid2]
    assert {u["secret"] for u in got} == {"s3"}
