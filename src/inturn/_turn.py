"""The turn: what a held turn is, and the one flow both twins drive to get it.

``TurnRequest`` (async, :mod:`._turn_async`) and ``SyncTurnRequest`` (threads,
:mod:`._turn_sync`) are the context managers returned by ``Gate.turn()`` /
``Gate.turn_sync()`` and their ``*_nowait`` twins. They drive one algorithm,
written once here as a generator of steps (:func:`acquire_flow`) plus the
renewal decisions (:func:`renewal_due`, :func:`renewal_outcome`); the twins
supply only how to run a backend call, how to wait and how to bound time:

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
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar

from ._backends.base import Grant
from ._errors import BackendUnavailable, Busy, TurnTimeout
from ._keys import new_token, shown
from ._policy import RETRY_BACKOFF, Deadline, LeaseClock, TurnSettings
from ._runtime import LogThrottle, Runtime

__all__ = [
    "CONFIRM_WAIT",
    "HANDOVER_MARGIN",
    "LEAVE_GRACE",
    "Asking",
    "Call",
    "Cleanup",
    "KeepLateGrant",
    "Pause",
    "Step",
    "SyncTurn",
    "Turn",
    "Wait",
    "acquire_flow",
    "renewal_due",
    "renewal_outcome",
]

logger = logging.getLogger("inturn")

HANDOVER_MARGIN = 0.5
"""Seconds of lease a holder must have left to let the backend start its next waiter at once."""
CONFIRM_WAIT = 2.0
"""How long a release waits for its own early grant to be confirmed (then: a plain release)."""
LEAVE_GRACE = 0.5
"""How long past its deadline a timed-out waiter checks whether it was granted meanwhile."""
_timeouts = LogThrottle()
"""Per key: the first timeout in a while is a WARNING, the crowd behind it DEBUG."""
RIDE_OUT = 15.0
"""How long a waiter without a deadline rides out a backend that stopped answering (a
Cluster or Sentinel failover takes a few seconds) before it gives up with
BackendUnavailable. A waiter with a deadline rides out until its deadline."""


# -- re-entrancy ---------------------------------------------------------------------
# A task that holds a key's turn and asks for it again gets the same turn. The
# owner is the asyncio task, or the thread when no loop runs in it; child tasks
# and other threads are other owners (they would run beside the holder).

_Owner = weakref.ref[object]
_held: contextvars.ContextVar[Mapping[tuple[str, str], tuple[_Owner, _TurnBase]]] = (
    contextvars.ContextVar("inturn_held", default=MappingProxyType({}))
)


def _current_owner() -> object:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return threading.current_thread()
    task = asyncio.current_task()
    return task if task is not None else threading.current_thread()


def _held_by_me(domain: str, key: str) -> _TurnBase | None:
    found = _held.get().get((domain, key))
    if found is not None and found[0]() is _current_owner():
        return found[1]
    return None


def _mark_held(domain: str, key: str, turn: _TurnBase) -> contextvars.Token[object]:
    held = dict(_held.get())
    held[(domain, key)] = (weakref.ref(_current_owner()), turn)
    return _held.set(held)  # type: ignore[return-value]


def _unmark_held(domain: str, key: str, token: contextvars.Token[object]) -> None:
    try:
        _held.reset(token)  # type: ignore[arg-type]
    except ValueError:  # exited in another context than entered: drop the entry by hand
        held = dict(_held.get())
        held.pop((domain, key), None)
        _held.set(held)


# -- the held turn --------------------------------------------------------------------


class _TurnBase:
    __slots__ = (
        "_clock",
        "_confirmation",
        "_released",
        "_runtime",
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
        runtime: Runtime,
        key: str,
        token: str,
        grant: Grant,
        *,
        asked: tuple[float, float],
        clock: LeaseClock,
    ) -> None:
        self._runtime = runtime
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
        self._released = False

    @property
    def waited(self) -> float:
        """Seconds from asking to the grant."""
        return self.acquired_at - self.asked_at

    def __repr__(self) -> str:
        if self.lost_reason is not None:
            state = f"lost ({self.lost_reason})"
        else:
            state = "released" if self._released else "held"
        return f"<{type(self).__name__} key={self.key!r} fence={self.fence} {state}>"

    def _note_lapse(self) -> None:
        """Record a lease that ran out by the holder's own clock, now rather than when the
        renewal timer next runs: a loop or thread that was blocked past the lease must read
        ``lost`` as set the moment it asks. Nothing changes once the block has exited."""
        if self.lost_reason is None and not self._released:
            now = time.monotonic()
            if not self._clock.alive(now):
                self._set_lost("max_hold" if now >= self._clock.hold_deadline else "expired")

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

    def _signal_lost(self) -> None:
        """Set ``lost`` if it was made already (it is made on first use: most turns never
        look at it, and a threading.Event costs more than the rest of a memory turn)."""
        raise NotImplementedError

    def _set_lost(self, reason: str) -> None:
        """Record the loss once: ``lost`` set, a WARNING with key and fence, a metric."""
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        self._signal_lost()
        self._runtime.metrics.count("leases_lost", reason=reason)
        logger.warning(
            "inturn: lost the turn of key %r (fence %d): %s",
            shown(self.key),
            self.fence,
            _REASONS[reason],
            extra={"inturn_key": shown(self.key), "inturn_fence": self.fence},
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

    __slots__ = ("_lost",)
    _lost: asyncio.Event

    @property
    def lost(self) -> asyncio.Event:
        """Set when the lease is lost (``is_set()`` also reads the holder's clock)."""
        try:
            return self._lost
        except AttributeError:
            event = self._lost = _LostEvent(self)
            if self.lost_reason is not None:
                asyncio.Event.set(event)
            return event

    def _signal_lost(self) -> None:
        try:
            event = self._lost
        except AttributeError:
            return
        asyncio.Event.set(event)

    async def check(self) -> bool:
        """Ask the backend whether this turn is still held: False once lost, and False
        (without calling it lost) after the block exited and released it."""
        if self._released or self.lost.is_set():
            return False
        held = await self._runtime.backend.is_held(self.key, self._token)
        if not held and self.lost_reason is None and not self._released:
            self._set_lost("taken")
        return held


class SyncTurn(_TurnBase):
    """A held turn of one key (threads). Get one from ``with gate.turn_sync(key) as turn``.

    ``lost`` is a :class:`threading.Event`. A thread cannot be interrupted, so
    with ``on_lost="cancel"`` the block raises :class:`LeaseLost` when it exits.
    """

    __slots__ = ("_lost",)
    _lost: threading.Event

    @property
    def lost(self) -> threading.Event:
        """Set when the lease is lost (``is_set()`` also reads the holder's clock)."""
        try:
            return self._lost
        except AttributeError:
            pass
        with _make_lock:  # the renewal thread may signal while the holder asks
            try:
                return self._lost
            except AttributeError:
                event = self._lost = _SyncLostEvent(self)
                if self.lost_reason is not None:
                    threading.Event.set(event)
                return event

    def _signal_lost(self) -> None:
        with _make_lock:
            try:
                event = self._lost
            except AttributeError:
                return
        threading.Event.set(event)

    def check(self) -> bool:
        """Ask the backend whether this turn is still held: False once lost, and False
        (without calling it lost) after the block exited and released it."""
        if self._released or self.lost.is_set():
            return False
        held = self._runtime.sync_backend.is_held(self.key, self._token)
        if not held and not self._released:
            self._set_lost("taken")
        return held


_make_lock = threading.Lock()
"""Guards making a thread's ``lost`` event against the renewal thread signalling it."""


class _LostEvent(asyncio.Event):
    """``turn.lost`` for a task: ``is_set()`` first notes a lease that ran out meanwhile."""

    def __init__(self, turn: _TurnBase) -> None:
        super().__init__()
        self._turn = turn

    def is_set(self) -> bool:
        if not super().is_set():
            self._turn._note_lapse()
        return super().is_set()


class _SyncLostEvent(threading.Event):
    """``turn.lost`` for a thread: ``is_set()`` first notes a lease that ran out meanwhile."""

    def __init__(self, turn: _TurnBase) -> None:
        super().__init__()
        self._turn = turn

    def is_set(self) -> bool:
        if not super().is_set():
            self._turn._note_lapse()
        return super().is_set()


# -- a request's bookkeeping, shared by both twins -------------------------------------


TurnT = TypeVar("TurnT", bound="_TurnBase")


class _Request(Generic[TurnT]):
    """What both request twins keep: the key, the settings, re-entrancy, the held turn.

    The twins add how to wait (asyncio or threads), how to renew and how to release.
    """

    __slots__ = (
        "_given",
        "_held_token",
        "_key",
        "_nowait",
        "_release_hook",
        "_reused",
        "_runtime",
        "_settings",
        "_timeout",
        "_turn",
    )

    _turn_type: type[TurnT]

    def __init__(
        self,
        runtime: Runtime,
        key: str,
        *,
        timeout: float | None,
        nowait: bool,
        settings: TurnSettings,
    ) -> None:
        self._runtime = runtime
        self._key = key
        self._timeout = timeout
        self._nowait = nowait
        self._settings = settings
        self._turn: TurnT | None = None
        self._release_hook: Callable[[str, str], Any] | None = None
        self._given: tuple[str, Grant] | None = None
        self._reused = False
        self._held_token: contextvars.Token[object] | None = None

    def _release_with(self, hook: Callable[[str, str], Any]) -> None:
        """Release through ``hook`` (key, token) instead of a plain release; a plain release
        is its retry. Not called at all when the turn was re-entered."""
        self._release_hook = hook

    def _granted_with(self, token: str, grant: Grant) -> None:
        """Enter with a turn the engine granted to ``token`` already (a mailbox drainer's,
        granted with its batch): no join. If the request is re-entered instead, the
        caller releases that grant (see ``_reused``)."""
        self._given = (token, grant)

    def _reentered(self) -> TurnT | None:
        """The turn this task or thread already holds for the key (then it is reused)."""
        if self._turn is not None:
            raise RuntimeError(f"a {type(self).__name__} can be entered only once")
        again = _held_by_me(self._runtime.domain, self._key)
        if isinstance(again, self._turn_type):
            self._reused = True
            self._turn = again
            return again
        return None

    def _asking(self) -> Asking:
        now = time.monotonic()
        given = self._given
        return Asking(
            key=self._key,
            token=new_token() if given is None else given[0],
            lease=self._settings.first_lease,
            deadline=Deadline.after(self._timeout, now),
            timeout=self._timeout,
            asked_at=now,
            given=None if given is None else given[1],
        )

    def _hold(self, asking: Asking, grant: Grant) -> TurnT:
        """Make the held turn from its grant; count it; mark it held by this owner."""
        s = self._settings
        clock = LeaseClock.start(lease=s.lease, max_hold=s.max_hold, granted_at=grant.granted_at)
        asked = (asking.asked_at, asking.joined_at)
        turn = self._turn_type(
            self._runtime, self._key, asking.token, grant, asked=asked, clock=clock
        )
        self._turn = turn
        self._runtime.granted(turn.key, turn.fence, turn.waited)
        self._held_token = _mark_held(self._runtime.domain, self._key, turn)
        return turn

    def _unhold(self, turn: TurnT) -> None:
        """The block exits: report a lease that ran out meanwhile, stop being the holder."""
        turn._note_lapse()
        turn._released = True
        if self._held_token is not None:
            _unmark_held(self._runtime.domain, self._key, self._held_token)
        self._runtime.released(turn.key, turn.fence, turn.acquired_at, turn.lost_reason)


# -- the acquire flow, shared by both twins -------------------------------------------


@dataclass(slots=True)
class Asking:
    """One request on its way to the turn: its key, token, lease and deadline, and when
    it asked and joined the line (``time.monotonic()``)."""

    key: str
    token: str
    lease: float
    deadline: Deadline
    timeout: float | None
    asked_at: float
    joined_at: float = 0.0
    given: Grant | None = None  # granted already (see _Request._granted_with): no join


@dataclass(frozen=True, slots=True)
class Call:
    """Step: call ``backend.<op>(key, token, lease)`` (``join`` or ``try_acquire``), bounded
    by the request's deadline (past it: BackendUnavailable). Sends back the grant or None."""

    op: Literal["join", "try_acquire"]


@dataclass(frozen=True, slots=True)
class Wait:
    """Step: sleep in line until granted, at most ``seconds``. Sends back the grant or None."""

    seconds: float | None


@dataclass(frozen=True, slots=True)
class KeepLateGrant:
    """Step: after a timeout, leave the line but keep a grant that came meanwhile; wait at
    most LEAVE_GRACE for the answer. Sends back that grant or None."""


@dataclass(frozen=True, slots=True)
class Pause:
    """Step: sleep ``seconds`` before trying a failed call again. Sends back None."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Cleanup:
    """Step: the request failed (or was cancelled): ``release`` or ``leave`` in the
    background, bounded in time; the caller's exception goes on at once."""

    action: Literal["release", "leave"]


Step = Call | Wait | KeepLateGrant | Pause | Cleanup


def _ride_out(
    step: Call | Wait, asking: Asking, runtime: Runtime
) -> Generator[Step, Grant | None, Grant | None]:
    """Run ``step``; while the backend is unavailable, try it again with backoff.

    Only a backend that answered before in this process is waited for (a failover
    window), up to the request's deadline or RIDE_OUT; one that never answered fails
    at once, naming its error. Retrying is safe: a join of the same token is
    idempotent, and a wait only asks.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            result = yield step
        except BackendUnavailable as exc:
            now = time.monotonic()
            until = min(asking.deadline.at, started + RIDE_OUT)
            if not (exc.transient and runtime.reached) or now >= until:
                raise
            yield Pause(min(RETRY_BACKOFF[min(attempt, len(RETRY_BACKOFF) - 1)], until - now))
            attempt += 1
            if isinstance(step, Wait):
                step = Wait(asking.deadline.remaining(time.monotonic()))
            continue
        runtime.reached = True
        return result


def acquire_flow(
    asking: Asking, runtime: Runtime, *, nowait: bool
) -> Generator[Step, Grant | None, Grant]:
    """Get the turn: the steps a twin runs, one copy for both.

    The generator yields :data:`Step` objects; the twin runs each (async or in
    threads) and sends back its result, or throws the exception it raised
    (cancellation included) into the generator, which decides what follows.
    A request that ends without the turn is reported to the runtime (tracing).
    """
    try:
        return (yield from _acquire(asking, runtime, nowait=nowait))
    except BaseException as exc:
        runtime.wait_failed(asking.key, asking.asked_at, exc)
        raise


def _acquire(
    asking: Asking, runtime: Runtime, *, nowait: bool
) -> Generator[Step, Grant | None, Grant]:
    if asking.given is not None:
        runtime.reached = True
        asking.joined_at = asking.asked_at
        return asking.given
    metrics = runtime.metrics
    if nowait:
        try:
            grant = yield Call("try_acquire")
        except BaseException as exc:
            if _done_nothing(exc):
                raise
            yield Cleanup("release")  # the request may have got through
            raise
        runtime.reached = True
        asking.joined_at = time.monotonic()
        if grant is None:
            metrics.count("turns_busy")
            raise Busy(f"the turn of key {asking.key!r} is held or has a line", key=asking.key)
        return grant
    refused = False
    try:
        try:
            grant = yield from _ride_out(Call("join"), asking, runtime)
        except BaseException as exc:
            refused = _done_nothing(exc)
            raise
        asking.joined_at = time.monotonic()
        while grant is None:
            remaining = asking.deadline.remaining(time.monotonic())
            if remaining == 0:
                metrics.count("turn_timeouts")
                waited = asking.timeout or 0.0
                logger.log(  # a crowd timing out on one key (a dead server) logs once
                    _timeouts.level(asking.key),
                    "inturn: gave up waiting for the turn of key %r after %gs",
                    shown(asking.key),
                    waited,
                    extra={"inturn_key": shown(asking.key)},
                )
                raise TurnTimeout(
                    f"waited {waited:g}s in line for the turn of key {asking.key!r}",
                    key=asking.key,
                    waited=waited,
                )
            grant = yield from _ride_out(Wait(remaining), asking, runtime)
        return grant
    except TurnTimeout:
        # A grant that came at the last moment is kept rather than timed out.
        got = yield KeepLateGrant()
        if got is not None:
            return got
        raise
    except BaseException:
        # Also after a failed or cancelled join: its request may have reached the server.
        if not refused:
            yield Cleanup("leave")
        raise


def _done_nothing(exc: BaseException) -> bool:
    """The backend refused the call outright (a wrong password, a server out of memory):
    it did nothing there, so there is nothing to leave or release."""
    return isinstance(exc, BackendUnavailable) and not exc.transient


# -- renewal decisions, shared by both twins -------------------------------------------


def renewal_due(clock: LeaseClock, now: float) -> str | float | None:
    """What a renewal timer that fired at ``now`` does: a lost reason (``"expired"``,
    ``"max_hold"``), None (renewal has ended: only wait for the lapse), or the
    time-to-live to ask for."""
    if not clock.alive(now):
        return "max_hold" if now >= clock.hold_deadline else "expired"
    if clock.next_attempt_at() is None:
        return None
    return clock.ttl(now)


def renewal_outcome(
    clock: LeaseClock, ok: bool | None, *, sent_at: float, ttl: float
) -> str | None:
    """Record a renewal's answer (``ok`` None: it failed in transport and will be retried);
    returns a lost reason, or None to schedule the next attempt."""
    if ok is None:
        clock.failed(time.monotonic())
        return None
    if not ok:
        return "taken"
    if not clock.confirmed(sent_at=sent_at, ttl=ttl, now=time.monotonic()):
        return "expired"
    return None


def next_timer_at(clock: LeaseClock) -> float:
    """When the renewal timer fires next: the next attempt, or the lapse, whichever is first."""
    when = clock.next_attempt_at()
    return clock.expires_at if when is None else min(when, clock.expires_at)
