"""The thread twin of the turn: ``with gate.turn_sync(key) as turn``.

:class:`SyncTurnRequest` drives :func:`._turn.acquire_flow` with threads: a
backend call that can block (a paused server) runs in a bounded pool of
worker threads so the caller is free at its deadline; a failed request leaves
the line from a daemon thread; renewal runs on the process's timer thread.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from ._backends.base import Confirmation, Grant
from ._errors import BackendUnavailable, LeaseLost
from ._keys import new_token, shown
from ._policy import Deadline, LeaseClock, TurnSettings
from ._runtime import Runtime, bounded_pool, log_cleanup_failure, renewal_pool
from ._timers import TimerHandle
from ._turn import (
    CONFIRM_WAIT,
    LEAVE_GRACE,
    Asking,
    Call,
    Cleanup,
    KeepLateGrant,
    Pause,
    Step,
    SyncTurn,
    Wait,
    _held_by_me,
    _mark_held,
    _unmark_held,
    acquire_flow,
    next_timer_at,
    renewal_due,
    renewal_outcome,
)

__all__ = ["SyncTurnRequest"]

logger = logging.getLogger("inturn")

T = TypeVar("T")


class SyncTurnRequest:
    """``with`` this to wait for, hold and release a key's turn from a thread."""

    __slots__ = (
        "_handle",
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
        self._turn: SyncTurn | None = None
        self._reused = False
        self._held_token: contextvars.Token[object] | None = None
        self._handle: TimerHandle | None = None
        self._release_hook: Callable[[str, str], object] | None = None

    async def __aenter__(self) -> None:
        raise TypeError(
            "gate.turn_sync(...) is for threads: use `with gate.turn_sync(key) as turn:`, "
            "or `async with gate.turn(key) as turn:` in a coroutine"
        )

    async def __aexit__(self, *exc_info: object) -> None:  # pragma: no cover - never entered
        return None

    def _release_with(self, hook: Callable[[str, str], object]) -> None:
        """Release through ``hook`` (key, token) instead of a plain release (see the async
        twin). Not called at all when the turn was re-entered."""
        self._release_hook = hook

    def __enter__(self) -> SyncTurn:
        if self._turn is not None:
            raise RuntimeError("a SyncTurnRequest can be entered only once")
        runtime = self._runtime
        again = _held_by_me(runtime.domain, self._key)
        if isinstance(again, SyncTurn):
            self._reused = True
            self._turn = again
            return again
        now = time.monotonic()
        asking = Asking(
            key=self._key,
            token=new_token(),
            lease=self._settings.first_lease,
            deadline=Deadline.after(self._timeout, now),
            timeout=self._timeout,
            asked_at=now,
        )
        grant = self._drive(asking)
        s = self._settings
        clock = LeaseClock.start(lease=s.lease, max_hold=s.max_hold, granted_at=grant.granted_at)
        asked = (asking.asked_at, asking.joined_at)
        turn = SyncTurn(runtime, self._key, asking.token, grant, asked=asked, clock=clock)
        self._turn = turn
        runtime.granted(turn.key, turn.fence, turn.waited)
        self._held_token = _mark_held(runtime.domain, self._key, turn)
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
        turn._note_lapse()  # a lease that ran out during the body is reported as lost
        turn._released = True
        if handle is not None:
            handle.cancel()
        if self._held_token is not None:
            _unmark_held(self._runtime.domain, self._key, self._held_token)
        self._runtime.metrics.observe("turn_hold_seconds", time.monotonic() - turn.acquired_at)
        hook = self._release_hook
        try:
            if hook is not None:
                hook(turn.key, turn._token)
            else:
                self._release(turn)
        except Exception as error:  # e.g. BackendUnavailable: try once more, in the background
            log_cleanup_failure("release", self._key, error)
            self._in_background(lambda: self._release(turn), "release")
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
        self._runtime.sync_backend.release(turn.key, turn._token, fence=fence)

    # -- acquiring: the shared flow, run with threads -------------------------------------

    def _drive(self, asking: Asking) -> Grant:
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
                reply = self._run(step, asking)
            except BaseException as exc:  # KeyboardInterrupt too: the flow leaves the line
                error = exc

    def _run(self, step: Step, asking: Asking) -> Grant | None:
        backend, key, token, lease = (
            self._runtime.sync_backend,
            asking.key,
            asking.token,
            asking.lease,
        )
        if isinstance(step, Call):
            call = backend.join if step.op == "join" else backend.try_acquire
            return self._bounded(lambda: call(key, token, lease), asking.deadline)
        if isinstance(step, Wait):
            return backend.wait(key, token, step.seconds)
        if isinstance(step, Pause):
            time.sleep(step.seconds)  # a failed call's backoff, bounded by the deadline
            return None
        if isinstance(step, KeepLateGrant):
            return self._keep_late_grant(token)
        assert isinstance(step, Cleanup)
        if step.action == "release":
            self._in_background(lambda: backend.release(key, token), "release")
        else:
            self._in_background(lambda: self._leave_once(token, keep=False), "leave the line")
        return None

    def _keep_late_grant(self, token: str) -> Grant | None:
        """Leave the line after a timeout, keeping a grant that came meanwhile; wait at most
        LEAVE_GRACE for the answer (a stalled server: the leave goes on in the background,
        and releases what it may have been granted)."""

        def leave() -> Grant | None:
            return self._cleanup(lambda: self._leave_once(token, keep=True), "leave the line")

        def too_late(got: Grant | None) -> None:
            if got is not None:
                release = self._runtime.sync_backend.release
                self._cleanup(lambda: release(self._key, token), "release")

        try:
            return self._within(leave, LEAVE_GRACE, too_late)
        except concurrent.futures.TimeoutError:
            return None

    def _leave_once(self, token: str, *, keep: bool) -> Grant | None:
        backend = self._runtime.sync_backend
        got = backend.leave(self._key, token)
        if got is not None and not keep:
            backend.release(self._key, token)
            return None
        return got

    def _in_background(self, call: Callable[[], object], what: str) -> None:
        self._runtime.in_thread(lambda: self._cleanup(call, what), f"inturn-{what}")

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
        if limit is None or self._runtime.sync_backend.never_blocks:
            return call()
        future = bounded_pool().submit(call)
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
            log_cleanup_failure(what, self._key, exc)
            return None

    # -- renewing -------------------------------------------------------------------------

    def _schedule(self) -> None:
        turn = self._turn
        assert turn is not None
        self._handle = self._runtime.timers.call_at(next_timer_at(turn._clock), self._due)

    def _due(self) -> None:
        """On the timer thread: renew here when the backend never blocks, else in a worker."""
        if self._runtime.sync_backend.never_blocks:
            self._renew()
        else:
            renewal_pool().submit(self._renew)

    def _renew(self) -> None:
        turn = self._turn
        if turn is None or self._handle is None:
            return
        clock = turn._clock
        now = time.monotonic()
        due = renewal_due(clock, now)
        if isinstance(due, str):
            turn._set_lost(due)
            return
        if due is None:
            self._schedule()
            return
        ok: bool | None
        backend = self._runtime.sync_backend
        try:
            # Bounded by the lease's end: a stalled server must not keep the holder from
            # learning, on time, that its lease ran out.
            ok = self._within(
                lambda: backend.renew(turn.key, turn._token, due), clock.expires_at - now
            )
        except Exception as exc:  # any failure is a failed attempt: retried, or the lease lapses
            logger.debug("inturn: renewal of key %r failed: %r", shown(turn.key), exc)
            ok = None
        if not self._holding():  # the block exited while this renewal ran
            return
        lost = renewal_outcome(clock, ok, sent_at=now, ttl=due)
        if lost is not None:
            turn._set_lost(lost)
        elif self._holding():
            self._schedule()

    def _holding(self) -> bool:
        """False once the block exited (it clears the timer handle first)."""
        return self._handle is not None
