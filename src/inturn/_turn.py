"""The turn: waiting in line, holding with a renewed lease, and leaving cleanly.

This is the policy layer shared by every backend. ``TurnRequest`` (async) and
``SyncTurnRequest`` (threads) are the context managers returned by
``Gate.turn()`` / ``Gate.turn_sync()`` and their ``*_nowait`` twins; both drive
a backend through the same steps, with the arithmetic in :mod:`._policy`:

1. join the key's line (or, nowait, take the turn only if it is free);
2. sleep until woken with a grant, at most until the deadline;
3. hold: renew the lease in the background at a third of the lease, judged
   on the holder's own clock; a lapse sets ``turn.lost`` and logs a WARNING;
4. release, handing the turn to the next waiter in the same atomic step.

Cancellation at any step leaves the line or releases the turn (shielded and
time-bounded), so nobody behind is ever blocked by a caller that went away.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import itertools
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, TypeVar

from ._backends.base import Confirmation, Grant
from ._errors import BackendUnavailable, Busy, LeaseLost, TurnTimeout
from ._policy import Deadline, LeaseClock, OnLost

if TYPE_CHECKING:
    from ._gate import Gate

__all__ = ["SyncTurn", "SyncTurnRequest", "Turn", "TurnRequest", "new_token"]

logger = logging.getLogger("inturn")

T = TypeVar("T")

_RAISE = object()

CLEANUP_TIMEOUT = 5.0
"""Upper bound (seconds) for leaving a line or releasing a turn during cleanup."""
HANDOVER_MARGIN = 0.5
"""Seconds of lease a holder must have left to let the backend start its next waiter at once."""
CONFIRM_WAIT = 2.0
"""How long a release waits for its own early grant to be confirmed (then: a plain release)."""
LEAVE_GRACE = 0.5
"""How long past its deadline a timed-out waiter checks whether it was granted meanwhile."""


@dataclass(frozen=True, slots=True)
class TurnSettings:
    """Per-request lease settings (the gate's defaults unless overridden)."""

    lease: float
    max_hold: float | None
    on_lost: OnLost

    @property
    def first_lease(self) -> float:
        """The lease asked for with the grant: never past ``max_hold``."""
        return self.lease if self.max_hold is None else min(self.lease, self.max_hold)


# -- re-entrancy ---------------------------------------------------------------------
# A task that holds a key's turn and asks for it again gets the same turn. The
# owner is the asyncio task, or the thread when no loop runs in it; child tasks
# and other threads are other owners (they would run beside the holder).

_Owner = weakref.ref[object]
_held: contextvars.ContextVar[Mapping[tuple[int, str], tuple[_Owner, _TurnBase]]] = (
    contextvars.ContextVar("inturn_held", default=MappingProxyType({}))
)


def _current_owner() -> object:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return threading.current_thread()
    task = asyncio.current_task()
    return task if task is not None else threading.current_thread()


def _held_by_me(gate_id: int, key: str) -> _TurnBase | None:
    found = _held.get().get((gate_id, key))
    if found is not None and found[0]() is _current_owner():
        return found[1]
    return None


def _mark_held(gate_id: int, key: str, turn: _TurnBase) -> contextvars.Token[object]:
    held = dict(_held.get())
    held[(gate_id, key)] = (weakref.ref(_current_owner()), turn)
    return _held.set(held)  # type: ignore[return-value]


def _unmark_held(gate_id: int, key: str, token: contextvars.Token[object]) -> None:
    try:
        _held.reset(token)  # type: ignore[arg-type]
    except ValueError:  # exited in another context than entered: drop the entry by hand
        held = dict(_held.get())
        held.pop((gate_id, key), None)
        _held.set(held)


# -- the held turn --------------------------------------------------------------------


class _TurnBase:
    __slots__ = (
        "_clock",
        "_confirmation",
        "_gate",
        "_token",
        "acquired_at",
        "asked_at",
        "fence",
        "joined_at",
        "key",
        "lost_reason",
    )

    def __init__(
        self,
        gate: Gate,
        key: str,
        token: str,
        grant: Grant,
        *,
        asked: tuple[float, float],
        clock: LeaseClock,
    ) -> None:
        self._gate = gate
        self.key = key
        """The key, in its normal form (a ``str``)."""
        self.fence = grant.fence
        """Strictly greater than every earlier grant's fence for this key."""
        self.asked_at, self.joined_at = asked
        """``time.monotonic()`` before the request asked for the turn, and once it was in line.

        FIFO means: a request whose ``joined_at`` precedes another's ``asked_at``
        is granted first (:func:`inturn.testing.check_history` checks exactly that).
        """
        self.acquired_at = time.monotonic()
        """``time.monotonic()`` when the turn was granted to this request."""
        self.lost_reason: str | None = None
        """Why the lease was lost: ``"expired"``, ``"max_hold"`` or ``"taken"``; None while held."""
        self._token = token
        self._clock = clock
        self._confirmation = grant.confirmed
        self._arm()

    @property
    def waited(self) -> float:
        """Seconds from asking to the grant."""
        return self.acquired_at - self.asked_at

    def __repr__(self) -> str:
        state = "held" if self.lost_reason is None else f"lost ({self.lost_reason})"
        return f"<{type(self).__name__} key={self.key!r} fence={self.fence} {state}>"

    def _release_fence(self, lease: float) -> int | None:
        """The fence to release with, letting the backend hand the turn over in-process:
        only while the lease is surely alive and our own grant is confirmed (None: a
        plain release)."""
        confirmation = self._confirmation
        if confirmation is not None and (
            not confirmation.done() or confirmation.cancelled() or not confirmation.result()
        ):
            return None
        if self.lost_reason is None and self._clock.expires_at - time.monotonic() > min(
            HANDOVER_MARGIN, lease / 4
        ):
            return self.fence
        return None

    def _arm(self) -> None:
        """Make ``lost``: an asyncio.Event or a threading.Event, by the subclass."""
        raise NotImplementedError

    def _signal_lost(self) -> None:
        raise NotImplementedError

    def _set_lost(self, reason: str) -> None:
        """Record the loss once: ``lost`` set, a WARNING with key and fence, a metric."""
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        self._signal_lost()
        self._gate.metrics.count("leases_lost", reason=reason)
        logger.warning(
            "inturn: lost the turn of key %r (fence %d): %s",
            self.key,
            self.fence,
            _REASONS[reason],
            extra={"inturn_key": self.key, "inturn_fence": self.fence},
        )


_pool: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None


def _bounded_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Worker threads for deadline-bounded sync calls (made anew after a fork)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        executor = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="inturn-call")
        _pool = (os.getpid(), executor)
    return _pool[1]


