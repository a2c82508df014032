"""What one gate's features share: the runtime the gate builds and passes down.

The turn, dedup, ``@serialize`` and the mailbox each take a :class:`Runtime`
instead of the gate: the engines, the lease settings, the metrics sink, the
background-cleanup spawner, the renewal timer thread, this process's registry
of newest calls, and the probes that say whether a key is busy elsewhere (a
mailbox draining it). Nothing here imports a feature or the gate, so the
features sit below the gate and never reach back up into it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol

from . import _tracing
from ._backends.base import Backend, SyncBackend
from ._keys import shown
from ._metrics import MetricsSink
from ._policy import TurnSettings
from ._timers import TimerThread

__all__ = [
    "CLEANUP_TIMEOUT",
    "BusyProbe",
    "LogThrottle",
    "NewestCalls",
    "Runtime",
    "Supersedable",
    "bounded_pool",
    "log_cleanup_failure",
    "renewal_pool",
]

logger = logging.getLogger("inturn")

CLEANUP_TIMEOUT = 5.0
"""Upper bound (seconds) for leaving a line or releasing a turn during cleanup."""

_runtime_ids = itertools.count(1)
_timers = TimerThread()


class _Pool:
    """A process's pool of worker threads for one job, made anew after a fork."""

    def __init__(self, size: int, name: str) -> None:
        self._size, self._name = size, name
        self._made: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None

    def __call__(self) -> concurrent.futures.ThreadPoolExecutor:
        made = self._made
        if made is None or made[0] != os.getpid():
            executor = concurrent.futures.ThreadPoolExecutor(
                self._size, thread_name_prefix=self._name
            )
            made = self._made = (os.getpid(), executor)
        return made[1]


bounded_pool = _Pool(32, "inturn-call")
"""Runs backend calls that a deadline bounds (the caller waits at most that long)."""
renewal_pool = _Pool(16, "inturn-renew")
"""Runs renewals (of turns and dedup claims), so that one stuck connection never holds up
the timer thread, and with it every other holder's renewal in the process. A renewal waits
on a call in ``bounded_pool``: two pools, so no pool ever waits on itself."""


REPEAT_LOG_EVERY = 10.0
"""Seconds between two WARNINGs for the same event (the repeats in between: DEBUG)."""


class LogThrottle:
    """Whether an event that repeats (fifty waiters of a dead server failing the same
    way) is logged as a WARNING now, or at DEBUG as a repeat of one logged within
    ``every`` seconds. Safe from any thread; keeps at most ``limit`` kinds."""

    def __init__(self, every: float = REPEAT_LOG_EVERY, limit: int = 1024) -> None:
        self._every = every
        self._limit = limit
        self._last: dict[Hashable, float] = {}
        self._lock = threading.Lock()

    def level(self, kind: Hashable) -> int:
        """``logging.WARNING`` for the first of ``kind`` in ``every`` seconds, else DEBUG."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._every:
                return logging.DEBUG
            if len(self._last) >= self._limit:
                self._last = {k: t for k, t in self._last.items() if now - t < self._every}
                if len(self._last) >= self._limit:
                    return logging.DEBUG  # a flood of distinct kinds: quiet until it passes
            self._last[kind] = now
            return logging.WARNING


_cleanup_throttle = LogThrottle()


def log_cleanup_failure(what: str, key: str, exc: BaseException) -> None:
    """Log a cleanup (leave, release) that failed; the lease lapses by itself.

    While a server is down every waiter's cleanup fails the same way: the first
    of a kind is a WARNING, the same kind again within REPEAT_LOG_EVERY seconds
    only DEBUG (fifty waiters of a dead server make one line, not fifty).
    """
    logger.log(
        _cleanup_throttle.level((what, type(exc))),
        "inturn: could not %s for key %r: %s (the lease will lapse by itself)",
        what,
        shown(key),
        exc,
        extra={"inturn_key": shown(key)},
    )


class BusyProbe(Protocol):
    """Something besides the turn that can keep a key busy (a mailbox draining it).

    ``on_busy="skip"`` asks every probe of the gate, from tasks and threads alike.
    """

    async def is_draining(self, key: str | int) -> bool:
        """True while the key is busy with this probe's work."""
        ...

    def is_draining_sync(self, key: str | int) -> bool:
        """The thread twin of :meth:`is_draining`."""
        ...


class Supersedable(Protocol):
    """A call that can be told a newer call for its key took its place."""

    def supersede(self) -> None:
        """Mark the call superseded (and cancel it, where it can be)."""
        ...


