"""The async twin of the turn: ``async with gate.turn(key) as turn``.

:class:`TurnRequest` drives :func:`._turn.acquire_flow` with asyncio: each
backend call is bounded by the request's deadline with ``asyncio.timeout``,
cleanups run shielded and time-bounded (a cancelled caller's leave goes on in
a background task), and renewal runs on the holder's own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from functools import partial
from types import TracebackType
from typing import Any, Generic, TypeVar

from ._backends._confirming import Confirming
from ._backends.base import Confirmation, Grant
from ._errors import BackendUnavailable, LeaseLost
from ._keys import shown
from ._policy import Deadline, TurnSettings
from ._runtime import CLEANUP_TIMEOUT, Runtime, log_cleanup_failure
from ._turn import (
    CONFIRM_WAIT,
    LEAVE_GRACE,
    Asking,
    Call,
    Cleanup,
    KeepLateGrant,
    Pause,
    Step,
    Turn,
    Wait,
    _Request,
    acquire_flow,
    next_timer_at,
    renewal_due,
    renewal_outcome,
)

__all__ = ["TurnRequest"]

logger = logging.getLogger("inturn")

T = TypeVar("T")


class _Done(Generic[T]):
    """A call that finished without waiting (see :func:`_begin`)."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


class _Begun(Generic[T]):
    """A coroutine that ran up to its first wait; awaiting this runs the rest."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, T], first: object) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, None, T]:
        coro, step = self._coro, self._first
        while True:  # what ``await coro`` does, from its second step on
            try:
                sent = yield step
            except BaseException as exc:
                try:
                    step = coro.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
            else:
                try:
                    step = coro.send(sent)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]


class _Failed(Generic[T]):
    """A call that raised before its first wait: awaiting this raises it."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __await__(self) -> Generator[Any, None, T]:
        raise self.error


def _begin(call: Coroutine[Any, Any, T]) -> _Done[T] | Awaitable[T]:
    """Run a coroutine now, up to its first wait: a release or a leave writes its command
    at once. Most finish without waiting (a release that hands the turn over in-process
    does not await its reply): those are returned as done, and nothing bounds them."""
    try:
        first = call.send(None)
    except StopIteration as done:
        return _Done(done.value)
    except BaseException as exc:
        return _Failed(exc)
    return _Begun(call, first)


