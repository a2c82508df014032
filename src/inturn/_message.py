"""A mailbox's messages: what a handler gets, what a dead letter keeps, how both are stored.

The stored envelope (a JSON object) is known here only: engines keep it as
opaque text, and the retry time lives beside it, not inside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["DeadLetter", "Message", "PendingCounter", "dead_letter", "envelope"]


class PendingCounter(Protocol):
    """Counts a key's waiting messages (the mailbox a message came from)."""

    async def pending(self, key: str | int) -> int:
        """Messages waiting in ``key``'s queue."""
        ...

    def pending_sync(self, key: str | int) -> int:
        """The thread twin of :meth:`pending`."""
        ...


@dataclass(frozen=True, slots=True)
class Message:
    """One delivered message.

    ``key`` is the key's normal form (a ``str``); ``payload`` the JSON value
    submitted; ``enqueued_at`` the submit time (``time.time()``); ``attempt``
    counts deliveries after failures (1 the first time); ``fence`` is the fence
    of the turn the handler runs in.
    """

    key: str
    id: str | None
    payload: Any
    enqueued_at: float
    attempt: int
    fence: int
    _mailbox: PendingCounter = field(repr=False, compare=False)

    async def pending(self) -> int:
        """How many newer messages for this key wait behind this one (or this batch)."""
        return await self._mailbox.pending(self.key)

    def pending_sync(self) -> int:
        """The thread twin of :meth:`pending` (for a sync handler)."""
        return self._mailbox.pending_sync(self.key)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that failed ``max_attempts`` times, with the last error."""

    key: str
    id: str | None
    payload: Any
    enqueued_at: float
    attempts: int
    error: str
    failed_at: float


def envelope(key: str, tag: str, id: str | None, payload: Any, at: float) -> str:
    """The stored text of a message: key, a unique tag, id, payload, time, attempts."""
    return json.dumps({"k": key, "g": tag, "i": id, "p": payload, "t": at, "a": 0})


def dead_letter(text: str) -> DeadLetter:
    d = json.loads(text)
    m = d["m"]
    return DeadLetter(
        key=m["k"],
        id=m["i"],
        payload=m["p"],
        enqueued_at=m["t"],
        attempts=d["n"],
        error=d["e"],
        failed_at=d["at"],
    )
