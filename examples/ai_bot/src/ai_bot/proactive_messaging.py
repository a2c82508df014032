"""Proactive messages: a Celery beat schedule that writes first to users who went quiet.

Each tick picks users idle for PROACTIVE_IDLE_MINUTES and, for each, takes that user's
turn with ``on_busy="skip"``: while the user's mailbox is answering (or anyone holds the
turn) the proactive message is skipped, never sent beside or between a reply. It goes
through the same ``send_ai_response`` as replies, with the conversation as recorded, so
it never answers a user's message: those are answered by the mailbox, once.

    celery -A ai_bot.proactive_messaging worker --beat --loglevel=INFO
    python -m ai_bot proactive --user 123456      # send one now (operator command)
    python -m ai_bot proactive                    # run one tick now
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Literal

from celery import Celery  # type: ignore[import-untyped, unused-ignore]

import inturn

from .app import App
from .config import Settings

__all__ = ["Proactive", "celery_app", "proactive_tick", "run_tick", "send_one"]

logger = logging.getLogger("ai_bot.proactive")

Outcome = Literal["sent", "skipped", "not-sent"]


class Proactive:
    """The proactive sender of one process, on an :class:`~ai_bot.app.App`."""

    def __init__(self, app: App) -> None:
        self.app = app
        # The user's turn, or skip: the same key and gate as the replies' mailbox, whose
        # draining also counts as busy (the mailbox is registered on this gate).
        self._send = app.gate.serialize(key="user_id", on_busy="skip", name="proactive")(
            self._send_in_turn
        )

    async def _send_in_turn(self, user_id: int, force: bool, fence: int = 0) -> bool:
        app = self.app
        if await app.replies.pending(user_id):
            return False  # messages wait for their reply: that reply comes first
        if not force:
            idle = app.settings.proactive_idle_minutes * 60
            if user_id not in await app.store.idle_users(idle):
                return False  # the user wrote meanwhile
        chat_id = await app.store.chat_of(user_id)
        sent = await app.responder.send_ai_response(
            user_id, user_id if chat_id is None else chat_id, [], fence=fence, proactive=True
        )
        return sent is not None

    async def send(self, user_id: int, *, force: bool = False) -> Outcome:
        try:
            sent = await self._send(user_id, force)
        except inturn.Skipped:
            logger.info("user %s is mid-conversation: proactive message skipped", user_id)
            return "skipped"
        return "sent" if sent else "not-sent"

    async def tick(self) -> dict[int, Outcome]:
        idle = self.app.settings.proactive_idle_minutes * 60
        users = await self.app.store.idle_users(idle)
        results = await asyncio.gather(*(self.send(u) for u in users))
        outcome = dict(zip(users, results, strict=True))
        logger.info("proactive tick: %d idle user(s): %s", len(users), outcome)
        return outcome


async def run_tick(settings: Settings) -> dict[int, Outcome]:
    app = await App.start(settings)
    try:
        return await Proactive(app).tick()
    finally:
        await app.aclose()


async def send_one(settings: Settings, user_id: int) -> Outcome:
    app = await App.start(settings)
    try:
        return await Proactive(app).send(user_id, force=True)
    finally:
        await app.aclose()


def _broker() -> str:
    explicit = os.environ.get("CELERY_BROKER_URL", "").strip()
    inturn_url = os.environ.get("INTURN_URL", "").strip()
    if explicit:
        return explicit
    return inturn_url if inturn_url.startswith(("redis://", "rediss://")) else "memory://"


# A plain Celery app: the task runs the async tick with asyncio.run and builds its own gate.
celery_app = Celery("ai_bot", broker=_broker())
celery_app.conf.update(
    beat_schedule={
        "proactive-tick": {
            "task": "ai_bot.proactive_tick",
            "schedule": float(os.environ.get("PROACTIVE_EVERY_SECONDS", "300") or 300),
        }
    },
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)


@celery_app.task(name="ai_bot.proactive_tick")  # type: ignore[untyped-decorator]
def proactive_tick() -> dict[str, str]:
    """One tick: a proactive message to each idle user whose turn is free."""
    outcome = asyncio.run(run_tick(Settings.from_env()))
    return {str(k): v for k, v in outcome.items()}
