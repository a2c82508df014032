"""python-telegram-bot integration: each user's updates run in turn, once (``inturn[telegram]``).

    gate = inturn.Gate.from_url("redis://localhost:6379/0")
    app = (
        Application.builder()
        .token(TOKEN)
        .concurrent_updates(InturnUpdateProcessor(gate, max_concurrent_updates=64))
        .build()
    )

:class:`InturnUpdateProcessor` is a PTB update processor. Different users' updates run
concurrently (at most ``max_concurrent_updates`` handlers at once); one user's (or, with
``scope="chat"``, one chat's) updates run one at a time, in arrival order, inside the key's
turn — across processes too when the gate's backend is shared (Redis, PostgreSQL) — and an
``update_id`` that arrives again (a webhook retry, a re-polled update) runs once. Updates
with neither a user nor a chat run at once, without a turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Literal

import inturn

try:
    from telegram import Update
    from telegram.ext import BaseUpdateProcessor
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise inturn.ConfigurationError(
        "inturn.contrib.telegram needs python-telegram-bot: pip install 'inturn[telegram]'"
    ) from exc

__all__ = ["InturnUpdateProcessor", "Scope", "turn_key"]

logger = logging.getLogger("inturn")

Scope = Literal["user", "chat"]


def turn_key(bot_id: int, scope: Scope, id: int) -> str:
    """The turn key of a user or chat of a bot: ``tg:<bot_id>:<scope>:<id>``.

    Take the same key in your own code (``gate.turn(turn_key(bot.id, "user", user_id))``,
    e.g. in a job) and it runs in line with the user's updates. The aiogram integration
    uses the same keys.
    """
    return f"tg:{bot_id}:{scope}:{id}"


def _bot_id(update: Update) -> int:
    bot = update.get_bot()
    try:
        return bot.id
    except RuntimeError:  # not initialized yet: the token starts with the bot's id
        return int(bot.token.split(":", 1)[0])


class InturnUpdateProcessor(BaseUpdateProcessor):
    """``Application.builder().concurrent_updates(InturnUpdateProcessor(gate, ...))``.

    ``max_concurrent_updates``: how many handlers run at once in this process. Updates
    waiting for their user's turn do not count against it (one user's backlog never
    starves the others); ``max_waiting`` bounds all updates in flight, waiting or running.
    ``scope``: ``"user"`` (default; falls back to the chat for updates without a user, such
    as channel posts) or ``"chat"`` (falls back to the user, e.g. inline queries).
    ``timeout`` bounds the wait for the turn (:class:`inturn.TurnTimeout` then goes to PTB's
    task error logging); ``lease``/``max_hold`` override the gate's for these turns.
    ``dedup``: the dedup scope that remembers handled ``update_id`` values for
    ``dedup_window`` seconds, or ``None`` to handle every delivery.

    Handlers registered with ``block=False`` run as separate tasks, outside the turn.
    The gate belongs to the caller: :meth:`shutdown` leaves it open.
    """

    def __init__(
        self,
        gate: inturn.Gate,
        max_concurrent_updates: int = 256,
        *,
        scope: Scope = "user",
        timeout: float | None = None,
        lease: float | None = None,
        max_hold: float | None = None,
        dedup: str | None = "telegram-updates",
        dedup_window: float = 300.0,
        max_waiting: int = 100_000,
    ) -> None:
        if scope not in ("user", "chat"):
            raise inturn.ConfigurationError(f"scope must be 'user' or 'chat', not {scope!r}")
        if isinstance(max_concurrent_updates, bool) or not isinstance(max_concurrent_updates, int):
            raise inturn.ConfigurationError("max_concurrent_updates must be an int")
        if max_concurrent_updates < 1:
            raise ValueError("`max_concurrent_updates` must be a positive integer!")
        # PTB's own semaphore (taken before do_process_update) bounds updates in flight,
        # waiting ones included: it is sized by max_waiting; while the base class builds it,
        # the property reads that size too, and from then on the number of handler slots.
        self._limit = max(max_waiting, max_concurrent_updates)
        super().__init__(self._limit)
        self._limit = max_concurrent_updates
        self.gate = gate
        self.scope: Scope = scope
        self.timeout = timeout
        self.lease = lease
        self.max_hold = max_hold
        self.dedup = None if dedup is None else gate.dedup(dedup, window=dedup_window)
        self._slots = asyncio.Semaphore(max_concurrent_updates)
        self._running = 0

    @property
    def max_concurrent_updates(self) -> int:
        """How many updates' handlers run at once (waiting for a turn does not count)."""
        return self._limit

    @property
    def current_concurrent_updates(self) -> int:
        """How many updates' handlers are running now (a snapshot)."""
        return self._running

    def key_for(self, update: object) -> str | None:
        """The turn key of ``update``, or None for one with neither a user nor a chat."""
        if not isinstance(update, Update):
            return None
        user, chat = update.effective_user, update.effective_chat
        user_id = None if user is None else user.id
        chat_id = None if chat is None else chat.id
        if self.scope == "user":
            order: tuple[tuple[Scope, int | None], ...] = (("user", user_id), ("chat", chat_id))
        else:
            order = (("chat", chat_id), ("user", user_id))
        for scope, id in order:
            if id is not None:
                return turn_key(_bot_id(update), scope, id)
        return None

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        async with self._slots:
            self._running += 1
            try:
                yield
            finally:
                self._running -= 1

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        """Run ``coroutine`` in the update's turn, unless its ``update_id`` was handled."""
        started = False
        try:
            key = self.key_for(update)
            if key is None:
                async with self._slot():
                    started = True
                    await coroutine
                return
            async with (
                self.gate.turn(
                    key, timeout=self.timeout, lease=self.lease, max_hold=self.max_hold
                ) as turn,
                contextlib.AsyncExitStack() as stack,
            ):
                if self.dedup is not None and isinstance(update, Update):
                    try:
                        await stack.enter_async_context(
                            self.dedup.claim(key, update.update_id, fence=turn.fence)
                        )
                    except inturn.Duplicate as dup:
                        logger.info(
                            "inturn: update %s of %s is a duplicate (%s); skipped",
                            update.update_id,
                            key,
                            dup.state,
                            extra={"inturn_key": key},
                        )
                        return
                async with self._slot():
                    started = True
                    await coroutine
        finally:
            if not started and inspect.iscoroutine(coroutine):
                coroutine.close()  # never run: no "was never awaited" warning

    async def initialize(self) -> None:
        """Nothing to set up: the gate is ready when made."""

    async def shutdown(self) -> None:
        """Nothing to free: the gate is the caller's to close."""
