"""Operators' calls on a gate's engine: force a release, handle dead letters, forget a key,
sweep. The ``inturn`` command's ``release``, ``dead-letters``, ``forget`` and ``sweep``.

The engine does the atomic parts (``AdminBackend``); what is decided once for
every engine lives here: reading dead letters (the engine keeps them opaque),
their ids, which ones a selection means, how a replay puts a letter back, and
the WARNING a forced release leaves in the log.

Dead-letter ids are short hashes of the stored letter: stable across listings,
the same in every process, different for two letters (each carries its
message's unique tag and its failure time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ._backends.admin import AdminBackend, Forgotten, Released, SweepReport
from ._backends.base import Backend, MailboxBackend, SubmitStatus
from ._errors import ConfigurationError
from ._keys import new_token, normalize_key, shown

__all__ = ["Admin", "Letter", "letter_id"]

logger = logging.getLogger("inturn")

LIST_LIMIT = 1_000_000
"""The most dead letters of one mailbox a replay, purge or forget looks at."""

_REPLAY_LEASE = 0.001
"""The drainer role a replay takes when nobody drains the queue: it lapses at once, so a
process with the mailbox's handler resumes the queue at its next sweep (or the key's next
message starts a drain)."""

_NO_LIMIT = 2**31 - 1
"""A replay is never refused for a full queue: the letter was accepted once already."""


def letter_id(text: str) -> str:
    """The id of a stored dead letter: 12 hex digits of a hash of its text."""
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=6, person=b"inturn-dead").hexdigest()


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter as an operator sees it.

    ``id`` names it for ``replay``/``purge`` (see :func:`letter_id`); ``key`` is the
    user key its message was for, ``message_id`` the id given at submit (if any);
    ``enqueued_at``/``failed_at`` are epoch seconds; ``attempts`` how many deliveries
    failed and ``error`` the last one. Fields a letter does not carry are None.
    """

    id: str
    mailbox: str
    key: str | None
    message_id: str | None
    payload: Any
    enqueued_at: float | None
    attempts: int | None
    error: str | None
    failed_at: float | None
    text: str
    """The stored letter (what the engine keeps)."""

    def shown(self) -> dict[str, Any]:
        """The letter for printing (``--json``): every field but the stored text."""
        return {
            "id": self.id,
            "mailbox": self.mailbox,
            "key": self.key,
            "message_id": self.message_id,
            "payload": self.payload,
            "enqueued_at": self.enqueued_at,
            "attempts": self.attempts,
            "error": self.error,
            "failed_at": self.failed_at,
        }

    def message(self) -> str | None:
        """The message to store again (attempts counted afresh), or None if unreadable."""
        try:
            stored = json.loads(self.text)["m"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(stored, dict) or not isinstance(stored.get("k"), str):
            return None
        return json.dumps({**stored, "a": 0})


def _read(mailbox: str, text: str) -> Letter:
    """A stored dead letter (``{"m": message, "e": error, "at": time, "n": attempts}``)."""
    entry: Any = None
    with contextlib.suppress(ValueError):
        entry = json.loads(text)
    entry = entry if isinstance(entry, dict) else {}
    message = entry.get("m") if isinstance(entry.get("m"), dict) else {}

    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, int | float) else None

    def string(value: Any) -> str | None:
        return value if isinstance(value, str) else None

    attempts = entry.get("n")
    return Letter(
        id=letter_id(text),
        mailbox=mailbox,
        key=string(message.get("k")),
        message_id=string(message.get("i")),
        payload=message.get("p"),
        enqueued_at=number(message.get("t")),
        attempts=attempts if isinstance(attempts, int) else None,
        error=string(entry.get("e")),
        failed_at=number(entry.get("at")),
        text=text,
    )