class NewestCalls:
    """This process's newest waiting call and running call per (scope, key).

    A newer call supersedes the older waiting one at once, and with
    ``cancel_running`` the running one too; calls leave when they end. Safe
    from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, str], Supersedable] = {}
        self._running: dict[tuple[str, str], Supersedable] = {}

    def arrive(self, name: tuple[str, str], call: Supersedable, *, cancel_running: bool) -> None:
        """Record ``call`` as the newest waiting call; supersede the ones it replaces."""
        with self._lock:
            older = self._waiting.get(name)
            self._waiting[name] = call
            running = self._running.get(name) if cancel_running else None
        for other in (older, running):
            if other is not None:
                other.supersede()

    def start(self, name: tuple[str, str], call: Supersedable) -> None:
        """``call`` got the turn and runs now."""
        with self._lock:
            if self._waiting.get(name) is call:
                del self._waiting[name]
            self._running[name] = call

    def leave(self, name: tuple[str, str], call: Supersedable) -> None:
        """``call`` ended (ran, gave up or was superseded)."""
        with self._lock:
            for table in (self._waiting, self._running):
                if table.get(name) is call:
                    del table[name]

    def size(self) -> int:
        """Calls recorded (0 when none waits or runs: nothing is kept per idle key)."""
        with self._lock:
            return len(self._waiting) + len(self._running)


class Runtime:
    """The shared state of one gate, handed to every feature the gate makes.

    ``backend`` and ``sync_backend`` see the same keys; ``settings`` holds the
    gate's lease defaults; ``metrics`` receives counts and timings. The
    runtime owns the background cleanups (bounded in time, failures logged)
    and the busy probes; the process-wide ``timers`` thread runs the sync
    twin's renewals.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        sync_backend: SyncBackend | None,
        settings: TurnSettings,
        metrics: MetricsSink,
    ) -> None:
        self.id = next(_runtime_ids)
        """A number unique to this runtime (and its gate) in this process."""
        self.domain = f"backend:{id(backend)}"
        """Where this gate's turns live: gates with one domain share each key's turn, so a
        task holding a key through one of them gets the same turn back through another
        (re-entrancy) instead of waiting for itself. ``Gate.from_url`` sets it to the URL and
        namespace; a gate built on a backend object has a domain of its own."""
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.timers = _timers
        self.newest = NewestCalls()
        self.reached = False
        """True once the backend answered in this process: from then on a waiter rides out
        an outage (a failover) instead of failing at once."""
        self._sync_backend = sync_backend
        self._twin_lock = threading.Lock()
        self._sync_closed = False
        """Set by :meth:`close_sync_side` (guarded by ``_twin_lock``)."""
        self._background: set[asyncio.Future[Any]] = set()
        self._probes: list[BusyProbe] = []

    @property
    def sync_backend(self) -> SyncBackend:
        """The sync twin of :attr:`backend` (made on first use)."""
        if self._sync_backend is None:
            with self._twin_lock:  # threads may race to their first turn_sync
                if self._sync_backend is None:
                    twin = self.backend.sync_twin()
                    if self._sync_closed:  # made after the gate closed: as closed as before
                        twin.close()
                    self._sync_backend = twin
        return self._sync_backend

    def close_sync_side(self) -> SyncBackend | None:
        """Mark the sync side closed and return the twin to close, if one was made (a
        twin made later, by a thread that asks after the close, is closed as it is made:
        a thread racing the close must not get a twin that nobody will ever close)."""
        with self._twin_lock:
            self._sync_closed = True
            return self._sync_backend

    def granted(self, key: str, fence: int, waited: float) -> None:
        """Count a grant and how long it waited (log it at DEBUG, trace the wait)."""
        self.metrics.count("turns_granted")
        self.metrics.observe("turn_wait_seconds", waited)
        now = time.monotonic()
        _tracing.record_wait(self, key, now - waited, fence=fence, ended=now)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "inturn: granted key %r (fence %d) after %.3fs in line",
                shown(key),
                fence,
                waited,
                extra={"inturn_key": shown(key), "inturn_fence": fence},
            )

    def wait_failed(self, key: str, asked_at: float, error: BaseException) -> None:
        """A request that asked at ``asked_at`` did not get the turn (trace the wait;
        the flow counted and logged it already)."""
        _tracing.record_wait(self, key, asked_at, error=error)

    def released(self, key: str, fence: int, acquired_at: float, lost: str | None) -> None:
        """A turn's block exited: observe how long it was held (and trace the hold)."""
        self.metrics.observe("turn_hold_seconds", time.monotonic() - acquired_at)
        _tracing.record_hold(self, key, fence, acquired_at, lost)

    # -- busy probes ---------------------------------------------------------------

    def add_busy_probe(self, probe: BusyProbe) -> None:
        """Let ``on_busy="skip"`` ask ``probe`` whether a key is busy."""
        self._probes.append(probe)

    async def busy_elsewhere(self, key: str) -> bool:
        """True if a probe (a mailbox draining ``key``) keeps the key busy."""
        for probe in self._probes:
            if await probe.is_draining(key):
                return True
        return False

    def busy_elsewhere_sync(self, key: str) -> bool:
        """The thread twin of :meth:`busy_elsewhere`."""
        return any(probe.is_draining_sync(key) for probe in self._probes)

    # -- background cleanups -------------------------------------------------------

    def spawn(self, call: Awaitable[object], key: str, what: str) -> None:
        """Run a cleanup call in the background, bounded in time; a failure is logged."""

        async def run() -> None:
            try:
                async with asyncio.timeout(CLEANUP_TIMEOUT):
                    await call
            except Exception as exc:
                log_cleanup_failure(what, key, exc)

        task = asyncio.ensure_future(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def finish_background(self, timeout: float = 1.0) -> None:
        """Give pending cleanups ``timeout`` seconds, then cancel the rest.

        Cleanups (leave, release) are idempotent and their leases lapse anyway:
        they get a moment, not the full CLEANUP_TIMEOUT of a stalled server.
        """
        if not self._background:
            return
        pending = list(self._background)
        _, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def in_thread(self, target: Callable[[], object], name: str) -> None:
        """Run a blocking cleanup in a daemon thread of its own (threads cannot spawn tasks)."""
        threading.Thread(target=target, name=name, daemon=True).start()
