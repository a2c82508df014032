"""``send_ai_response``: the one place a reply is made, always inside the user's turn.

It loads the conversation, shows "typing…", asks the model, sends the reply as it is
(split at Telegram's 4096-character limit, honouring 429 ``retry_after``), and records
the turn with its fence. Callers: the mailbox handler (user messages, batched) and the
proactive job; both hold the user's turn from the same gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from aiogram import Bot
from aiogram.exceptions import TelegramRetryAfter
from openai import AsyncOpenAI

import inturn

from .config import Settings
from .storage import Incoming, StaleFence, Store, Turn

__all__ = ["APOLOGY", "TELEGRAM_LIMIT", "Responder", "split_message"]

logger = logging.getLogger("ai_bot")

TELEGRAM_LIMIT = 4096
"""Telegram's longest message, in UTF-16 code units."""

APOLOGY = "Sorry, I couldn't answer just now. I'll try again in a moment."

MAX_RETRY_AFTER_TRIES = 5

_T = TypeVar("_T")


def _units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def split_message(text: str, limit: int = TELEGRAM_LIMIT) -> list[str]:
    """Cut ``text`` into parts of at most ``limit`` UTF-16 units, at a line break or a space
    when one is near the end of a part; joined back, the parts give ``text`` again."""
    parts: list[str] = []
    rest = text
    while _units(rest) > limit:
        # the longest prefix within the limit
        lo, hi = 1, len(rest)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _units(rest[:mid]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        cut = lo
        for sep in ("\n", " "):
            at = rest.rfind(sep, 0, cut)
            if at >= cut // 2:
                cut = at + 1
                break
        parts.append(rest[:cut])
        rest = rest[cut:]
    if rest or not parts:
        parts.append(rest)
    return parts


class LLMFailed(Exception):
    """The model gave no usable answer (an error, a timeout, or empty text)."""


class Responder:
    """Makes replies. One per process; shares the bot, the store and the model client."""

    def __init__(self, settings: Settings, bot: Bot, store: Store, *, fence_source: str) -> None:
        self.settings = settings
        self.bot = bot
        self.store = store
        self.fence_source = fence_source
        self.llm = AsyncOpenAI(
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key,
            timeout=settings.llm_timeout,
            max_retries=0,  # the mailbox retries a failed reply, with backoff
        )

    async def aclose(self) -> None:
        await self.llm.close()

    # -- the mailbox handler ------------------------------------------------------------

    async def on_batch(self, msgs: list[inturn.Message]) -> None:
        """Answer one user's messages that arrived since the last reply, in one reply."""
        user_id = int(msgs[0].key)
        chat_id = int(msgs[0].payload.get("chat_id", user_id))
        seen: set[int] = set()
        incoming: list[Incoming] = []
        for m in sorted(msgs, key=lambda m: int(m.payload["message_id"])):
            mid = int(m.payload["message_id"])
            if mid in seen:
                continue
            seen.add(mid)
            incoming.append(Incoming(mid, str(m.payload["text"]), float(m.payload["at"])))
        done, stored, history = await self.store.load(user_id, seen, self.settings.history_limit)
        if done:
            logger.info("user %s: messages %s were answered before; not again", user_id, done)
            incoming = [m for m in incoming if m.message_id not in done]
        if not incoming:
            return
        fence = msgs[0].fence
        await self.store.check_fence(user_id, fence, self.fence_source, stored)
        await self.send_ai_response(
            user_id, chat_id, incoming, fence=fence, attempt=msgs[0].attempt, history=history
        )

    # -- the reply ----------------------------------------------------------------------

    async def send_ai_response(
        self,
        user_id: int,
        chat_id: int,
        incoming: Sequence[Incoming],
        *,
        fence: int,
        attempt: int = 1,
        proactive: bool = False,
        history: list[tuple[str, str]] | None = None,
    ) -> str | None:
        """Reply to ``incoming`` (or, ``proactive``, start a message): the caller holds the
        user's turn and passes its ``fence``. Returns the text sent (None: nothing sent).
        ``history``: the recorded conversation, when the caller loaded it (and checked the
        fence) already.

        A failed model call sends a short apology on the first attempt and raises, so
        the mailbox retries it; a proactive message is simply not sent.
        """
        if history is None:  # else the caller loaded it and checked the fence
            await self.store.check_fence(user_id, fence, self.fence_source)
            history = await self.store.history(user_id, self.settings.history_limit)
        prompt: list[dict[str, str]] = [{"role": "system", "content": self.settings.system_prompt}]
        prompt += [{"role": role, "content": text} for role, text in history]
        prompt += [{"role": "user", "content": m.text} for m in incoming]
        if proactive:
            prompt.append({"role": "system", "content": self.settings.proactive_prompt})
        started = time.monotonic()
        try:
            async with self._typing(chat_id):
                reply = await self._complete(user_id, prompt)
        except LLMFailed as exc:
            logger.warning(
                "user %s: the model failed (attempt %d): %s", user_id, attempt, exc.__cause__ or exc
            )
            if proactive:
                return None
            if attempt == 1:
                await self._send(chat_id, APOLOGY)
            raise
        await self.store.check_fence(user_id, fence, self.fence_source)
        for part in split_message(reply):
            await self._send(chat_id, part)
        try:
            await self.store.record(
                Turn(user_id, chat_id, fence, self.fence_source, incoming, reply, proactive)
            )
        except StaleFence:
            return reply  # logged by the store; the newer holder's record stands
        logger.info(
            "user %s: replied to %d message(s)%s in %.2fs",
            user_id,
            len(incoming),
            " (proactive)" if proactive else "",
            time.monotonic() - started,
        )
        return reply

    async def _complete(self, user_id: int, prompt: list[dict[str, str]]) -> str:
        try:
            response = await self.llm.chat.completions.create(
                model=self.settings.llm_model,
                messages=prompt,  # type: ignore[arg-type]
                user=str(user_id),
            )
            text = response.choices[0].message.content if response.choices else None
        except Exception as exc:
            raise LLMFailed(str(exc)) from exc
        if not text or not text.strip():
            raise LLMFailed("the model returned no text")
        return text

    @contextlib.asynccontextmanager
    async def _typing(self, chat_id: int) -> Any:
        """Show "typing…" (renewed every 4 s, Telegram shows it for 5) while the body runs."""

        async def keep() -> None:
            while True:
                try:
                    await self.bot.send_chat_action(chat_id, "typing")
                except TelegramRetryAfter as exc:
                    await asyncio.sleep(exc.retry_after)
                    continue
                except Exception as exc:
                    logger.debug("chat %s: typing indicator failed: %r", chat_id, exc)
                await asyncio.sleep(4.0)

        task = asyncio.create_task(keep())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _send(self, chat_id: int, text: str) -> None:
        await self._honouring_retry_after(lambda: self.bot.send_message(chat_id, text))

    @staticmethod
    async def _honouring_retry_after(call: Callable[[], Awaitable[_T]]) -> _T:
        """Run a Bot API call; on 429 wait ``retry_after`` seconds and try again."""
        for _ in range(MAX_RETRY_AFTER_TRIES - 1):
            try:
                return await call()
            except TelegramRetryAfter as exc:
                logger.info("Telegram asked to wait %ss before sending", exc.retry_after)
                await asyncio.sleep(exc.retry_after)
        return await call()
