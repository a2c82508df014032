"""A grant's confirmation that a backend may have left unread, and how to ask for it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Confirming"]


class Confirming(asyncio.Future[bool]):
    """An asyncio confirmation (see ``Grant.confirmed``) whose answer may have arrived
    unread (a backend that reads lazy replies late): :meth:`hurry` has it read now.

    ``catch_up`` takes in what has arrived; ``wake`` has the backend read as the bytes
    come again (the answer is awaited now, and may still be on its way).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        catch_up: Callable[[], None],
        wake: Callable[[], None],
    ) -> None:
        super().__init__(loop=loop)
        self._catch_up = catch_up
        self._wake = wake

    def hurry(self) -> None:
        """Read the answer now if it has come (the future is then done); if it has not,
        read it as soon as it comes."""
        self._catch_up()
        if not self.done():
            self._wake()