class TurnRequest(_Request[Turn]):
    """``async with`` this to wait for, hold and release a key's turn (from ``Gate.turn``)."""

    __slots__ = ("_cancel_sent", "_exited", "_handle", "_renewing", "_task")
    _turn_type = Turn

    def __init__(
        self,
        runtime: Runtime,
        key: str,
        *,
        timeout: float | None,
        nowait: bool,
        settings: TurnSettings,
    ) -> None:
        super().__init__(runtime, key, timeout=timeout, nowait=nowait, settings=settings)
        self._handle: asyncio.TimerHandle | None = None
        self._renewing: asyncio.Task[None] | None = None
        self._task: asyncio.Task[object] | None = None
        self._cancel_sent = False
        self._exited = False

    def __enter__(self) -> None:
        raise TypeError(
            "gate.turn(...) is for coroutines: use `async with gate.turn(key) as turn:`, "
            "or `with gate.turn_sync(key) as turn:` in a thread"
        )

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - __enter__ raised
        return None

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("gate.turn(...) is not awaited: use `async with gate.turn(key) as turn:`")

    async def __aenter__(self) -> Turn:
        again = self._reentered()
        if again is not None:
            return again
        asking = self._asking()
        turn = self._hold(asking, grant := await self._drive(asking))
        self._task = asyncio.current_task()
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
        turn._note_lapse()
        turn._released = True
        # The release leaves first (the next holder starts sooner); the bookkeeping follows
        # (_unhold: the lapse is noted already, so only the mark, metrics and tracing).
        hook = self._release_hook
        call = _begin(hook(turn.key, turn._token) if hook is not None else self._release(turn))
        self._unhold(turn)
        try:
            release = partial(self._runtime.backend.release, turn.key, turn._token)
            await self._cleanup(call, release, "release")
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
        if isinstance(confirmation, Confirming) and not confirmation.done():
            confirmation.hurry()
        if isinstance(confirmation, asyncio.Future) and not confirmation.done():
            await asyncio.wait([confirmation], timeout=CONFIRM_WAIT)
        fence = turn._release_fence(self._settings.lease)
        await self._runtime.backend.release(turn.key, turn._token, fence=fence)

    # -- acquiring: the shared flow, run with asyncio ------------------------------------

    async def _drive(self, asking: Asking) -> Grant:
        flow = acquire_flow(asking, self._runtime, nowait=self._nowait)
        reply: Grant | None = None
        error: BaseException | None = None
        while True:
            try:
                step = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as done:
                grant: Grant = done.value
                return grant
            reply, error = None, None
            try:
                reply = await self._run(step, asking)
            except BaseException as exc:  # cancellation too: the flow decides what follows
                error = exc

    def _run(self, step: Step, asking: Asking) -> Awaitable[Grant | None]:
        """The awaitable that runs ``step``: a backend call itself when no deadline bounds
        it (no frame of ours between the task and the backend's call)."""
        backend, key, token = self._runtime.backend, asking.key, asking.token
        if isinstance(step, Call):
            call = backend.join if step.op == "join" else backend.try_acquire
            if asking.deadline.at == math.inf:
                return call(key, token, asking.lease)
            return self._bounded(call(key, token, asking.lease), asking.deadline)
        if isinstance(step, Wait):
            waiting = backend.wait(key, token, step.seconds)
            if asking.deadline.at == math.inf:
                return waiting
            # The backend's wait honours the time left itself (and may report an outage
            # at the deadline); the bound, a moment later, only guards a hang.
            return self._bounded(waiting, asking.deadline, grace=0.25, late=None)
        return self._run_other(step, asking)

    async def _run_other(self, step: Step, asking: Asking) -> Grant | None:
        backend, key, token = self._runtime.backend, asking.key, asking.token
        if isinstance(step, Pause):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, KeepLateGrant):
            # May overrun the deadline by LEAVE_GRACE at most.
            return await self._cleanup(
                _begin(self._leave_once(token, keep=True)),
                lambda: self._leave_once(token, keep=False),
                "leave the line",
                limit=LEAVE_GRACE,
            )
        assert isinstance(step, Cleanup)
        if step.action == "release":
            self._runtime.spawn(backend.release(key, token), key, "release")
        else:
            self._runtime.spawn(self._leave_once(token, keep=False), key, "leave the line")
        return None

    async def _leave_once(self, token: str, *, keep: bool) -> Grant | None:
        """Leave the line; release a grant that raced in unless ``keep``."""
        backend = self._runtime.backend
        got = await backend.leave(self._key, token)
        if got is not None and not keep:
            await backend.release(self._key, token)
            return None
        return got

    async def _bounded(
        self,
        call: Awaitable[Grant | None],
        deadline: Deadline,
        *,
        grace: float = 0.0,
        late: object = BackendUnavailable,
    ) -> Grant | None:
        """Await a backend call, but never past the request's deadline (plus ``grace``).

        Then the call is abandoned: it raises BackendUnavailable, or returns None when
        ``late`` is None (a wait that overran: the flow re-checks the deadline).
        """
        remaining = deadline.remaining(time.monotonic())
        if remaining is None:
            return await call
        try:
            async with asyncio.timeout(remaining + grace):
                return await call
        except TimeoutError as exc:
            if late is None:
                return None
            raise BackendUnavailable(
                f"the backend did not answer within the timeout for key {self._key!r}"
            ) from exc

    async def _cleanup(
        self,
        call: _Done[T] | Awaitable[T],
        retry: Callable[[], Awaitable[object]],
        what: str,
        *,
        limit: float = CLEANUP_TIMEOUT,
    ) -> T | None:
        """Run a cleanup call (begun with :func:`_begin`) to completion, even if this task
        is cancelled meanwhile.

        Leaving and releasing are idempotent (they act only while the token is
        in line or holds the turn), so a call interrupted by cancellation, not
        done within ``limit`` seconds, or failed, is simply run again, whole, in
        a background task: ``retry``.
        """
        if isinstance(call, _Done):  # it never waited: nothing to bound in time
            return call.value
        try:
            async with asyncio.timeout(limit):
                return await call
        except asyncio.CancelledError:
            self._runtime.spawn(retry(), self._key, what)
            raise
        except TimeoutError:
            self._runtime.spawn(retry(), self._key, what)
            return None
        except Exception as exc:  # e.g. BackendUnavailable: try once more, in the background
            log_cleanup_failure(what, self._key, exc)
            self._runtime.spawn(retry(), self._key, what)
            return None

    # -- renewing -------------------------------------------------------------------------

    def _schedule(self) -> None:
        turn = self._turn
        assert turn is not None
        loop = asyncio.get_running_loop()
        delay = next_timer_at(turn._clock) - time.monotonic()
        self._handle = loop.call_at(loop.time() + delay, self._due)

    def _due(self) -> None:
        self._handle = None
        self._renewing = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        turn = self._turn
        assert turn is not None
        clock = turn._clock
        now = time.monotonic()
        due = renewal_due(clock, now)
        if isinstance(due, str):
            self._lost(due)
            return
        if due is None:  # max_hold: only the lapse is left to wait for
            self._schedule()
            return
        ok: bool | None
        try:
            async with asyncio.timeout(clock.expires_at - now):
                ok = await self._runtime.backend.renew(turn.key, turn._token, due)
        except Exception as exc:  # any failure is a failed attempt: retried, or the lease lapses
            logger.debug("inturn: renewal of key %r failed: %r", shown(turn.key), exc)
            ok = None
        lost = renewal_outcome(clock, ok, sent_at=now, ttl=due)
        if lost is not None:
            self._lost(lost)
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
