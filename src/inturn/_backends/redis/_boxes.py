"""The mailbox operations of the Redis backend's two twins, side by side.

Each is one script (KEYS and ARGV built by :class:`~._shared.Scripts`) or one
command on the keys of one (mailbox, user); see ``MailboxBackend`` for what
they promise and :mod:`._lua` for the scripts. The retry time a drainer
passes to ``mb_retry`` is kept in a key of its own beside the queue, never
inside a message: the engine does not parse messages.

The per-message scripts (submit, take, release-and-take) are sent *held*: at
the end of the loop step, in one write with the calls of the other drains
and submits of that step (a drainer's JOIN sent then joins it too): under
load one send and one server read carry several messages' calls; on a quiet
loop a call waits one loop step more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

from inturn._backends.base import Grant, ResumeStatus, SubmitStatus, Submitted, Taken

from ._nodes import SyncNodeMuxes
from ._shared import (
    Call,
    Lines,
    LoopState,
    ProcessChannel,
    Scripts,
    text,
    wake,
)

__all__ = ["Mailboxes", "SyncMailboxes"]


# -- replies --------------------------------------------------------------------------


def decode_taken(reply: Sequence[Any]) -> Taken:
    status = int(reply[0])
    if status == 1:
        return Taken(messages=tuple(text(m) for m in reply[1:]))
    if status == 2:
        return Taken(retry_in=float(text(reply[1])))
    return Taken(lost_role=status == -1)


def with_turn(taken: Taken, fence: Any, sent: float) -> Taken:
    """``taken`` with the turn a script granted along with it (``fence``: nil if none)."""
    if fence is None:
        return taken
    return dataclasses.replace(taken, turn=Grant(int(fence), sent))


def decode_submitted(reply: Sequence[Any], sent: float) -> Submitted:
    """MB_SUBMIT's reply; ``sent``: when the call left (the lease of a granted turn)."""
    first = None
    if len(reply) > 2:
        first = with_turn(decode_taken(reply[2]), reply[3], sent)
    return Submitted(SubmitStatus(int(reply[0])), int(reply[1]), first)


def decode_taken_turn(reply: Sequence[Any], turn: object, sent: float) -> Taken:
    """MB_TAKE's reply: the batch alone, or (when ``turn`` asked) the batch and the fence."""
    if turn is None:
        return decode_taken(reply)
    return with_turn(decode_taken(reply[0]), reply[1], sent)


def decode_released_taken(reply: Sequence[Any], sent: float) -> Taken:
    """MB_RELEASE_TAKE's batch, with the turn it kept for the drainer if it did."""
    return with_turn(decode_taken(reply[0]), reply[3] if len(reply) > 3 else None, sent)


def decode_resume(reply: Any) -> ResumeStatus:
    return ResumeStatus(int(reply))


