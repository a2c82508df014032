"""The Telegram side: aiogram 3 handlers, long polling or a webhook, and a clean SIGTERM.

A redelivered update (the same update_id) is handled once. Every user message goes into
the user's mailbox, which stores it and returns at once.
The mailbox answers one user's messages in turn: messages that arrive while a reply is
being made are answered together in the next reply, and a message delivered again (the
same Telegram message id) is answered once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiogram import Dispatcher, Router
from aiogram.types import Message

from inturn.contrib.aiogram import DedupMiddleware

from .app import App
from .config import Settings

__all__ = ["build_dispatcher", "run_polling", "run_webhook"]

logger = logging.getLogger("ai_bot")


def build_router(app: App) -> Router:
    router = Router(name="ai_bot")

    # No filter: aiogram runs a plain (sync) filter such as ``F.text`` in a worker thread
    # for every update; the handler checks for text itself.
    @router.message()
    async def on_text(message: Message) -> None:
        user = message.from_user
        if user is None or message.text is None:
            return
        await app.submit(user.id, message.chat.id, message.message_id, message.text, time.time())

    return router


def build_dispatcher(app: App) -> Dispatcher:
    dp = Dispatcher()
    # A re-polled update or a webhook retry (the same update_id) is handled once; the
    # mailbox also drops a message id it has answered.
    dp.update.outer_middleware(DedupMiddleware(app.gate))
    dp.include_router(build_router(app))
    return dp


async def run_polling(settings: Settings) -> None:
    """Long polling until SIGTERM or SIGINT: then stop taking updates, let the running
    replies finish (up to SHUTDOWN_GRACE s; unfinished ones stay queued), and return."""
    app = await App.start(settings)
    try:
        app.replies.start_sweeper(min(5.0, settings.lease))  # answer what a dead process left
        me = await app.bot.get_me()
        logger.info("polling as @%s (turns: %s)", me.username, _where(settings.inturn_url))
        await build_dispatcher(app).start_polling(
            app.bot, handle_signals=True, close_bot_session=False, polling_timeout=10
        )
        logger.info("stopped taking updates; finishing the replies under way")
    finally:
        await app.aclose()
        logger.info("stopped")


async def run_webhook(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve Telegram's webhook calls on WEBHOOK_HOST:WEBHOOK_PORT until SIGTERM/SIGINT
    (or until ``stop`` is set), then finish the replies under way as polling does."""
    from aiogram.webhook.aiohttp_server import SimpleRequestHandler, setup_application
    from aiohttp import web

    if not settings.webhook_url:
        raise SystemExit("WEBHOOK_URL is not set (the public https URL Telegram calls)")
    app = await App.start(settings)
    runner: web.AppRunner | None = None
    try:
        app.replies.start_sweeper(min(5.0, settings.lease))
        dp = build_dispatcher(app)
        web_app = web.Application()
        path = "/" + settings.webhook_url.split("://", 1)[1].partition("/")[2]
        SimpleRequestHandler(dp, app.bot, secret_token=settings.webhook_secret).register(
            web_app, path=path
        )
        setup_application(web_app, dp, bot=app.bot)
        runner = web.AppRunner(web_app)
        await runner.setup()
        await web.TCPSite(runner, settings.webhook_host, settings.webhook_port).start()
        await app.bot.set_webhook(settings.webhook_url, secret_token=settings.webhook_secret)
        logger.info(
            "webhook at %s, listening on %s:%s",
            settings.webhook_url,
            settings.webhook_host,
            settings.webhook_port,
        )
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("stopped taking updates; finishing the replies under way")
    finally:
        if runner is not None:
            await runner.cleanup()
        await app.aclose()
        logger.info("stopped")


def _where(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "@" in url else url
