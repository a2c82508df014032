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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ._errors import map_errors
from ._shared import SCRIPTS, Scripts, Waiter
from ._urls import aclose_client, close_client

__all__ = [
    "LEAVE_BOUND",
    "leave_at_close",
    "leave_at_close_sync",
    "release_after_close",
    "release_after_close_sync",
]

logger = logging.getLogger("inturn")

LEAVE_BOUND = 0.5
"""Longest time (seconds) closing spends taking its waiters out of their lines."""


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
