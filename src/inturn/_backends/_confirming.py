"""A grant's confirmation that a backend may have left unread, and how to ask for it."""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["Confirming", "Reader"]


class Reader(Protocol):
    """Where the answer comes from: a connection that may leave replies unread."""

    def catch_up(self, *, resume: bool = False) -> None:
        """Take in what has arrived; with ``resume``, read as the bytes come again."""
        ...


class Confirming(asyncio.Future[bool]):
    """An asyncio confirmation (see ``Grant.confirmed``) whose answer may have arrived
    unread on ``reader`` (it reads lazy replies late): :meth:`hurry` has it read now."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reader: Reader) -> None:
        super().__init__(loop=loop)
        self._reader = reader

    def hurry(self) -> None:
        """Read the answer now if it has come (the future is then done); if it has not,
        read it as soon as it comes (it is awaited now, and may still be on its way)."""
        self._reader.catch_up()
        if not self.done():
            self._reader.catch_up(resume=True)
