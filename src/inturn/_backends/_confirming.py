"""A grant's confirmation that a backend may have left unread, and how to ask for it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Confirming"]


class Confirming(asyncio.Future[bool]):
    """An asyncio confirmation (see ``Grant.confirmed``) whose answer may have arrived
    unread (a backend that reads lazy replies late): :meth:`hurry` has it read now."""

    def __init__(self, loop: asyncio.AbstractEventLoop, hurry: Callable[[], None]) -> None:
        super().__init__(loop=loop)
        self._hurry = hurry

    def hurry(self) -> None:
        """Read the answer now if it has come (the future is then done)."""
        self._hurry()
