"""The bot's parts, built once per process from :class:`~ai_bot.config.Settings`."""

from __future__ import annotations

import hashlib
import logging
import urllib.parse
import uuid
from typing import Any

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.methods import (
    DeleteWebhook,
    EditMessageText,
    GetMe,
    GetUpdates,
    SendChatAction,
    SendMessage,
    SetWebhook,
    TelegramMethod,
)
from aiogram.methods.base import Response

import inturn

from .config import Settings
from .responder import Responder
from .storage import Store

__all__ = ["App", "make_bot"]

logger = logging.getLogger("ai_bot")

MAILBOX = "replies"
"""The mailbox every user message goes through; the proactive job reads its state."""


_METHODS: tuple[type[TelegramMethod[Any]], ...] = (
    GetUpdates,
    GetMe,
    SendMessage,
    SendChatAction,
    EditMessageText,
    SetWebhook,
    DeleteWebhook,
)
_RESPONSE_TYPES = [Response[m.__returning__] for m in _METHODS]  # type: ignore[name-defined]
"""Strong references to the response models of the Bot API calls the bot makes.

aiogram parses every answer as ``Response[<the method's result>]``, and pydantic keeps
such a parametrized model only in a weak cache: with no other reference it is collected
and rebuilt (a full schema build) on the next call, which was about a tenth of the bot's
CPU per message under load. Holding them here keeps one copy for the process."""


def make_bot(settings: Settings) -> Bot:
    """An aiogram Bot, on a local Bot API server when TELEGRAM_API_URL says so."""
    session = None
    if settings.telegram_api_url:
        session = AiohttpSession(api=TelegramAPIServer.from_base(settings.telegram_api_url))
    return Bot(settings.bot_token, session=session)


def fence_source(settings: Settings) -> str:
    """Where this process's fences come from (fences compare only within one source)."""
    if settings.inturn_url.startswith("memory:"):
        return f"memory:{uuid.uuid4().hex}"  # counts from 1 again in every process
    parts = urllib.parse.urlsplit(settings.inturn_url)
    where = (
        f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}#{settings.inturn_namespace}"
    )
    return f"{parts.scheme}:{hashlib.sha256(where.encode()).hexdigest()[:16]}"


class App:
    """Gate, mailbox, store, bot and responder: what a bot or a proactive process runs on."""

    def __init__(self, settings: Settings, store: Store, bot: Bot) -> None:
        self.settings = settings
        self.store = store
        self.bot = bot
        self.gate = inturn.Gate.from_url(
            settings.inturn_url, namespace=settings.inturn_namespace, lease=settings.lease
        )
        self.responder = Responder(settings, bot, store, fence_source=fence_source(settings))
        self.replies = self.gate.mailbox(
            MAILBOX,
            handler=self.responder.on_batch,
            batch=True,  # what arrives while a reply is made is answered next, together
            debounce=settings.debounce,
            sweep_interval=min(5.0, settings.lease),
        )

    @classmethod
    async def start(cls, settings: Settings, *, bot: Bot | None = None) -> App:
        store = await Store.open(settings.database_url)
        return cls(settings, store, bot or make_bot(settings))

    async def submit(
        self, user_id: int, chat_id: int, message_id: int, text: str, at: float
    ) -> None:
        """Queue a user's message for their next reply (stored before this returns)."""
        await self.replies.submit(
            user_id,
            {"chat_id": chat_id, "message_id": message_id, "text": text, "at": at},
            id=message_id,
        )

    async def aclose(self, grace: float | None = None) -> None:
        """Let running replies finish for ``grace`` s; the rest stay queued for the next
        start (or another process) to answer. Then close everything."""
        grace = self.settings.shutdown_grace if grace is None else grace
        await self.replies.aclose(timeout=grace)
        await self.gate.aclose()
        await self.responder.aclose()
        await self.bot.session.close()
        await self.store.aclose()
