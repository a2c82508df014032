"""The turns' share of a pool, handed out in FIFO order, and how long a wait for a connection
goes between checks that the server still answers.

A turn keeps its connection for as long as it holds or heads a key's line; a pooled
statement (a dedup mark, a mailbox step, an audit row) keeps one for a round trip. If turns
could take every connection, holders whose bodies need a pooled statement would wait for
each other forever; so turns share ``max_connections`` minus a reserve (:func:`turn_share`),
and a turn that finds the share taken waits in line for it: :class:`AsyncSlots` on an event
loop (one per loop, like its pool), :class:`SyncSlots` for threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from ._steps import Exhausted
from ._urls import CONNECT_TIMEOUT

__all__ = ["CHECKS", "HEALTHY_FOR", "AsyncSlots", "SyncSlots", "checks", "left", "turn_share"]

CHECKS = (0.25, 0.5, 1.0, 2.0, CONNECT_TIMEOUT)
"""Seconds between checks that the server answers, while a call waits for a connection (the
last repeats): a server that went away is reported within a fraction of a second, a busy
pool is waited for."""
HEALTHY_FOR = 1.0
"""Seconds a successful check vouches for the server (waiters share it)."""


def turn_share(max_size: int) -> int:
    """How many of a pool's ``max_size`` connections turns may hold at once: all but an
    eighth (at least one), which pooled statements always find."""
    return max(1, max_size - max(1, max_size // 8))


def checks() -> Iterator[float]:
    """The pauses of :data:`CHECKS`, the last one for ever."""
    yield from CHECKS[:-1]
    while True:
        yield CHECKS[-1]


def left(until: float | None) -> float | None:
    """Seconds until ``until`` (None: no limit); raises Exhausted when it has come."""
    if until is None:
        return None
    rest = until - time.monotonic()
    if rest <= 0:
        raise Exhausted
    return rest


class AsyncSlots:
    """The turns' share of one event loop's pool, in FIFO order (used on that loop only)."""

    def __init__(self, size: int) -> None:
        self.free = size
        self.queue: deque[asyncio.Future[None]] = deque()

    def take_now(self) -> bool:
        """Take a slot if one is free and nobody waits for one."""
        if self.free > 0 and not self.queue:
            self.free -= 1
            return True
        return False

    def ticket(self) -> asyncio.Future[None]:
        """A place in line: done when the slot is the caller's (at once if one is free)."""
        ticket = asyncio.get_running_loop().create_future()
        if self.take_now():
            ticket.set_result(None)
        else:
            self.queue.append(ticket)
        return ticket

    def drop(self, ticket: asyncio.Future[None]) -> None:
        """The caller gave up its place: a slot it was handed goes on to the next."""
        if ticket.done() and not ticket.cancelled():
            self.give()
        else:
            ticket.cancel()

    def give(self) -> None:
        """A turn's connection went back: the slot goes to the first in line, or is free."""
        while self.queue:
            ticket = self.queue.popleft()
            if not ticket.done():
                ticket.set_result(None)
                return
        self.free += 1


class SyncSlots:
    """The turns' share of the threads' pool, in FIFO order."""

    def __init__(self, size: int) -> None:
        self.free = size
        self.queue: deque[object] = deque()
        self.cond = threading.Condition()

    def take_now(self) -> bool:
        with self.cond:
            if self.free > 0 and not self.queue:
                self.free -= 1
                return True
            return False

    def take(self, until: float | None, check: Callable[[], None]) -> None:
        """Wait in line for a slot until ``until`` (then Exhausted), calling ``check`` (which
        raises when the server is gone) between waits."""
        ticket = object()
        with self.cond:
            if self.free > 0 and not self.queue:
                self.free -= 1
                return
            self.queue.append(ticket)
        try:
            for pause in checks():
                rest = left(until)
                with self.cond:
                    if self.cond.wait_for(
                        lambda: self.queue[0] is ticket and self.free > 0,
                        pause if rest is None else min(pause, rest),
                    ):
                        self.queue.popleft()
                        self.free -= 1
                        self.cond.notify_all()
                        return
                if rest is None or pause < rest:
                    check()
        finally:
            with self.cond:
                if ticket in self.queue:
                    self.queue.remove(ticket)
                    self.cond.notify_all()

    def give(self) -> None:
        with self.cond:
            self.free += 1
            self.cond.notify_all()