class _Tokens:
    """Unique request tokens: 128 random bits per process, then a counter.

    One ``os.urandom`` per process instead of one per request (a syscall costs
    more than the whole in-memory turn); re-seeded after ``fork``.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._prefix = ""
        self._counter = itertools.count()

    def __call__(self) -> str:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._prefix = secrets.token_hex(16)
            self._counter = itertools.count()
        return f"{self._prefix}{next(self._counter):x}"


new_token = _Tokens()


def _log_cleanup_failure(what: str, key: str, exc: BaseException) -> None:
    logger.warning(
        "inturn: could not %s for key %r: %r (the lease will lapse by itself)",
        what,
        key,
        exc,
        extra={"inturn_key": key},
    )


_REASONS = {
    "expired": "the lease ran out before a renewal was confirmed (stalled or unreachable)",
    "max_hold": "max_hold passed, renewal stopped",
    "taken": "the backend says another request holds it now",
}


class Turn(_TurnBase):
    """A held turn of one key (async). Get one from ``async with gate.turn(key) as turn``.

    ``lost`` is an :class:`asyncio.Event` set when the lease is lost; the body
    is not interrupted unless the gate or request says ``on_lost="cancel"``.
    Pass ``fence`` to any sink that can refuse stale writes.
    """

    __slots__ = ("lost",)

    def _arm(self) -> None:
        self.lost = asyncio.Event()
        """Set when the lease is lost."""

    def _signal_lost(self) -> None:
        self.lost.set()

    async def check(self) -> bool:
        """Ask the backend whether this turn is still held (False once lost)."""
        if self.lost_reason is not None:
            return False
        held = await self._gate.backend.is_held(self.key, self._token)
        if not held and self.lost_reason is None:
            self._set_lost("taken")
        return held


class SyncTurn(_TurnBase):
    """A held turn of one key (threads). Get one from ``with gate.turn_sync(key) as turn``.

    ``lost`` is a :class:`threading.Event`. A thread cannot be interrupted, so
    with ``on_lost="cancel"`` the block raises :class:`LeaseLost` when it exits.
    """

    __slots__ = ("lost",)

    def _arm(self) -> None:
        self.lost = threading.Event()
        """Set when the lease is lost."""

    def _signal_lost(self) -> None:
        self.lost.set()

    def check(self) -> bool:
        """Ask the backend whether this turn is still held (False once lost)."""
        if self.lost_reason is not None:
            return False
        held = self._gate.sync_backend.is_held(self.key, self._token)
        if not held:
            self._set_lost("taken")
        return held


# -- async ------------------------------------------------------------------------------


class TurnRequest:
    """``async with`` this to wait for, hold and release a key's turn (from ``Gate.turn``)."""

    __slots__ = (
        "_asked_at",
        "_cancel_sent",
        "_exited",
        "_gate",
        "_handle",
        "_held_token",
        "_joined_at",
        "_key",
        "_nowait",
        "_renewing",
        "_reused",
        "_settings",
        "_task",
        "_timeout",
        "_turn",
        "release_with",
    )

    def __init__(
        self, gate: Gate, key: str, *, timeout: float | None, nowait: bool, settings: TurnSettings
    ) -> None:
        self._gate = gate
        self._key = key
        self._timeout = timeout
        self._nowait = nowait
        self._settings = settings
        self._turn: Turn | None = None
        self.release_with: Callable[[str, str], Awaitable[object]] | None = None
        """Internal: a call that releases the turn (key, token) and does more in the same
        round trip (the mailbox takes its next batch); plain release is its retry."""
        self._reused = False
        self._held_token: contextvars.Token[object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._renewing: asyncio.Task[None] | None = None
        self._task: asyncio.Task[object] | None = None
        self._cancel_sent = False
        self._exited = False
        self._asked_at = self._joined_at = 0.0

    async def __aenter__(self) -> Turn:
        if self._turn is not None:
            raise RuntimeError("a TurnRequest can be entered only once")
        again = _held_by_me(self._gate.id, self._key)
        if isinstance(again, Turn):
            self._reused = True
            self._turn = again
            return again
        token = new_token()
        self._asked_at = time.monotonic()
        grant = await self._acquire(token, Deadline.after(self._timeout, self._asked_at))
        s = self._settings
        clock = LeaseClock.start(lease=s.lease, max_hold=s.max_hold, granted_at=grant.granted_at)
        asked = (self._asked_at, self._joined_at)
        turn = Turn(self._gate, self._key, token, grant, asked=asked, clock=clock)
        self._turn = turn
        self._gate._granted(turn.waited)
        self._task = asyncio.current_task()
        self._held_token = _mark_held(self._gate.id, self._key, turn)
        self._schedule()
        if grant.confirmed is not None:  # handed over before the backend recorded it
            grant.confirmed.add_done_callback(self._confirmed)
        return turn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        turn = self._turn
        assert turn is not None, "__aexit__ without __aenter__"
        if self._reused:
            return
        self._exited = True
        if self._handle is not None:
            self._handle.cancel()
        if self._renewing is not None:
            self._renewing.cancel()
        if self._held_token is not None:
            _unmark_held(self._gate.id, self._key, self._held_token)
        self._gate.metrics.observe("turn_hold_seconds", time.monotonic() - turn.acquired_at)
        try:
            release = partial(self._gate.backend.release, turn.key, turn._token)
            first: Callable[[], Awaitable[object]]
            if self.release_with is not None:
                first = partial(self.release_with, turn.key, turn._token)
            else:
                first = partial(self._release, turn)
            await self._cleanup(first, release, "release")
        except asyncio.CancelledError:
            if not self._cancel_sent:
                raise
        if self._cancel_sent and self._task is not None and self._task.uncancel() == 0:
            raise LeaseLost(
                f"lost the turn of key {turn.key!r} (fence {turn.fence}) while the body ran",
                key=turn.key,
                fence=turn.fence,
                reason=turn.lost_reason or "expired",
            ) from (None if isinstance(exc, asyncio.CancelledError) else exc)

    async def _release(self, turn: Turn) -> None:
        """Release. A turn that was handed over early first waits (a little) until its grant
        is confirmed, so that its release cannot overtake the one that granted it."""
        confirmation = turn._confirmation
        if isinstance(confirmation, asyncio.Future) and not confirmation.done():
            await asyncio.wait([confirmation], timeout=CONFIRM_WAIT)
        fence = turn._release_fence(self._settings.lease)
        await self._gate.backend.release(turn.key, turn._token, fence=fence)

    # -- acquiring ------------------------------------------------------------------------

    async def _acquire(self, token: str, deadline: Deadline) -> Grant:
        backend = self._gate.backend
        key = self._key
        lease = self._settings.first_lease
        if self._nowait:
            try:
                grant = await self._bounded(backend.try_acquire(key, token, lease), deadline)
            except BaseException:
                release = partial(backend.release, key, token)
                await self._cleanup(release, release, "release")
                raise
            self._joined_at = time.monotonic()
            if grant is None:
                self._gate.metrics.count("turns_busy")
                raise Busy(f"the turn of key {key!r} is held or has a line", key=key)
            return grant
        try:
            grant = await self._bounded(backend.join(key, token, lease), deadline)
            self._joined_at = time.monotonic()
            while grant is None:
                remaining = deadline.remaining(time.monotonic())
                if remaining == 0:
                    self._gate.metrics.count("turn_timeouts")
                    raise self._timed_out(deadline)
                # The backend's wait honours `remaining` itself (and may report an outage
                # at the deadline); the bound, a moment later, only guards a hang.
                grant = await self._bounded(
                    backend.wait(key, token, remaining), deadline, on_timeout=None, grace=0.25
                )
            return grant
        except BaseException as exc:
            # Also after a failed or cancelled join: its request may have reached the server.
            if isinstance(exc, TurnTimeout):
                # A grant that came at the last moment is kept rather than timed out; the
                # check may overrun the deadline by LEAVE_GRACE at most.
                got = await self._leave(token, keep=True, limit=LEAVE_GRACE)
                if got is not None:
                    return got
            else:  # cancelled, or the backend failed: leave in the background, raise now
                self._gate._spawn(self._leave_once(token, keep=False), key, "leave the line")
            raise

    async def _leave_once(self, token: str, *, keep: bool) -> Grant | None:
        """Leave the line; release a grant that raced in unless ``keep``."""
        got = await self._gate.backend.leave(self._key, token)
        if got is not None and not keep:
            await self._gate.backend.release(self._key, token)
            return None
        return got

    async def _leave(self, token: str, *, keep: bool, limit: float) -> Grant | None:
        return await self._cleanup(
            lambda: self._leave_once(token, keep=keep),
            lambda: self._leave_once(token, keep=False),
            "leave the line",
            limit=limit,
        )

    def _timed_out(self, deadline: Deadline) -> TurnTimeout:
        waited = self._timeout or 0.0
        return TurnTimeout(
            f"waited {waited:g}s in line for the turn of key {self._key!r}",
            key=self._key,
            waited=waited,
        )

    async def _bounded(
        self,
        call: Awaitable[T],
        deadline: Deadline,
        *,
        on_timeout: object = _RAISE,
        grace: float = 0.0,
    ) -> T:
        """Await a backend call, but never past the request's deadline (plus ``grace``).

        Then the call is abandoned: it raises BackendUnavailable, or returns
        ``on_timeout`` when one is given.
        """
        remaining = deadline.remaining(time.monotonic())
        if remaining is None:
            return await call
        try:
            async with asyncio.timeout(remaining + grace):
                return await call
        except TimeoutError as exc:
            if on_timeout is not _RAISE:
                return on_timeout  # type: ignore[return-value]
            raise BackendUnavailable(
                f"the backend did not answer within the timeout for key {self._key!r}"
            ) from exc

    async def _cleanup(
        self,
        call: Callable[[], Awaitable[T]],
        retry: Callable[[], Awaitable[object]],
        what: str,
        *,
        limit: float = CLEANUP_TIMEOUT,
    ) -> T | None:
        """Run a cleanup call to completion, even if this task is cancelled meanwhile.

        Leaving and releasing are idempotent (they act only while the token is
        in line or holds the turn), so a call interrupted by cancellation, or
        not done within ``limit`` seconds, is simply run again, whole, in a
        background task: ``retry``.
        """
        try:
            async with asyncio.timeout(limit):
                return await call()
        except asyncio.CancelledError:
            self._gate._spawn(retry(), self._key, what)
            raise
        except TimeoutError:
            self._gate._spawn(retry(), self._key, what)
            return None
        except Exception as exc:
            _log_cleanup_failure(what, self._key, exc)
            return None

    # -- renewing -------------------------------------------------------------------------

    def _schedule(self) -> None:
        turn = self._turn
        assert turn is not None
        clock = turn._clock
        when = clock.next_attempt_at()
        when = clock.expires_at if when is None else min(when, clock.expires_at)
        loop = asyncio.get_running_loop()
        self._handle = loop.call_at(loop.time() + (when - time.monotonic()), self._due)

    def _due(self) -> None:
        self._handle = None
        self._renewing = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        turn = self._turn
        assert turn is not None
        clock = turn._clock
        now = time.monotonic()
        if not clock.alive(now):
            self._lost("max_hold" if now >= clock.hold_deadline else "expired")
            return
        if clock.next_attempt_at() is None:  # max_hold: only the lapse is left to wait for
            self._schedule()
            return
        ttl = clock.ttl(now)
        try:
            async with asyncio.timeout(clock.expires_at - now):
                ok = await self._gate.backend.renew(turn.key, turn._token, ttl)
        except (TimeoutError, BackendUnavailable, ConnectionError, OSError) as exc:
            logger.debug("inturn: renewal of key %r failed: %r", turn.key, exc)
            clock.failed(time.monotonic())
            self._schedule()
            return
        if not ok:
            self._lost("taken")
        elif not clock.confirmed(sent_at=now, ttl=ttl, now=time.monotonic()):
            self._lost("expired")
        else:
            self._schedule()

    def _confirmed(self, confirmed: Confirmation) -> None:
        """The backend refused a grant it had handed over early: the turn is not ours."""
        if confirmed.cancelled() or confirmed.result():
            return
        turn = self._turn
        if turn is None or turn.lost_reason is not None:
            return
        if self._exited:  # the body ran without the turn: say so, cancel nothing
            turn._set_lost("taken")
        else:
            self._lost("taken")

    def _lost(self, reason: str) -> None:
        turn = self._turn
        assert turn is not None
        turn._set_lost(reason)
        if self._settings.on_lost == "cancel" and self._task is not None:
            self._cancel_sent = True
            self._task.cancel(f"inturn: lost the turn of key {turn.key!r}")


# -- sync -------------------------------------------------------------------------------


class SyncTurnRequest:
    """``with`` this to wait for, hold and release a key's turn from a thread."""

    __slots__ = (
        "_asked_at",
        "_gate",
        "_handle",
        "_held_token",
        "_joined_at",
        "_key",
        "_nowait",
        "_reused",
        "_settings",
        "_timeout",
        "_turn",
    )

    def __init__(
        self, gate: Gate, key: str, *, timeout: float | None, nowait: bool, settings: TurnSettings
    ) -> None:
        self._gate = gate
        self._key = key
        self._timeout = timeout
        self._nowait = nowait
        self._settings = settings
        self._turn: SyncTurn | None = None
        self._reused = False
        self._held_token: contextvars.Token[object] | None = None
        self._handle: object = None
        self._asked_at = self._joined_at = 0.0

    def __enter__(self) -> SyncTurn:
        if self._turn is not None:
            raise RuntimeError("a SyncTurnRequest can be entered only once")
        again = _held_by_me(self._gate.id, self._key)
        if isinstance(again, SyncTurn):
            self._reused = True
            self._turn = again
            return again
        token = new_token()
        self._asked_at = time.monotonic()
        grant = self._acquire(token, Deadline.after(self._timeout, self._asked_at))
        s = self._settings
        clock = LeaseClock.start(lease=s.lease, max_hold=s.max_hold, granted_at=grant.granted_at)
        asked = (self._asked_at, self._joined_at)
        turn = SyncTurn(self._gate, self._key, token, grant, asked=asked, clock=clock)
        self._turn = turn
        self._gate._granted(turn.waited)
        self._held_token = _mark_held(self._gate.id, self._key, turn)
        self._schedule()
        if grant.confirmed is not None:  # handed over before the backend recorded it
            grant.confirmed.add_done_callback(self._confirmed)
        return turn

    def _confirmed(self, confirmed: Confirmation) -> None:
        """The backend refused a grant it had handed over early: the turn is not ours
        (the body cannot be cancelled; with on_lost="cancel" the exit raises LeaseLost)."""
        turn = self._turn
        if turn is not None and not confirmed.cancelled() and not confirmed.result():
            turn._set_lost("taken")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        turn = self._turn
        assert turn is not None, "__exit__ without __enter__"
        if self._reused:
            return
        handle = self._handle
        self._handle = None  # tells a renewal that is running now not to reschedule
        if handle is not None:
            handle.cancel()  # type: ignore[attr-defined]
        if self._held_token is not None:
            _unmark_held(self._gate.id, self._key, self._held_token)
        self._gate.metrics.observe("turn_hold_seconds", time.monotonic() - turn.acquired_at)
        self._cleanup(lambda: self._release(turn), "release")
        if turn.lost_reason is not None and self._settings.on_lost == "cancel":
            raise LeaseLost(
                f"lost the turn of key {turn.key!r} (fence {turn.fence}) while the body ran",
                key=turn.key,
                fence=turn.fence,
                reason=turn.lost_reason,
            ) from exc

    def _release(self, turn: SyncTurn) -> None:
        """See TurnRequest._release."""
        confirmation = turn._confirmation
        if isinstance(confirmation, concurrent.futures.Future) and not confirmation.done():
            concurrent.futures.wait([confirmation], timeout=CONFIRM_WAIT)
        fence = turn._release_fence(self._settings.lease)
        self._gate.sync_backend.release(turn.key, turn._token, fence=fence)

    def _acquire(self, token: str, deadline: Deadline) -> Grant:
        backend = self._gate.sync_backend
        key = self._key
        lease = self._settings.first_lease
        if self._nowait:
            try:
                grant = self._bounded(lambda: backend.try_acquire(key, token, lease), deadline)
            except BaseException:
                self._leave_later(token)  # the request may have got through
                raise
            self._joined_at = time.monotonic()
            if grant is None:
                self._gate.metrics.count("turns_busy")
                raise Busy(f"the turn of key {key!r} is held or has a line", key=key)
            return grant
        try:
            grant = self._bounded(lambda: backend.join(key, token, lease), deadline)
            self._joined_at = time.monotonic()
            while grant is None:
                remaining = deadline.remaining(time.monotonic())
                if remaining == 0:
                    self._gate.metrics.count("turn_timeouts")
                    waited = self._timeout or 0.0
                    raise TurnTimeout(
                        f"waited {waited:g}s in line for the turn of key {key!r}",
                        key=key,
                        waited=waited,
                    )
                grant = backend.wait(key, token, remaining)
            return grant
        except BaseException as exc:
            if isinstance(exc, TurnTimeout):  # keep a grant that came at the last moment
                got = self._leave_in_time(token)
                if got is not None:
                    return got
            else:  # the backend failed: leave in the background, raise now
                self._leave_later(token)
            raise

    def _leave_in_time(self, token: str) -> Grant | None:
        """Leave the line after a timeout, keeping a grant that came meanwhile; wait at most
        LEAVE_GRACE for the answer (a stalled server: the leave goes on in the background,
        and releases what it may have been granted)."""

        def leave() -> Grant | None:
            return self._cleanup(lambda: self._leave_once(token, keep=True), "leave the line")

        def too_late(got: Grant | None) -> None:
            if got is not None:
                release = self._gate.sync_backend.release
                self._cleanup(lambda: release(self._key, token), "release")

        try:
            return self._within(leave, LEAVE_GRACE, too_late)
        except concurrent.futures.TimeoutError:
            return None

    def _leave_once(self, token: str, *, keep: bool) -> Grant | None:
        backend = self._gate.sync_backend
        got = backend.leave(self._key, token)
        if got is not None and not keep:
            backend.release(self._key, token)
            return None
        return got

    def _leave_later(self, token: str) -> None:
        def leave() -> None:
            self._cleanup(lambda: self._leave_once(token, keep=False), "leave the line")

        threading.Thread(target=leave, name="inturn-leave", daemon=True).start()

    def _bounded(self, call: Callable[[], T], deadline: Deadline) -> T:
        """Run a backend call, but give up at the request's deadline (BackendUnavailable).

        A backend whose calls can block (a paused server) runs them in a worker
        thread so the caller is free at its deadline; the call itself finishes
        or times out on its own, and the line is left in the background.
        """
        try:
            return self._within(call, deadline.remaining(time.monotonic()))
        except concurrent.futures.TimeoutError as exc:
            raise BackendUnavailable(
                f"the backend did not answer within the timeout for key {self._key!r}"
            ) from exc

    def _within(
        self,
        call: Callable[[], T],
        limit: float | None,
        late: Callable[[T], object] | None = None,
    ) -> T:
        """Run a backend call, in a worker thread when its calls can block (a paused server),
        and wait at most ``limit`` seconds (None: as long as it takes). Past that, raise
        ``concurrent.futures.TimeoutError``; the call finishes on its own, and its result
        then goes to ``late``."""
        if limit is None or getattr(self._gate.sync_backend, "never_blocks", False):
            return call()
        future = _bounded_pool().submit(call)
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            if late is not None:
                future.add_done_callback(
                    lambda done: None if done.exception() is not None else late(done.result())
                )
            raise

    def _cleanup(self, call: Callable[[], T], what: str) -> T | None:
        try:
            return call()
        except Exception as exc:
            _log_cleanup_failure(what, self._key, exc)
            return None

    def _schedule(self) -> None:
        turn = self._turn
        assert turn is not None
        clock = turn._clock
        when = clock.next_attempt_at()
        when = clock.expires_at if when is None else min(when, clock.expires_at)
        self._handle = self._gate._timers.call_at(when, self._renew)

    def _renew(self) -> None:
        turn = self._turn
        if turn is None or self._handle is None:
            return
        clock = turn._clock
        now = time.monotonic()
        if not clock.alive(now):
            turn._set_lost("max_hold" if now >= clock.hold_deadline else "expired")
            return
        if clock.next_attempt_at() is None:
            self._schedule()
            return
        ttl = clock.ttl(now)
        try:
            ok = self._gate.sync_backend.renew(turn.key, turn._token, ttl)
        except (BackendUnavailable, ConnectionError, OSError, TimeoutError) as exc:
            logger.debug("inturn: renewal of key %r failed: %r", turn.key, exc)
            clock.failed(time.monotonic())
            ok = None
        if self._handle is None:  # the block exited while this renewal ran
            return
        if ok is False:
            turn._set_lost("taken")
        elif ok and not clock.confirmed(sent_at=now, ttl=ttl, now=time.monotonic()):
            turn._set_lost("expired")
        elif self._handle is not None:
            self._schedule()
