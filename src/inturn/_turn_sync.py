"""The thread twin of the turn: ``with gate.turn_sync(key) as turn``.

:class:`SyncTurnRequest` drives :func:`._turn.acquire_flow` with threads: a
backend call that can block (a paused server) runs in a bounded pool of
worker threads so the caller is free at its deadline; a failed request leaves
the line from a daemon thread; renewal runs on the process's timer thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from ._backends.base import Confirmation, Grant
from ._errors import BackendUnavailable, LeaseLost
from ._keys import shown
from ._policy import Deadline, TurnSettings
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
    _Request,
    acquire_flow,
    next_timer_at,
    renewal_due,
    renewal_outcome,
)

__all__ = ["SyncTurnRequest"]

logger = logging.getLogger("inturn")

T = TypeVar("T")


class SyncTurnRequest(_Request[SyncTurn]):
    """``with`` this to wait for, hold and release a key's turn from a thread."""

    __slots__ = ("_handle",)
    _turn_type = SyncTurn

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
        self._handle: TimerHandle | None = None

    async def __aenter__(self) -> None:
        raise TypeError(
            "gate.turn_sync(...) is for threads: use `with gate.turn_sync(key) as turn:`, "
            "or `async with gate.turn(key) as turn:` in a coroutine"
        )

    async def __aexit__(self, *exc_info: object) -> None:  # pragma: no cover - never entered
        return None

    def __enter__(self) -> SyncTurn:
        again = self._reentered()
        if again is not None:
            return again
        asking = self._asking()
        turn = self._hold(asking, grant := self._drive(asking))
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
            handle.cancel()
        self._unhold(turn)
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
