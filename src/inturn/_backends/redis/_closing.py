"""What closing a Redis backend does to the turns still waiting in line.

Closing (``gate.aclose()`` on an event loop, ``gate.close()`` for threads) takes
each waiter it served out of its key's line on the server (``LEAVE``) before
the connections go, so waiters of other processes move up now rather than when
the dead waiter's liveness mark lapses. A grant that raced in for a waiter is
released: its wait raises instead of returning it, so nobody will hold it. The
whole is bounded (:data:`LEAVE_BOUND`); what does not fit lapses on the server.

A turn *held* across the close still releases when its block exits: on a
connection of its own, closed right after (:func:`release_after_close`), so the
next waiter gets the turn then, not when the lease runs out.

A call already under way when the close begins fails with the closed error, not
with whatever the cut connection made redis-py raise; one through the client's own
connections (:func:`client_call` on an event loop, :class:`SharedClient` for
threads) is counted, so that a connection it took or made as the close ran is
closed when the last of them ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from typing import Any

from inturn._backends._wakeup import closed_for_threads, closed_on_loop, raise_if_closing

from ._errors import map_errors
from ._shared import SCRIPTS, LoopState, Scripts, Waiter
from ._urls import aclose_client, close_client

__all__ = [
    "CLOSED_FOR_THREADS",
    "CLOSED_ON_LOOP",
    "LEAVE_BOUND",
    "SharedClient",
    "client_call",
    "leave_at_close",
    "leave_at_close_sync",
    "release_after_close",
    "release_after_close_sync",
]

logger = logging.getLogger("inturn")

LEAVE_BOUND = 0.5
"""Longest time (seconds) closing spends taking its waiters out of their lines."""
CLOSED_ON_LOOP = partial(closed_on_loop, "Redis")
"""The error of a call on an event loop the backend was closed on."""
CLOSED_FOR_THREADS = partial(closed_for_threads, "Redis")
"""The error of a thread's call once the threads' side was closed."""


def _pending(waiters: dict[str, Waiter]) -> list[tuple[str, Waiter, bool]]:
    """Snapshot: (token, waiter, whether its JOIN's reply had come). A waiter whose JOIN
    is still in flight may be granted by that JOIN: its caller then holds the turn, so a
    grant found for it is not released."""
    return [(token, w, w.alive_until > 0.0) for token, w in list(waiters.items())]


async def leave_at_close(
    waiters: dict[str, Waiter], run: Callable[[str, str, list[Any]], Awaitable[Any]]
) -> None:
    """LEAVE every waiter (``run(script, key, args)``), at most LEAVE_BOUND seconds."""
    pending = _pending(waiters)
    if not pending:
        return

    async def leave(token: str, waiter: Waiter, joined: bool) -> None:
        reply = await run("leave", waiter.key, [token])
        if reply[0] == 1 and joined:
            await run("release", waiter.key, [token])

    try:
        async with asyncio.timeout(LEAVE_BOUND):
            done = await asyncio.gather(*(leave(*p) for p in pending), return_exceptions=True)
    except TimeoutError:
        done = [TimeoutError("no answer")]
    failed = [d for d in done if isinstance(d, BaseException)]
    if failed:
        logger.debug("inturn: closing could not take waiters out of their lines: %r", failed[0])


def leave_at_close_sync(
    waiters: dict[str, Waiter], run: Callable[[str, str, list[Any], float], Any]
) -> None:
    """The thread twin: ``run(script, key, args, timeout)``, one after another, at most
    LEAVE_BOUND seconds in all (a thread cannot wait for its calls together)."""
    until = time.monotonic() + LEAVE_BOUND
    for token, waiter, joined in _pending(waiters):
        left = until - time.monotonic()
        if left <= 0:
            logger.debug("inturn: closing left some waiters in their lines (out of time)")
            return
        try:
            reply = run("leave", waiter.key, [token], left)
            if reply[0] == 1 and joined:
                run("release", waiter.key, [token], max(0.05, until - time.monotonic()))
        except Exception as exc:
            logger.debug("inturn: closing could not take a waiter out of its line: %r", exc)
            return


async def release_after_close(
    client: Any, *, owned: bool, calls: Scripts, key: str, token: str
) -> None:
    """Release ``token``'s turn after the backend was closed on this event loop: one
    plain RELEASE through ``client`` (a redis-py asyncio client; ``owned``: made for this
    call, and closed after it). The script hands the turn on as any release does."""
    try:
        with map_errors("release"):
            await client.register_script(SCRIPTS["release"])(
                keys=calls.turn_keys(key), args=[token]
            )
    finally:
        if owned:
            await aclose_client(client)


def release_after_close_sync(
    client: Any, *, owned: bool, calls: Scripts, key: str, token: str, leave: bool = False
) -> None:
    """The thread twin of :func:`release_after_close`: ``client`` is the closed twin's
    own (``owned``: its connections are closed again after the call). With ``leave``,
    take the token out of the key's line first, and release only a grant that found it.

    Leaving serves a thread whose JOIN was on its way while the twin closed: closing's
    own LEAVE may have reached the server before that JOIN, which then put the token
    in line, where nobody waits for it any more."""
    keys = calls.turn_keys(key)
    try:
        with map_errors("leave" if leave else "release"):
            if leave and client.register_script(SCRIPTS["leave"])(keys=keys, args=[token])[0] != 1:
                return  # not in line, or left now: nothing held
            client.register_script(SCRIPTS["release"])(keys=keys, args=[token])
    finally:
        if owned:
            close_client(client)


@contextlib.asynccontextmanager
async def client_call(state: LoopState, what: str, *, owned: bool) -> AsyncIterator[LoopState]:
    """:func:`map_errors` for a call through a loop's redis-py client (not its pipelined
    connection), and the ``aclose()`` it may race.

    Begun before the close and failed after it, the call raises the closed error. A
    connection it took or made anew once the close had closed the client's would stay
    open: the last such call to end closes the client again (``owned``: made here).
    """
    state.client_calls += 1
    try:
        with map_errors(what):
            yield state
    except Exception as exc:
        raise_if_closing(exc, state.closing, CLOSED_ON_LOOP)
        raise
    finally:
        state.client_calls -= 1
        if state.closed and owned and not state.client_calls:
            with contextlib.suppress(Exception):
                await aclose_client(state.client)


class SharedClient:
    """A sync twin's redis-py client, shared by its threads (the calls that do not go
    through its SyncMux), and closing it under them.

    Once the twin is ``closing()``, a call is refused; one begun before and failed
    after raises the closed error (see :func:`raise_if_closing`). A connection that a
    call took or made anew after :meth:`close` closed the client's would stay open:
    the last such call to end closes them again (``owned``: the client was made here).
    """

    def __init__(self, client: Any, *, owned: bool, closing: Callable[[], bool]) -> None:
        self._client = client
        self._owned = owned
        self._closing = closing
        self._lock = threading.Lock()
        """Guards the two below; one release after close at a time (each closes the
        client's connections again)."""
        self._calls = 0
        self._closed = False

    @contextlib.contextmanager
    def calling(self, what: str) -> Iterator[None]:
        """:func:`map_errors` for a call through the client, and the close it may race."""
        if self._closing():
            raise CLOSED_FOR_THREADS()
        with self._lock:
            self._calls += 1
        try:
            with map_errors(what):
                yield
        except Exception as exc:
            raise_if_closing(exc, self._closing(), CLOSED_FOR_THREADS)
            raise
        finally:
            with self._lock:
                self._calls -= 1
                if self._closed and not self._calls:
                    with contextlib.suppress(Exception):
                        close_client(self._client)

    def release_after_close(self, calls: Scripts, key: str, token: str, *, leave: bool) -> None:
        """:func:`release_after_close_sync` through this client, one at a time."""
        with self._lock:
            release_after_close_sync(
                self._client, owned=self._owned, calls=calls, key=key, token=token, leave=leave
            )

    def close(self) -> None:
        """Close the client's connections, if they are ours (not under a call)."""
        if self._owned:
            with self._lock:
                self._closed = True
                close_client(self._client)
