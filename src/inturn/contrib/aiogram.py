"""aiogram 3 integration: each user's (or chat's) updates run in turn, once (``inturn[aiogram]``).

    gate = inturn.Gate.from_url("redis://localhost:6379/0")
    dp = Dispatcher(events_isolation=InturnEventIsolation(gate))   # one update per user at a time
    dp.update.outer_middleware(DedupMiddleware(gate))             # a redelivered update runs once

:class:`InturnEventIsolation` is an aiogram event isolation: aiogram's FSM middleware enters
``lock(key)`` around the whole handling of each update that has a user or chat, so handlers
of one user never overlap, run in arrival order (FIFO), and hold a lease that is renewed while
they run; across processes when the gate's backend is shared. Idle users cost nothing.

:class:`DedupMiddleware` claims each ``update_id`` in a dedup window: a webhook retry or a
re-polled update is handled once. :class:`MailboxMiddleware` stores a user's updates in a
durable :class:`inturn.Mailbox` instead of handling them on the spot; the mailbox's drain runs
them in the user's turn (see :func:`feed_from_mailbox`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import inturn

try:
    from aiogram import Bot, Dispatcher
    from aiogram.dispatcher.event.bases import UNHANDLED
    from aiogram.dispatcher.middlewares.base import BaseMiddleware
    from aiogram.fsm.storage.base import BaseEventIsolation, StorageKey
    from aiogram.types import TelegramObject, Update
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise inturn.ConfigurationError(
        "inturn.contrib.aiogram needs aiogram 3: pip install 'inturn[aiogram]'"
    ) from exc

__all__ = [
    "DedupMiddleware",
    "InturnEventIsolation",
    "MailboxMiddleware",
    "Scope",
    "feed_from_mailbox",
    "turn_key",
]

logger = logging.getLogger("inturn")

Scope = Literal["user", "chat"]

Handler = Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]]

MAILBOX_MESSAGE_KEY = "inturn_message"
"""The handler data key under which an update fed from a mailbox carries its message."""

# (key, fence) of the turn this task holds through InturnEventIsolation or a mailbox drain:
# a dedup claim inside it passes the fence, so a newer turn can take over a stale claim.
_held: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "inturn_aiogram_turn", default=None
)


def _check_scope(scope: str) -> Scope:
    if scope == "user":
        return "user"
    if scope == "chat":
        return "chat"
    raise inturn.ConfigurationError(f"scope must be 'user' or 'chat', not {scope!r}")


def turn_key(bot_id: int, scope: Scope, id: int) -> str:
    """The turn key of a user or chat of a bot: ``tg:<bot_id>:<scope>:<id>``.

    Take the same key in your own code (``gate.turn(turn_key(bot.id, "user", user_id))``)
    and that code runs in line with the user's updates. The python-telegram-bot
    integration uses the same keys.
    """
    return f"tg:{bot_id}:{scope}:{id}"


def _event_key(bot: Bot | None, data: dict[str, Any], scope: Scope) -> str | None:
    """The update's turn key from aiogram's event context (user, else chat, or the reverse)."""
    context = data.get("event_context")
    if bot is None or context is None:
        return None
    user_id: int | None = getattr(context, "user_id", None)
    chat_id: int | None = getattr(context, "chat_id", None)
    first, second = (user_id, chat_id) if scope == "user" else (chat_id, user_id)
    if first is not None:
        return turn_key(bot.id, scope, first)
    if second is not None:
        return turn_key(bot.id, "chat" if scope == "user" else "user", second)
    return None


def _update_of(event: TelegramObject, data: dict[str, Any]) -> Update | None:
    if isinstance(event, Update):
        return event
    update = data.get("event_update")
    return update if isinstance(update, Update) else None


class InturnEventIsolation(BaseEventIsolation):
    """``Dispatcher(events_isolation=InturnEventIsolation(gate))``: one update per user at a time.

    ``scope="user"`` (default) serializes a user's updates across all chats;
    ``scope="chat"`` serializes a chat's updates (all members of a group in one line).
    ``timeout`` (seconds, None: wait as long as it takes) bounds the wait for the turn; an
    update that times out raises :class:`inturn.TurnTimeout` into aiogram's error handling.
    ``lease``/``max_hold`` override the gate's for these turns. The gate belongs to the
    caller: :meth:`close` leaves it open.
    """

    def __init__(
        self,
        gate: inturn.Gate,
        *,
        scope: Scope = "user",
        timeout: float | None = None,
        lease: float | None = None,
        max_hold: float | None = None,
    ) -> None:
        self.gate = gate
        self.scope = _check_scope(scope)
        self.timeout = timeout
        self.lease = lease
        self.max_hold = max_hold

    def key_for(self, key: StorageKey) -> str:
        """The turn key of aiogram's storage key."""
        id = key.user_id if self.scope == "user" else key.chat_id
        return turn_key(key.bot_id, self.scope, id)

    @contextlib.asynccontextmanager
    async def lock(self, key: StorageKey) -> AsyncIterator[None]:
        name = self.key_for(key)
        async with self.gate.turn(
            name, timeout=self.timeout, lease=self.lease, max_hold=self.max_hold
        ) as turn:
            token = _held.set((name, turn.fence))
            try:
                yield
            finally:
                _held.reset(token)

    async def close(self) -> None:
        """Nothing to free: the gate is the caller's to close."""