class Mailboxes:
    """The mailbox face of :class:`RedisBackend` (``MailboxBackend``)."""

    _process: ProcessChannel

    def _state(self) -> LoopState:
        raise NotImplementedError

    def _calling(
        self, what: str, state: LoopState | None = None
    ) -> contextlib.AbstractAsyncContextManager[LoopState]:
        raise NotImplementedError

    async def _script(
        self,
        call: Call,
        key: str,
        state: LoopState | None = None,
        *,
        durable: bool = False,
        hold: bool = False,
    ) -> Any:
        raise NotImplementedError

    async def mb_submit(
        self,
        name: str,
        key: str,
        message: str,
        *,
        max_pending: int,
        drop_oldest: bool,
        token: str,
        lease: float,
        take: int = 0,
        turn: tuple[str, float] | None = None,
    ) -> Submitted:
        """See :meth:`MailboxBackend.mb_submit`; with ``take``, a new drainer's first take
        comes in the same round trip, and with ``turn`` the key's turn if it is free."""
        state = self._state()
        call = state.calls.mb_submit(
            name,
            key,
            message,
            max_pending=max_pending,
            drop_oldest=drop_oldest,
            token=token,
            lease=lease,
            take=take,
            turn=turn,
        )
        sent = time.monotonic()
        reply = await self._script(call, key, state, durable=True, hold=True)
        return decode_submitted(reply, sent)

    async def mb_take(
        self,
        name: str,
        key: str,
        token: str,
        *,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Taken:
        state = self._state()
        call = state.calls.mb_take(name, key, token, limit, lease, ack, turn)
        sent = time.monotonic()
        return decode_taken_turn(await self._script(call, key, state, hold=True), turn, sent)

    async def mb_release_take(
        self,
        name: str,
        key: str,
        token: str,
        turn_token: str,
        *,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Taken:
        """Release the key's turn held by ``turn_token`` and take the next batch, in one
        round trip; with ``turn``, keep the turn for the next batch when nobody waits.
        A message then costs its submit and this: the submit took the turn too.

        A waiter of this loop that the script handed the turn to is woken at once
        (the push that follows finds it granted already)."""
        state = self._state()
        call = state.calls.mb_release_take(name, key, token, turn_token, limit, lease, ack, turn)
        sent = time.monotonic()
        reply = await self._script(call, key, state, hold=True)
        woken = self._process.handed_off(reply, state, sent)
        if woken is not None:
            wake(woken)
        return decode_released_taken(reply, sent)

    async def mb_done(self, name: str, key: str, token: str) -> None:
        await self.mb_retry(name, key, token, [], not_before=0.0)

    async def mb_retry(
        self, name: str, key: str, token: str, messages: list[str], *, not_before: float
    ) -> None:
        """See :meth:`MailboxBackend.mb_retry`: ``not_before`` is kept in a key of its own
        beside the queue, deleted when the retried head is taken or the queue empties."""
        state = self._state()
        await self._script(state.calls.mb_retry(name, key, token, messages, not_before), key, state)

    async def mb_resume(self, name: str, key: str, token: str, *, lease: float) -> ResumeStatus:
        state = self._state()
        return decode_resume(
            await self._script(state.calls.mb_resume(name, key, token, lease), key, state)
        )

    async def mb_renew(self, name: str, key: str, token: str, *, lease: float) -> bool:
        state = self._state()
        return bool(await self._script(state.calls.mb_renew(name, key, token, lease), key, state))

    async def mb_pending(self, name: str, key: str) -> int:
        queue = self._process.keys.mailbox_keys(name, key)[0]
        async with self._calling("mb_pending") as state:
            return int(await state.client.llen(queue))

    async def mb_draining(self, name: str, key: str) -> bool:
        role = self._process.keys.mailbox_keys(name, key)[2]
        async with self._calling("mb_draining") as state:
            return bool(await state.client.exists(role))

    async def mb_hint(self, name: str, key: str, present: bool) -> None:
        """A key's hint is added by MB_SUBMIT and dropped by the take that empties its
        queue, in the same scripts (on a Cluster too: in its slot's hint set). Left to do:
        drop the hint of a queue found empty by the sweeper."""
        if present:
            return
        async with self._calling("mb_hint") as state:
            await state.client.srem(state.calls.hint_set(name, key), key)
            if state.calls.cluster:  # and from the single set an older version kept
                await state.client.srem(self._process.keys.mailbox_index(name)[0], key)

    async def mb_hinted(self, name: str) -> list[str]:
        """The members of every hint set of ``name`` (on a Cluster, one per slot: read in
        one pipeline per node)."""
        async with self._calling("mb_hinted") as state:
            sets = state.calls.hint_sets(name)
            if len(sets) == 1:
                return sorted(text(k) for k in await state.client.smembers(sets[0]))
            if state.nodes is not None:  # a Cluster: one call per master, and the old set
                found = await state.nodes.members(sets[:-1])
                found += await state.client.smembers(sets[-1])
                return sorted({text(k) for k in found})
            pipe = state.client.pipeline()
            for hint in sets:
                pipe.smembers(hint)
            replies = await pipe.execute()
        return sorted({text(k) for members in replies for k in members})

    async def mb_dead(self, name: str, entries: list[str]) -> None:
        """See ``MailboxBackend.mb_dead``: each letter once, if sent again (``MB_DEAD``)."""
        state = self._state()
        call = state.calls.mb_dead(name, entries)
        await self._script(call, call[1][0], state)

    async def mb_dead_letters(self, name: str, limit: int) -> list[str]:
        dead = self._process.keys.mailbox_index(name)[1]
        async with self._calling("mb_dead_letters") as state:
            return [text(e) for e in await state.client.lrange(dead, 0, limit - 1)]


class SyncMailboxes:
    """The mailbox face of :class:`SyncRedisBackend` (``SyncMailboxBackend``)."""

    _process: ProcessChannel
    _client: Any
    _calls: Scripts
    _lock: threading.Lock
    _line: Lines
    _nodes: SyncNodeMuxes | None

    def _script(self, call: Call, key: str, *, durable: bool = False) -> Any:
        raise NotImplementedError

    def _calling(self, what: str) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def mb_submit(
        self,
        name: str,
        key: str,
        message: str,
        *,
        max_pending: int,
        drop_oldest: bool,
        token: str,
        lease: float,
        take: int = 0,
        turn: tuple[str, float] | None = None,
    ) -> Submitted:
        call = self._calls.mb_submit(
            name,
            key,
            message,
            max_pending=max_pending,
            drop_oldest=drop_oldest,
            token=token,
            lease=lease,
            take=take,
            turn=turn,
        )
        sent = time.monotonic()
        return decode_submitted(self._script(call, key, durable=True), sent)

    def mb_take(
        self,
        name: str,
        key: str,
        token: str,
        *,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Taken:
        call = self._calls.mb_take(name, key, token, limit, lease, ack, turn)
        sent = time.monotonic()
        return decode_taken_turn(self._script(call, key), turn, sent)

    def mb_release_take(
        self,
        name: str,
        key: str,
        token: str,
        turn_token: str,
        *,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Taken:
        """Release the turn and take the next batch in one script (see RedisBackend's).

        The turn goes to the first live waiter in the server's line, never by a
        hand-over decided here, so the script needs no confirmation and the
        line's order kept here does not matter; a thread of ours that got the
        turn is woken at once, under the lock, as a push would wake it."""
        call = self._calls.mb_release_take(name, key, token, turn_token, limit, lease, ack, turn)
        sent = time.monotonic()
        reply = self._script(call, key)
        with self._lock:
            woken = self._process.handed_off(reply, self._line, sent)
        if woken is not None:
            wake(woken)
        return decode_released_taken(reply, sent)

    def mb_done(self, name: str, key: str, token: str) -> None:
        self.mb_retry(name, key, token, [], not_before=0.0)

    def mb_retry(
        self, name: str, key: str, token: str, messages: list[str], *, not_before: float
    ) -> None:
        self._script(self._calls.mb_retry(name, key, token, messages, not_before), key)

    def mb_resume(self, name: str, key: str, token: str, *, lease: float) -> ResumeStatus:
        return decode_resume(self._script(self._calls.mb_resume(name, key, token, lease), key))

    def mb_renew(self, name: str, key: str, token: str, *, lease: float) -> bool:
        return bool(self._script(self._calls.mb_renew(name, key, token, lease), key))

    def mb_pending(self, name: str, key: str) -> int:
        with self._calling("mb_pending"):
            return int(self._client.llen(self._process.keys.mailbox_keys(name, key)[0]))

    def mb_draining(self, name: str, key: str) -> bool:
        with self._calling("mb_draining"):
            return bool(self._client.exists(self._process.keys.mailbox_keys(name, key)[2]))

    def mb_hint(self, name: str, key: str, present: bool) -> None:
        """See ``Mailboxes.mb_hint``: only a sweeper's drop is left to do."""
        if present:
            return
        with self._calling("mb_hint"):
            self._client.srem(self._calls.hint_set(name, key), key)
            if self._calls.cluster:
                self._client.srem(self._process.keys.mailbox_index(name)[0], key)

    def mb_hinted(self, name: str) -> list[str]:
        """See ``Mailboxes.mb_hinted``."""
        sets = self._calls.hint_sets(name)
        with self._calling("mb_hinted"):
            if len(sets) == 1:
                return sorted(text(k) for k in self._client.smembers(sets[0]))
            if self._nodes is not None:  # a Cluster: one call per master, and the old set
                found = self._nodes.members(sets[:-1])
                found += self._client.smembers(sets[-1])
                return sorted({text(k) for k in found})
            pipe = self._client.pipeline()
            for hint in sets:
                pipe.smembers(hint)
            replies = pipe.execute()
        return sorted({text(k) for members in replies for k in members})

    def mb_dead(self, name: str, entries: list[str]) -> None:
        """See ``SyncMailboxBackend.mb_dead``: each letter once, if sent again (``MB_DEAD``)."""
        call = self._calls.mb_dead(name, entries)
        self._script(call, call[1][0])

    def mb_dead_letters(self, name: str, limit: int) -> list[str]:
        dead = self._process.keys.mailbox_index(name)[1]
        with self._calling("mb_dead_letters"):
            return [text(e) for e in self._client.lrange(dead, 0, limit - 1)]