class Admin:
    """The operators' calls on one engine (a gate's ``backend``), for one namespace.

    Every call is safe beside live workers. See :class:`~inturn._backends.admin.AdminBackend`
    for what each engine does atomically.
    """

    def __init__(self, backend: Backend) -> None:
        if not isinstance(backend, AdminBackend) or not isinstance(backend, MailboxBackend):
            raise ConfigurationError(
                f"{type(backend).__name__} offers no operators' calls (release, dead "
                "letters, forget, sweep)"
            )
        self._engine: AdminBackend = backend
        self._boxes: MailboxBackend = backend

    # -- turns -------------------------------------------------------------------------

    async def release(self, key: str | int, *, by: str = "an operator") -> Released:
        """End ``key``'s turn now (see ``AdminBackend.force_release``); log a WARNING that
        names the key, the fence ended and ``by`` whom."""
        name = normalize_key(key)
        done = await self._engine.force_release(name)
        if done.released:
            logger.warning(
                "inturn: forced release of key %r (fence %s, holder %s) by %s; next: %s",
                shown(name),
                "unknown" if done.fence is None else done.fence,
                done.holder or "unknown",
                by,
                _next(done),
                extra={"inturn_key": shown(name), "inturn_fence": done.fence},
            )
        return done

    # -- dead letters ------------------------------------------------------------------

    async def mailboxes(self) -> dict[str, int]:
        """Mailbox names with dead letters, and how many each."""
        return await self._engine.dead_mailboxes()

    async def letters(
        self,
        *,
        mailbox: str | None = None,
        key: str | int | None = None,
        ids: Collection[str] = (),
        limit: int = LIST_LIMIT,
    ) -> list[Letter]:
        """Dead letters, oldest first per mailbox (mailboxes by name): of one ``mailbox``,
        for one ``key``, with these ``ids``, or all of them; at most ``limit`` per mailbox."""
        wanted_key = None if key is None else normalize_key(key)
        names = [mailbox] if mailbox is not None else sorted(await self.mailboxes())
        found: list[Letter] = []
        for name in names:
            for text in await self._boxes.mb_dead_letters(name, limit):
                letter = _read(name, text)
                if wanted_key is not None and letter.key != wanted_key:
                    continue
                if ids and letter.id not in ids:
                    continue
                found.append(letter)
        return found

    async def replay(self, letters: list[Letter]) -> list[Letter]:
        """Put ``letters`` back in their keys' mailbox queues, each key's in the order they
        were first submitted, and drop them from the dead letters; returns those replayed
        (an unreadable letter stays where it is).

        They go to the queue's tail with their attempts counted afresh: a live drainer
        takes them next; otherwise a process with the mailbox's handler does, at its next
        sweep or the key's next message. With a message id, dedup still applies: a failed
        message was never marked done, so it runs. Each letter is taken out of the dead
        letters before it is stored (two replays at once store it once); a store that
        fails puts it back.
        """
        replayed: list[Letter] = []
        for letter in sorted(letters, key=lambda x: (x.mailbox, x.key or "", x.enqueued_at or 0)):
            message = letter.message()
            if message is None or letter.key is None:
                continue
            # Taken out first: of two replays at once, only the one that removed it stores it.
            if not await self._engine.mb_dead_remove(letter.mailbox, [letter.text]):
                continue
            try:
                done = await self._boxes.mb_submit(
                    letter.mailbox,
                    letter.key,
                    message,
                    max_pending=_NO_LIMIT,
                    drop_oldest=False,
                    token=new_token(),
                    lease=_REPLAY_LEASE,
                )
                if done.status == SubmitStatus.DRAINER:
                    await self._boxes.mb_hint(letter.mailbox, letter.key, True)
            except BaseException:
                await asyncio.shield(self._boxes.mb_dead(letter.mailbox, [letter.text]))
                raise
            replayed.append(letter)
        return replayed

    async def purge(self, letters: list[Letter]) -> int:
        """Delete ``letters`` for good; returns how many were still there."""
        removed = 0
        for mailbox in sorted({x.mailbox for x in letters}):
            texts = [x.text for x in letters if x.mailbox == mailbox]
            removed += await self._engine.mb_dead_remove(mailbox, texts)
        return removed

    # -- keys and housekeeping ---------------------------------------------------------

    async def forget(self, key: str | int, *, force: bool = False) -> Forgotten:
        """Delete everything kept for ``key`` in the namespace (see ``AdminBackend.forget``),
        its dead letters too. Raises :class:`~inturn.Busy` while the key is at work,
        unless ``force``."""
        name = normalize_key(key)
        done = await self._engine.forget(name, force=force)
        dead = await self.purge(await self.letters(key=name))
        if done.total or dead:
            logger.info("inturn: forgot key %r (%d records)", shown(name), done.total + dead)
        return replace(done, dead_letters=dead)

    async def sweep(self) -> SweepReport:
        """Drop expired state, count queues nobody drains (see ``AdminBackend.sweep``)."""
        return await self._engine.sweep()


def _next(done: Released) -> str:
    if done.next_holder is None and done.next_fence is None:
        return "the next waiter, if any"
    return f"{done.next_holder or 'a waiter'} (fence {done.next_fence})"


if TYPE_CHECKING:  # mypy checks that every engine keeps the operators' contract
    from ._backends.memory import MemoryBackend
    from ._backends.postgres import PostgresBackend
    from ._backends.redis import RedisBackend

    def _conforms(
        m: MemoryBackend, r: RedisBackend, p: PostgresBackend
    ) -> tuple[AdminBackend, AdminBackend, AdminBackend]:
        return m, r, p