def _fence_for(key: str) -> int | None:
    held = _held.get()
    return held[1] if held is not None and held[0] == key else None


class DedupMiddleware(BaseMiddleware):
    """``dp.update.outer_middleware(DedupMiddleware(gate))``: each ``update_id`` is handled once.

    Claims the update's id in ``gate.dedup(name, window=window)`` under the user's (or
    chat's) turn key: a duplicate that arrives while the first is handled, or within
    ``window`` seconds after it, is dropped (the handler does not run; aiogram logs it as not
    handled). An update whose handler raised is not remembered, so a retry runs again.
    Registered after :class:`InturnEventIsolation`'s lock (aiogram enters its own FSM
    middleware first), the claim is made inside the user's turn: give both the same scope.
    """

    def __init__(
        self,
        gate: inturn.Gate,
        *,
        scope: Scope = "user",
        window: float = 300.0,
        name: str = "aiogram-updates",
    ) -> None:
        self.scope = _check_scope(scope)
        self.dedup = gate.dedup(name, window=window)

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        update = _update_of(event, data)
        bot = data.get("bot")
        if update is None or not isinstance(bot, Bot):
            return await handler(event, data)
        key = _event_key(bot, data, self.scope) or f"tg:{bot.id}"
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(
                    self.dedup.claim(key, update.update_id, fence=_fence_for(key))
                )
            except inturn.Duplicate as dup:
                logger.info(
                    "inturn: update %s of %s is a duplicate (%s); skipped",
                    update.update_id,
                    key,
                    dup.state,
                    extra={"inturn_key": key},
                )
                return UNHANDLED
            return await handler(event, data)


class MailboxMiddleware(BaseMiddleware):
    """``dp.update.outer_middleware(MailboxMiddleware(mailbox))``: store, don't wait.

    Each update with a user (``scope="user"``) or chat (``scope="chat"``) for which
    ``when(update)`` is true (default: every such update) is submitted to ``mailbox`` under
    the user's turn key, as the update's JSON with its ``update_id`` as the message id (a
    redelivered update is stored once), and goes no further: the webhook or polling loop is
    free at once. Other updates pass through.

    The mailbox's handler runs in the user's turn, one message (or batch) at a time, with
    retries and dead letters. Let it run your routers with :func:`feed_from_mailbox`, or read
    ``message.payload`` (the update as a dict) in a handler of your own, e.g. a debounced batch
    of a user's texts answered in one reply. Use it without ``InturnEventIsolation`` for
    the same updates: the mailbox's drain already holds the user's turn.
    """

    def __init__(
        self,
        mailbox: inturn.Mailbox,
        *,
        scope: Scope = "user",
        when: Callable[[Update], bool] | None = None,
    ) -> None:
        self.mailbox = mailbox
        self.scope = _check_scope(scope)
        self.when = when

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        update = _update_of(event, data)
        bot = data.get("bot")
        if (
            MAILBOX_MESSAGE_KEY in data  # fed from the mailbox: handle it now
            or update is None
            or not isinstance(bot, Bot)
            or (self.when is not None and not self.when(update))
        ):
            return await handler(event, data)
        key = _event_key(bot, data, self.scope)
        if key is None:
            return await handler(event, data)
        payload = update.model_dump(
            mode="json", exclude_none=True, exclude_unset=True, by_alias=True
        )  # Telegram's own field names ("from", not "from_user")
        await self.mailbox.submit(key, payload, id=update.update_id)
        return None


def feed_from_mailbox(
    dispatcher: Dispatcher, bot: Bot
) -> Callable[[inturn.Message | list[inturn.Message]], Awaitable[None]]:
    """A mailbox handler that runs each stored update through ``dispatcher`` for ``bot``.

        dp = Dispatcher()
        mailbox = gate.mailbox("updates", handler=feed_from_mailbox(dp, bot))
        dp.update.outer_middleware(MailboxMiddleware(mailbox))

    The update runs in the user's turn (the drain holds it); the handler data gets the
    :class:`inturn.Message` as ``inturn_message``. An exception from a handler (one aiogram's
    error handlers did not handle) makes the mailbox retry the update later, then
    dead-letter it. With ``batch=True`` the updates of a batch run one after another.
    """

    async def handle(batch: inturn.Message | list[inturn.Message]) -> None:
        for message in batch if isinstance(batch, list) else [batch]:
            update = Update.model_validate(message.payload, context={"bot": bot})
            token = _held.set((message.key, message.fence))
            try:
                await dispatcher.feed_update(bot, update, **{MAILBOX_MESSAGE_KEY: message})
            finally:
                _held.reset(token)

    return handle
