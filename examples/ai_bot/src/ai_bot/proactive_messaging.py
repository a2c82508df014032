"""Proactive messages: a Celery beat schedule that writes first to users who went quiet.

Each tick picks users idle for PROACTIVE_IDLE_MINUTES and sends one task per user,
``ai_bot.send_proactive``: an ``inturn.contrib.celery`` task that runs in that user's
turn (the same namespace and key as the replies' mailbox) and is skipped when the turn
is busy: a proactive message is never sent beside or between a reply. It goes through
the same ``send_ai_response`` as replies, with the conversation as recorded, so it never
answers a user's message: those are answered by the mailbox, once.

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
from inturn.contrib.celery import SerializedTask

from .app import App
from .config import Settings
from .storage import Store

__all__ = [
    "Proactive",
    "celery_app",
    "proactive_tick",
    "run_tick",
    "send_one",
    "send_proactive",
]

logger = logging.getLogger("ai_bot.proactive")

Outcome = Literal["sent", "skipped", "not-sent"]


class Proactive:
    """The proactive sender of one process, on an :class:`~ai_bot.app.App`."""

    def __init__(self, app: App) -> None:
        self.app = app
        # The user's turn, or skip: the same key and gate as the replies' mailbox, whose
        # draining also counts as busy (the mailbox is registered on this gate).
        self._send = app.gate.serialize(key="user_id", on_busy="skip", name="proactive")(
            self.send_in_turn
        )

    async def send_in_turn(self, user_id: int, force: bool = False, fence: int = 0) -> bool:
        """Send one proactive message; the caller holds ``user_id``'s turn (``fence``).
        False: not sent (messages wait for their reply, the user wrote meanwhile, or the
        model failed)."""
        app = self.app
        if await app.replies.pending(user_id):
            return False  # messages wait for their reply: that reply comes first
        if not force and user_id not in await self.idle_users():
            return False  # the user wrote meanwhile
        chat_id = await app.store.chat_of(user_id)
        sent = await app.responder.send_ai_response(
            user_id, user_id if chat_id is None else chat_id, [], fence=fence, proactive=True
        )
        return sent is not None

    async def send(self, user_id: int, *, force: bool = False) -> Outcome:
        """Take the user's turn (skip if busy) and send one proactive message."""
        try:
            sent = await self._send(user_id, force)
        except inturn.Skipped:
            logger.info("user %s is mid-conversation: proactive message skipped", user_id)
            return "skipped"
        return "sent" if sent else "not-sent"

    async def tick(self) -> dict[int, Outcome]:
        """Send to every idle user now, in this process."""
        users = await self.idle_users()
        results = await asyncio.gather(*(self.send(u) for u in users))
        outcome = dict(zip(users, results, strict=True))
        logger.info("proactive tick: %d idle user(s): %s", len(users), outcome)
        return outcome

    async def idle_users(self) -> list[int]:
        return await idle_users(self.app.store, self.app.settings)


async def idle_users(store: Store, settings: Settings) -> list[int]:
    """Users quiet for PROACTIVE_IDLE_MINUTES who wrote since their last proactive message."""
    return await store.idle_users(settings.proactive_idle_minutes * 60)


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


celery_app = Celery("ai_bot", broker=_broker())
celery_app.conf.update(
    beat_schedule={
        "proactive-tick": {
            "task": "ai_bot.proactive_tick",
            "schedule": float(os.environ.get("PROACTIVE_EVERY_SECONDS", "300") or 300),
        },
        # resumes a serialized task's mailbox whose worker died (none here uses one yet;
        # cheap, and it keeps the schedule right when one is added)
        "inturn-sweep": {"task": "inturn.sweep", "schedule": 30.0},
    },
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    # inturn.contrib.celery: the bot's gate, so a task's turn is the replies' turn
    inturn_url=os.environ.get("INTURN_URL", "").strip() or "memory://",
    inturn_namespace=os.environ.get("INTURN_NAMESPACE", "").strip() or "ai_bot",
    inturn_lease=float(os.environ.get("INTURN_LEASE", "30") or 30),
)

_apps: dict[int, App] = {}


async def _app() -> App:
    """This worker process's App (one per process and event loop; kept between tasks)."""
    loop_id = id(asyncio.get_running_loop())
    app = _apps.get(loop_id)
    if app is None:
        app = _apps[loop_id] = await App.start(Settings.from_env())
    return app


@celery_app.task(name="ai_bot.proactive_tick")  # type: ignore[untyped-decorator]
def proactive_tick() -> dict[str, str]:
    """One tick: a ``send_proactive`` task for each idle user (each skipped if busy)."""
    users = asyncio.run(_idle_users())
    for user_id in users:
        send_proactive.delay(user_id=user_id)
    logger.info("proactive tick: %d idle user(s): %s", len(users), users)
    return {str(u): "queued" for u in users}


async def _idle_users() -> list[int]:
    settings = Settings.from_env()
    store = await Store.open(settings.database_url)
    try:
        return await idle_users(store, settings)
    finally:
        await store.aclose()


@celery_app.task(  # type: ignore[untyped-decorator]
    base=SerializedTask,
    name="ai_bot.send_proactive",
    inturn={"key": "user_id", "mode": "turn", "on_busy": "skip", "wait": 0, "dedup": None},
)
async def send_proactive(user_id: int, fence: int = 0) -> str:
    """In ``user_id``'s turn (skipped by inturn when it is busy): one proactive message."""
    sent = await Proactive(await _app()).send_in_turn(user_id, fence=fence)
    return "sent" if sent else "not-sent"
