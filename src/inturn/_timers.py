"""One daemon thread per process that runs due callbacks: the sync twin's lease renewals."""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

__all__ = ["TimerHandle", "TimerThread"]

logger = logging.getLogger(__name__)


class TimerHandle:
    """A scheduled callback; :meth:`cancel` stops it if it has not started."""

    __slots__ = ("_timers", "callback", "cancelled", "when")

    def __init__(self, timers: TimerThread, when: float, callback: Callable[[], None]) -> None:
        self._timers = timers
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._timers._cancelled += 1


class TimerThread:
    """Runs callbacks at points of the monotonic clock, in one lazily started thread.

    Callbacks run one at a time and must not block for long (a renewal is one
    bounded server call). After ``os.fork()`` the child starts its own thread on
    first use: threads do not survive a fork (Celery's prefork pool forks).
    """

    def __init__(self, name: str = "inturn-timers") -> None:
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._pid = -1
        self._thread: threading.Thread | None = None
        self._cancelled = 0  # cancelled handles still in the heap (approximate)

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(self, when, callback)
        with self._cond:
            if self._pid != os.getpid() or self._thread is None:
                self._pid = os.getpid()
                self._heap = []
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            if self._cancelled > 1024 and self._cancelled * 2 > len(self._heap):
                # Cancelled timers stay in the heap until due (popping them early would
                # empty it and wake the thread on every push); compact now and then.
                self._heap = [item for item in self._heap if not item[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0
            # Wake the thread only if this is now the earliest timer (renewals are
            # mostly later than those already waiting: no thread switch per turn).
            earliest = not self._heap or when < self._heap[0][0]
            heapq.heappush(self._heap, (when, next(self._seq), handle))
            if earliest:
                self._cond.notify()
        return handle

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        handle = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(delay)
            if handle.cancelled:
                self._cancelled = max(0, self._cancelled - 1)
                continue
            try:
                handle.callback()
            except Exception:  # a timer must never die: log and go on
                logger.exception("inturn timer callback failed")
