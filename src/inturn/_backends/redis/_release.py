"""The Redis backend's release (async), with its in-process hand-over.

A release whose next waiter in line is one of this event loop's own (and
nobody from elsewhere is ahead of it) starts that waiter at once, with the
next fence, and does not await RELEASE's reply: the script confirms exactly
that grant (or refuses it, and then the new holder is told). Any other
release awaits its reply, and wakes the waiter of ours it chose, if any.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from inturn._backends._confirming import Confirming
from inturn._backends.base import Grant
from inturn._errors import BackendUnavailable

from ._shared import SHAS, LoopState, ProcessChannel, after_release, confirm, hand_over, ms, wake

__all__ = ["Releases"]

logger = logging.getLogger("inturn")


class Releases:
    """The release face of :class:`RedisBackend`."""

    _process: ProcessChannel

    def _state(self) -> LoopState:
        raise NotImplementedError

    async def _run(
        self,
        state: LoopState,
        name: str,
        key: str,
        args: list[Any],
        keys: list[str] | None = None,
    ) -> Any:
        raise NotImplementedError

    async def _release_after_close(self, key: str, token: str) -> None:
        raise NotImplementedError

    async def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        try:
            state = self._state()
        except BackendUnavailable:  # closed on this loop (``_state``): held across aclose()
            await self._release_after_close(key, token)
            return
        sent = time.monotonic()
        args: list[Any] = [token]
        handed: Grant | None = None
        keys = state.calls.turn_keys(key)
        mux = state.mux if state.nodes is None else state.nodes.connected(keys)
        if mux is not None:
            mux.catch_up()  # the line as the replies that came tell it
        solo = state.next_solo(key) if fence is not None and mux is not None else None
        if fence is not None and solo is not None and mux is not None:
            # Our own first waiter, with nobody from elsewhere ahead of it: start it now,
            # with the next fence; the script confirms exactly this grant.
            confirmed = Confirming(asyncio.get_running_loop(), mux)
            handed = hand_over(solo, fence, sent, confirmed)
            args += [solo[0], ms(solo[1].lease)]
            # Not awaited, and sent at the end of this loop step: the woken waiter starts
            # first, and our next command (a JOIN, often) leaves in the same write. The
            # reply only confirms the grant, or refuses it, and then the new holder is told;
            # it is lazy: it need not wake the loop (and so end the new holder's sleep late).
            then = partial(self._handed_over, state, key, args, handed)
            confirming = mux.submit(SHAS["release"][0], keys, args, hold=True, then=then, lazy=True)
            if confirming is not None:
                return
        try:
            reply = await self._run(state, "release", key, args, keys)
        except BaseException:
            if handed is not None:
                confirm(handed, None)  # unknown: the new holder's renewal will tell
            raise
        self._released(state, reply, args, handed, sent)

    def _released(
        self,
        state: LoopState,
        reply: Sequence[Any],
        args: list[Any],
        handed: Grant | None,
        sent: float,
    ) -> None:
        granted = after_release(self._process, state, reply, args, handed, sent)
        if granted is not None:
            wake(granted)

    def _handed_over(
        self,
        state: LoopState,
        key: str,
        args: list[Any],
        handed: Grant,
        reply: asyncio.Future[Any],
    ) -> None:
        """The reply of a RELEASE that was not awaited."""
        if not reply.cancelled() and reply.exception() is None:
            self._released(state, reply.result(), args, handed, handed.granted_at)
            return
        # NOSCRIPT, or the connection dropped: again, with the EVAL fallback and the retries
        # (a RELEASE that ran already confirms its grant again).
        task = asyncio.ensure_future(self._release_again(state, key, args, handed))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    async def _release_again(
        self, state: LoopState, key: str, args: list[Any], handed: Grant
    ) -> None:
        try:
            reply = await self._run(state, "release", key, args)
        except Exception as exc:
            confirm(handed, None)
            logger.warning("inturn: release of key %r failed (%r); its lease will lapse", key, exc)
            return
        self._released(state, reply, args, handed, handed.granted_at)
