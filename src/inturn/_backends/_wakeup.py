"""A waiter's wake-up signal that works from any thread, for a coroutine or a thread.

The in-memory and PostgreSQL backends keep process-local lines whose waiters
may sit in any event loop or thread of the process; whoever hands a waiter the
turn calls :meth:`Wakeup.wake` from wherever it runs, and a backend that is
closed calls :meth:`Wakeup.close` on the waiters it served.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from inturn._errors import BackendUnavailable

__all__ = [
    "Wakeup",
    "closed_for_threads",
    "closed_on_loop",
    "closed_while_waiting",
    "raise_if_closing",
]


def closed_while_waiting(key: str) -> BackendUnavailable:
    """What a turn still waiting in line gets when its gate is closed (every backend)."""
    return BackendUnavailable(
        f"the gate was closed while this request waited in line for key {key!r}",
        transient=False,
    )


def closed_on_loop(engine: str) -> BackendUnavailable:
    """A call on an event loop the ``engine`` backend was closed on (it would otherwise
    open connections that nobody closes)."""
    return BackendUnavailable(
        f"the {engine} backend was closed on this event loop (gate.aclose(), or the loop is "
        "shutting down)",
        transient=False,
    )


def closed_for_threads(engine: str) -> BackendUnavailable:
    """A thread's call after the ``engine`` backend's threads' side was closed."""
    return BackendUnavailable(
        f"the {engine} backend was closed for threads (gate.close() or gate.aclose())",
        transient=False,
    )


def raise_if_closing(
    exc: Exception, closing: bool, closed: Callable[[], BackendUnavailable]
) -> None:
    """Raise ``closed()`` (chained to ``exc``) for a call that failed once closing had
    begun: the close cut its connection, and what that made the client library raise
    (a dropped socket can surface as a TypeError from deep in a parser) is not the
    caller's to read. A closed error already raised passes unchanged."""
    if closing and not (isinstance(exc, BackendUnavailable) and not exc.transient):
        raise closed() from exc


class Wakeup:
    """Wakes one waiter: an :class:`asyncio.Future` on its loop, or a ``threading.Event``.

    Made in the waiter's own loop (``sync=False``) or thread (``sync=True``).
    A wake before the sleep is not lost; :meth:`rearm` forgets one already
    consumed.
    """

    __slots__ = ("_event", "_future", "_loop", "closed")

    def __init__(self, *, sync: bool) -> None:
        self._event: threading.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._future: asyncio.Future[None] | None = None
        self.closed = False
        """Set by :meth:`close`: the backend that served this waiter was closed."""
        if sync:
            self._event = threading.Event()
        else:
            self._loop = asyncio.get_running_loop()
            self._future = self._loop.create_future()

    def wake(self) -> None:
        """Wake the waiter, from any thread."""
        if self._event is not None:
            self._event.set()
            return
        assert self._loop is not None
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._resolve()
        else:
            with contextlib.suppress(RuntimeError):  # a closed loop: its waiter is gone
                self._loop.call_soon_threadsafe(self._resolve)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the waiter sleeps in (None for a thread)."""
        return self._loop

    def close(self) -> None:
        """The backend was closed: mark the waiter and wake it (from any thread)."""
        self.closed = True
        self.wake()

    def rearm(self) -> None:
        """Forget a wake-up already consumed."""
        if self._event is not None:
            self._event.clear()
        elif self._future is not None and self._future.done():
            assert self._loop is not None
            self._future = self._loop.create_future()

    def _resolve(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def sleep(self, seconds: float | None) -> None:
        """Sleep until woken or ``seconds`` passed (None: no limit)."""
        assert self._future is not None
        if not self._future.done():
            # asyncio.wait does not cancel the future on timeout or cancellation.
            await asyncio.wait((self._future,), timeout=seconds)

    def sleep_sync(self, seconds: float | None) -> None:
        assert self._event is not None
        self._event.wait(seconds)
