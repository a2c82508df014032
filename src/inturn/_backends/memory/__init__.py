"""The in-memory backend (``memory://``, the default): one process, no server.

The state and every atomic operation live in :class:`._core.MemoryCore`;
this module holds its two thin faces, async and sync, that share one core
(so ``turn`` and ``turn_sync`` of one gate share each key's line). See
``_core`` for the guarantees.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Generator

from inturn._backends._wakeup import Wakeup, closed_while_waiting
from inturn._backends.base import (
    ClaimResult,
    Diagnostics,
    Finding,
    Grant,
    ResumeStatus,
    Statistics,
    Submitted,
    Taken,
)

from ._admin import MemoryAdmin
from ._core import Clock, MemoryCore

__all__ = ["MemoryBackend", "SyncMemoryBackend", "from_url"]


def _finite(seconds: float) -> float | None:
    return None if seconds == math.inf else seconds


class MemoryBackend(MemoryAdmin):
    """The async face of the in-memory backend. See the module docstring for guarantees.

    ``clock`` (default ``time.monotonic``) judges leases; tests inject their own.
    """

    ordered_submits = True
    """Mailbox submits are stored in call order (each runs to the end without waiting)."""

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        namespace: str = "default",
        core: MemoryCore | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._core = MemoryCore(clock) if core is None else core
        self._twin: SyncMemoryBackend | None = None
        self.namespace = namespace
        self._closing = _Once(on_close)
        self._waits = _Waits(self._core)

    async def join(self, key: str, token: str, lease: float) -> Grant | None:
        return self._core.join(key, token, lease, sync=False)

    async def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        return self._core.try_acquire(key, token, lease)

    async def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        flow = self._waits.flow(key, token, timeout)
        try:
            while True:
                signal, seconds = next(flow)
                await signal.sleep(seconds)
        except StopIteration as done:
            grant: Grant | None = done.value
            return grant
        finally:
            flow.close()

    async def renew(self, key: str, token: str, lease: float) -> bool:
        return self._core.renew(key, token, lease)

    async def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        self._core.release(key, token)

    async def leave(self, key: str, token: str) -> Grant | None:
        return self._core.leave(key, token)

    async def is_held(self, key: str, token: str) -> bool:
        return self._core.is_held(key, token)

    async def is_busy(self, key: str) -> bool:
        return self._core.is_busy(key)

    async def footprint(self) -> int:
        return self._core.footprint()

    async def statistics(self, key: str | None = None, *, limit: int = 1000) -> Statistics:
        return self._core.statistics(key, limit, self.namespace)

    async def diagnose(self) -> Diagnostics:
        return _DIAGNOSTICS

    async def claim(
        self,
        key: str,
        scope: str,
        id: str,
        token: str,
        *,
        fence: int | None,
        lease: float,
        window: float,
    ) -> ClaimResult:
        return self._core.claim((key, scope, id), token, fence, lease, window)

    async def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None:
        self._core.finish((key, scope, id), token, result, window)

    async def abandon(self, key: str, scope: str, id: str, token: str) -> None:
        self._core.abandon((key, scope, id), token)

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
        return self._core.mb_submit(
            (name, key), message, max_pending, drop_oldest, token, lease, take, turn
        )

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
        return self._core.mb_take((name, key), token, limit, lease, ack, turn)

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
        return self._core.mb_release_take((name, key), token, turn_token, limit, lease, ack, turn)

    async def mb_done(self, name: str, key: str, token: str) -> None:
        self._core.mb_done((name, key), token)

    async def mb_retry(
        self, name: str, key: str, token: str, messages: list[str], *, not_before: float
    ) -> None:
        self._core.mb_retry((name, key), token, messages, not_before)

    async def mb_resume(self, name: str, key: str, token: str, *, lease: float) -> ResumeStatus:
        return self._core.mb_resume((name, key), token, lease)

    async def mb_renew(self, name: str, key: str, token: str, *, lease: float) -> bool:
        return self._core.mb_renew((name, key), token, lease)

    async def mb_pending(self, name: str, key: str) -> int:
        return self._core.mb_pending((name, key))

    async def mb_draining(self, name: str, key: str) -> bool:
        return self._core.mb_draining((name, key))

    async def mb_hint(self, name: str, key: str, present: bool) -> None:
        self._core.mb_hint(name, key, present)

    async def mb_hinted(self, name: str) -> list[str]:
        return self._core.mb_hinted(name)

    async def mb_dead(self, name: str, entries: list[str]) -> None:
        self._core.mb_dead(name, entries)

    async def mb_dead_letters(self, name: str, limit: int) -> list[str]:
        return self._core.mb_dead_letters(name, limit)

    def sync_twin(self) -> SyncMemoryBackend:
        if self._twin is None:
            self._twin = SyncMemoryBackend(self._core, self.namespace, closing=self._closing)
        return self._twin

    async def aclose(self) -> None:
        """End the waits in progress through this face (see :class:`_Waits`); the state is
        given back once both faces are closed (other gates of the namespace share it)."""
        self._waits.close()
        self._closing()


class SyncMemoryBackend:
    """The sync twin of :class:`MemoryBackend`; get it with ``MemoryBackend.sync_twin()``."""

    never_blocks = True
    """Its calls return at once (only ``wait`` sleeps, bounded by its timeout)."""

    def __init__(
        self, core: MemoryCore, namespace: str = "default", *, closing: _Once | None = None
    ) -> None:
        self._core = core
        self.namespace = namespace
        self._closing = _Once(None) if closing is None else closing
        self._waits = _Waits(core)

    def join(self, key: str, token: str, lease: float) -> Grant | None:
        return self._core.join(key, token, lease, sync=True)

    def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        return self._core.try_acquire(key, token, lease)

    def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        flow = self._waits.flow(key, token, timeout)
        try:
            while True:
                signal, seconds = next(flow)
                signal.sleep_sync(seconds)
        except StopIteration as done:
            grant: Grant | None = done.value
            return grant
        finally:
            flow.close()

    def renew(self, key: str, token: str, lease: float) -> bool:
        return self._core.renew(key, token, lease)

    def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        self._core.release(key, token)

    def leave(self, key: str, token: str) -> Grant | None:
        return self._core.leave(key, token)

    def is_held(self, key: str, token: str) -> bool:
        return self._core.is_held(key, token)

    def is_busy(self, key: str) -> bool:
        return self._core.is_busy(key)

    def footprint(self) -> int:
        return self._core.footprint()

    def statistics(self, key: str | None = None, *, limit: int = 1000) -> Statistics:
        """See :meth:`MemoryBackend.statistics`."""
        return self._core.statistics(key, limit, self.namespace)

    def claim(
        self,
        key: str,
        scope: str,
        id: str,
        token: str,
        *,
        fence: int | None,
        lease: float,
        window: float,
    ) -> ClaimResult:
        return self._core.claim((key, scope, id), token, fence, lease, window)

    def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None:
        self._core.finish((key, scope, id), token, result, window)

    def abandon(self, key: str, scope: str, id: str, token: str) -> None:
        self._core.abandon((key, scope, id), token)

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
        return self._core.mb_submit(
            (name, key), message, max_pending, drop_oldest, token, lease, take, turn
        )

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
        return self._core.mb_take((name, key), token, limit, lease, ack, turn)

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
        return self._core.mb_release_take((name, key), token, turn_token, limit, lease, ack, turn)

    def mb_done(self, name: str, key: str, token: str) -> None:
        self._core.mb_done((name, key), token)

    def mb_retry(
        self, name: str, key: str, token: str, messages: list[str], *, not_before: float
    ) -> None:
        self._core.mb_retry((name, key), token, messages, not_before)

    def mb_resume(self, name: str, key: str, token: str, *, lease: float) -> ResumeStatus:
        return self._core.mb_resume((name, key), token, lease)

    def mb_renew(self, name: str, key: str, token: str, *, lease: float) -> bool:
        return self._core.mb_renew((name, key), token, lease)

    def mb_pending(self, name: str, key: str) -> int:
        return self._core.mb_pending((name, key))

    def mb_draining(self, name: str, key: str) -> bool:
        return self._core.mb_draining((name, key))

    def mb_hint(self, name: str, key: str, present: bool) -> None:
        self._core.mb_hint(name, key, present)

    def mb_hinted(self, name: str) -> list[str]:
        return self._core.mb_hinted(name)

    def mb_dead(self, name: str, entries: list[str]) -> None:
        self._core.mb_dead(name, entries)

    def mb_dead_letters(self, name: str, limit: int) -> list[str]:
        return self._core.mb_dead_letters(name, limit)

    def close(self) -> None:
        """End the threads' waits in progress (see :class:`_Waits`); see MemoryBackend.aclose."""
        self._waits.close()
        self._closing()


class _Waits:
    """The waits in progress through one face, so that closing the face ends them.

    Closing takes each waiter out of its line (a grant that raced in is released:
    nobody will use it) and wakes it; its ``wait`` then raises
    :func:`closed_while_waiting`; so does a wait that begins after the close (the
    other calls go on working: nothing of ``memory://`` outlives the process). Safe
    from any thread: a wait registers before it checks ``closed``, and the close sets
    ``closed`` before it looks at the registered waits, so no wait is missed.
    """

    def __init__(self, core: MemoryCore) -> None:
        self._core = core
        self._waiting: dict[str, tuple[str, Wakeup]] = {}
        self.closed = False

    def flow(
        self, key: str, token: str, timeout: float | None
    ) -> Generator[tuple[Wakeup, float | None], None, Grant | None]:
        """A wait, for both faces: yields (signal, seconds) for each sleep; returns the
        grant, or None when ``timeout`` passed (raises once the face was closed)."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        core = self._core
        waiter, grant, lapse_in = core.poll(token)
        if waiter is None or grant is not None:
            return grant
        self.enter(token, key, waiter.signal)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                yield waiter.signal, _finite(min(left, lapse_in))
                if self.closed:
                    self.end(key, token)
                waiter, grant, lapse_in = core.poll(token)
                if waiter is None or grant is not None:
                    return grant
        finally:
            self.exit(token)

    def enter(self, token: str, key: str, signal: Wakeup) -> None:
        self._waiting[token] = (key, signal)
        if self.closed:
            self.end(key, token)

    def exit(self, token: str) -> None:
        self._waiting.pop(token, None)

    def end(self, key: str, token: str) -> None:
        """Take the token out of the line (idempotent) and raise for its wait."""
        self._leave(key, token)
        raise closed_while_waiting(key)

    def _leave(self, key: str, token: str) -> None:
        if self._core.leave(key, token) is not None:
            self._core.release(key, token)

    def close(self) -> None:
        self.closed = True
        for token, (key, signal) in list(self._waiting.items()):
            self._leave(key, token)
            signal.close()


_DIAGNOSTICS = Diagnostics(
    backend="memory",
    server="memory://",
    topology="in-process",
    findings=(
        Finding(
            "warning",
            "scope",
            "memory:// keeps turns, marks and mailboxes in this process only: it excludes "
            "nothing across processes and loses queued messages on exit (use redis:// or "
            "postgresql:// for more than one process)",
        ),
    ),
)


class _Once:
    """Runs a close action once, whichever face (async or sync) closes first."""

    def __init__(self, action: Callable[[], None] | None) -> None:
        self._action = action
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            action, self._action = self._action, None
        if action is not None:
            action()


class _SharedCores:
    """The state behind ``memory://``: one per namespace, shared by the process's open gates.

    Two gates made from ``memory://`` with one namespace exclude each other, as two
    gates on one Redis do; the state is dropped when the last of them is closed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cores: dict[str, tuple[MemoryCore, int]] = {}

    def take(self, namespace: str) -> tuple[MemoryCore, Callable[[], None]]:
        with self._lock:
            core, users = self._cores.get(namespace, (None, 0))
            if core is None:
                core = MemoryCore(time.monotonic)
            self._cores[namespace] = (core, users + 1)

        def give_back() -> None:
            with self._lock:
                current, users = self._cores.get(namespace, (None, 0))
                if current is core:
                    if users <= 1:
                        del self._cores[namespace]
                    else:
                        self._cores[namespace] = (core, users - 1)

        return core, give_back


_shared = _SharedCores()


def from_url(url: str, *, namespace: str) -> MemoryBackend:
    """Build the backend for ``memory://``: the gates of one namespace in this process share
    one state (they exclude each other) until the last of them is closed."""
    del url  # one process: nothing to configure
    core, give_back = _shared.take(namespace)
    return MemoryBackend(namespace=namespace, core=core, on_close=give_back)
