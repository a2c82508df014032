"""The in-memory backend (``memory://``, the default): one process, no server.

Guarantees, within one process: strict FIFO with direct hand-off (release
grants the turn to the first waiter in the line and wakes exactly that waiter;
nobody polls, nobody barges); fences strictly increasing per key (one counter
per backend); leases emulated on the monotonic clock (a holder that stops
renewing loses the turn ``lease`` seconds after its last renewal, and the head
waiter is woken by a timer set to that instant); no entry kept for an idle key.
Nothing survives a restart of the process.

One backend serves every thread and event loop of the process: its state sits
behind one ``threading.Lock``, and a waiter is woken on its own loop (or its own
thread, for the sync twin).
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import ClaimResult, Grant, Taken
from ._wakeup import Wakeup

__all__ = ["MemoryBackend", "SyncMemoryBackend"]

Clock = Callable[[], float]


class _Waiter:
    """One token in a key's line, woken on the loop or thread that waits."""

    __slots__ = ("grant", "key", "lease", "signal")

    def __init__(self, key: str, lease: float, *, sync: bool) -> None:
        self.key = key
        self.lease = lease
        self.grant: Grant | None = None
        self.signal = Wakeup(sync=sync)

    def wake(self) -> None:
        self.signal.wake()


def _finite(seconds: float) -> float | None:
    return None if seconds == math.inf else seconds


@dataclass(slots=True)
class _Mark:
    """A dedup mark: in progress (with a lease) or done (with an optional result)."""

    done: bool
    token: str
    fence: int | None
    lease_until: float
    expires_at: float
    result: str | None = None


@dataclass(slots=True)
class _Box:
    """One key's queue in one mailbox."""

    queue: deque[str] = field(default_factory=deque)
    inflight: list[str] = field(default_factory=list)
    drainer: str | None = None
    drainer_until: float = 0.0


def retry_wait(message: str, now_epoch: float) -> float:
    """Seconds until a stored message may be retried (its "nb" field), 0 if now."""
    not_before = json.loads(message).get("nb", 0)
    return max(0.0, float(not_before) - now_epoch)


@dataclass(slots=True)
class _Key:
    holder: str | None = None
    expires_at: float = 0.0
    line: dict[str, _Waiter] = field(default_factory=dict)


class _MemoryCore:
    """The shared state and every atomic operation, under one lock."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._fences = itertools.count(1)
        self._marks: dict[tuple[str, str, str], _Mark] = {}
        self._purge_at = 1024
        self._boxes: dict[tuple[str, str], _Box] = {}
        self._dead: dict[str, list[str]] = {}

    # -- helpers, called with the lock held ----------------------------------------------

    def _grant(self, entry: _Key, token: str, lease: float, now: float) -> Grant:
        entry.holder = token
        entry.expires_at = now + lease
        return Grant(fence=next(self._fences), granted_at=time.monotonic())

    def _hand_off(self, key: str, entry: _Key, now: float) -> None:
        """Give the turn to the head of the line, or drop the idle entry."""
        if entry.line:
            token = next(iter(entry.line))
            waiter = entry.line.pop(token)
            waiter.grant = self._grant(entry, token, waiter.lease, now)
            waiter.wake()
        else:
            entry.holder = None
            del self._keys[key]

    def _live(self, key: str, now: float) -> _Key | None:
        """The key's entry after expiring a lapsed holder, or None when idle."""
        entry = self._keys.get(key)
        if entry is not None and entry.holder is not None and now >= entry.expires_at:
            self._hand_off(key, entry, now)
            entry = self._keys.get(key)
        return entry

    # -- operations --------------------------------------------------------------------

    def join(self, key: str, token: str, lease: float, *, sync: bool) -> Grant | None:
        with self._lock:
            now = self._clock()
            entry = self._live(key, now)
            if entry is None:
                entry = self._keys[key] = _Key()
                return self._grant(entry, token, lease, now)
            waiter = _Waiter(key, lease, sync=sync)
            entry.line[token] = waiter
            self._waiters[token] = waiter
            return None

    def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        with self._lock:
            now = self._clock()
            if self._live(key, now) is not None:
                return None
            entry = self._keys[key] = _Key()
            return self._grant(entry, token, lease, now)

    def poll(self, token: str) -> tuple[_Waiter | None, Grant | None, float]:
        """Check a waiter: its grant if it has one, else how long it may sleep.

        The sleep ends when the holder's lease would lapse, so a stalled
        holder is replaced on time without anyone polling.
        """
        with self._lock:
            waiter = self._waiters.get(token)
            if waiter is None:
                return None, None, 0.0
            now = self._clock()
            if waiter.grant is None:
                entry = self._live(waiter.key, now)
                if waiter.grant is None:
                    assert entry is not None  # a waiter is always in a line
                    return waiter, None, max(0.0, entry.expires_at - now)
            del self._waiters[token]
            return waiter, waiter.grant, 0.0

    def renew(self, key: str, token: str, lease: float) -> bool:
        with self._lock:
            now = self._clock()
            entry = self._live(key, now)
            if entry is None or entry.holder != token:
                return False
            entry.expires_at = now + lease
            return True

    def release(self, key: str, token: str) -> None:
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and entry.holder == token:
                self._hand_off(key, entry, self._clock())

    def leave(self, key: str, token: str) -> Grant | None:
        with self._lock:
            waiter = self._waiters.pop(token, None)
            entry = self._keys.get(key)
            if entry is not None and entry.line.pop(token, None) is not None:
                if entry.holder is None and not entry.line:
                    del self._keys[key]
                return None
            if waiter is not None and entry is not None and entry.holder == token:
                return waiter.grant
            return None

    def is_held(self, key: str, token: str) -> bool:
        with self._lock:
            entry = self._live(key, self._clock())
            return entry is not None and entry.holder == token

    def is_busy(self, key: str) -> bool:
        with self._lock:
            return self._live(key, self._clock()) is not None

    def footprint(self) -> int:
        with self._lock:
            return len(self._keys) + len(self._waiters) + len(self._boxes)

    # -- dedup marks -------------------------------------------------------------------

    def _purge_marks(self, now: float) -> None:
        """Drop marks past their window; amortised O(1) per claim."""
        if len(self._marks) >= self._purge_at:
            for name in [n for n, m in self._marks.items() if now >= m.expires_at]:
                del self._marks[name]
            self._purge_at = max(1024, 2 * len(self._marks))

    def claim(
        self,
        name: tuple[str, str, str],
        token: str,
        fence: int | None,
        lease: float,
        window: float,
    ) -> ClaimResult:
        with self._lock:
            now = self._clock()
            self._purge_marks(now)
            mark = self._marks.get(name)
            if mark is not None and now >= mark.expires_at:
                mark = None
            if mark is not None:
                if mark.done:
                    return ClaimResult("done", mark.result)
                taken_over = (
                    now >= mark.lease_until
                    or mark.token == token
                    or (fence is not None and mark.fence is not None and fence > mark.fence)
                )
                if not taken_over:
                    return ClaimResult("in_progress")
            self._marks[name] = _Mark(False, token, fence, now + lease, now + window)
            return ClaimResult("new")

    def finish(
        self, name: tuple[str, str, str], token: str, result: str | None, window: float
    ) -> None:
        with self._lock:
            mark = self._marks.get(name)
            if mark is not None and mark.token == token and not mark.done:
                mark.done = True
                mark.result = result
                mark.expires_at = self._clock() + window

    def abandon(self, name: tuple[str, str, str], token: str) -> None:
        with self._lock:
            mark = self._marks.get(name)
            if mark is not None and mark.token == token and not mark.done:
                del self._marks[name]

    # -- mailboxes -----------------------------------------------------------------------

    def _box_drainer(self, box: _Box, now: float) -> str | None:
        if box.drainer is not None and now >= box.drainer_until:
            box.drainer = None
        return box.drainer

    def _drop_idle_box(self, name: tuple[str, str], box: _Box) -> None:
        if not box.queue and not box.inflight and box.drainer is None:
            del self._boxes[name]

    def mb_submit(
        self,
        name: tuple[str, str],
        message: str,
        max_pending: int,
        drop_oldest: bool,
        token: str,
        lease: float,
    ) -> tuple[int, int]:
        with self._lock:
            now = self._clock()
            box = self._boxes.setdefault(name, _Box())
            dropped = 0
            if len(box.queue) >= max_pending:
                if not drop_oldest:
                    self._drop_idle_box(name, box)
                    return -1, 0
                box.queue.popleft()
                dropped = 1
            box.queue.append(message)
            if self._box_drainer(box, now) is None:
                box.drainer, box.drainer_until = token, now + lease
                return 1, dropped
            return 0, dropped

    def mb_take(
        self, name: tuple[str, str], token: str, limit: int, lease: float, ack: bool
    ) -> Taken:
        with self._lock:
            now = self._clock()
            box = self._boxes.get(name)
            if box is None or self._box_drainer(box, now) != token:
                return Taken(lost_role=True)
            box.drainer_until = now + lease
            if ack:
                box.inflight.clear()
            if box.inflight:
                return Taken(messages=tuple(box.inflight))
            if not box.queue:
                box.drainer = None
                self._drop_idle_box(name, box)
                return Taken()
            wait = retry_wait(box.queue[0], time.time())
            if wait > 0:
                return Taken(wait=wait)
            while box.queue and len(box.inflight) < limit:
                box.inflight.append(box.queue.popleft())
            return Taken(messages=tuple(box.inflight))

    def mb_done(self, name: tuple[str, str], token: str) -> None:
        with self._lock:
            box = self._boxes.get(name)
            if box is not None and box.drainer == token:
                box.inflight.clear()

    def mb_retry(self, name: tuple[str, str], token: str, messages: list[str]) -> None:
        with self._lock:
            box = self._boxes.get(name)
            if box is not None and box.drainer == token:
                box.inflight.clear()
                box.queue.extendleft(reversed(messages))

    def mb_claim(self, name: tuple[str, str], token: str, lease: float) -> int:
        with self._lock:
            now = self._clock()
            box = self._boxes.get(name)
            if box is None:
                return -1
            if self._box_drainer(box, now) is not None:
                return 0
            if not box.queue and not box.inflight:
                self._drop_idle_box(name, box)
                return -1
            box.queue.extendleft(reversed(box.inflight))  # redelivered first
            box.inflight.clear()
            box.drainer, box.drainer_until = token, now + lease
            return 1

    def mb_renew(self, name: tuple[str, str], token: str, lease: float) -> bool:
        with self._lock:
            now = self._clock()
            box = self._boxes.get(name)
            if box is None or self._box_drainer(box, now) != token:
                return False
            box.drainer_until = now + lease
            return True

    def mb_pending(self, name: tuple[str, str]) -> int:
        with self._lock:
            box = self._boxes.get(name)
            return 0 if box is None else len(box.queue)

    def mb_draining(self, name: tuple[str, str]) -> bool:
        with self._lock:
            box = self._boxes.get(name)
            return box is not None and self._box_drainer(box, self._clock()) is not None

    def mb_hint(self, mailbox: str, key: str, present: bool) -> None:
        """Nothing to do: the boxes themselves are the index (an idle key has none)."""

    def mb_hinted(self, mailbox: str) -> list[str]:
        with self._lock:
            return sorted(key for name, key in self._boxes if name == mailbox)

    def mb_dead(self, mailbox: str, entries: list[str]) -> None:
        with self._lock:
            self._dead.setdefault(mailbox, []).extend(entries)

    def mb_dead_letters(self, mailbox: str, limit: int) -> list[str]:
        with self._lock:
            return list(self._dead.get(mailbox, ())[:limit])

    def marks(self) -> int:
        """Dedup marks still inside their window (after dropping expired ones)."""
        with self._lock:
            now = self._clock()
            for name in [n for n, m in self._marks.items() if now >= m.expires_at]:
                del self._marks[name]
            return len(self._marks)


class MemoryBackend:
    """The async face of the in-memory backend. See the module docstring for guarantees.

    ``clock`` (default ``time.monotonic``) judges leases; tests inject their own.
    """

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._core = _MemoryCore(clock)
        self._twin: SyncMemoryBackend | None = None

    async def join(self, key: str, token: str, lease: float) -> Grant | None:
        return self._core.join(key, token, lease, sync=False)

    async def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        return self._core.try_acquire(key, token, lease)

    async def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while True:
            waiter, grant, lapse_in = self._core.poll(token)
            if waiter is None or grant is not None:
                return grant
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await waiter.signal.sleep(
                None if min(left, lapse_in) == math.inf else min(left, lapse_in)
            )

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
    ) -> tuple[int, int]:
        return self._core.mb_submit((name, key), message, max_pending, drop_oldest, token, lease)

    async def mb_take(
        self, name: str, key: str, token: str, *, limit: int, lease: float, ack: bool
    ) -> Taken:
        return self._core.mb_take((name, key), token, limit, lease, ack)

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
    ) -> Taken:
        """Release the key's turn held by ``turn_token`` and take the next batch (see Redis)."""
        taken = self._core.mb_take((name, key), token, limit, lease, ack)
        self._core.release(key, turn_token)
        return taken

    async def mb_done(self, name: str, key: str, token: str) -> None:
        self._core.mb_done((name, key), token)

    async def mb_retry(self, name: str, key: str, token: str, messages: list[str]) -> None:
        self._core.mb_retry((name, key), token, messages)

    async def mb_claim(self, name: str, key: str, token: str, *, lease: float) -> int:
        return self._core.mb_claim((name, key), token, lease)

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
            self._twin = SyncMemoryBackend(self._core)
        return self._twin

    async def aclose(self) -> None:
        return None


class SyncMemoryBackend:
    """The sync twin of :class:`MemoryBackend`; get it with ``MemoryBackend.sync_twin()``."""

    never_blocks = True
    """Its calls return at once (only ``wait`` sleeps, bounded by its timeout)."""

    def __init__(self, core: _MemoryCore) -> None:
        self._core = core

    def join(self, key: str, token: str, lease: float) -> Grant | None:
        return self._core.join(key, token, lease, sync=True)

    def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        return self._core.try_acquire(key, token, lease)

    def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while True:
            waiter, grant, lapse_in = self._core.poll(token)
            if waiter is None or grant is not None:
                return grant
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            waiter.signal.sleep_sync(
                None if min(left, lapse_in) == math.inf else min(left, lapse_in)
            )

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

    def close(self) -> None:
        return None


def from_url(url: str, *, namespace: str) -> MemoryBackend:
    """Build the backend for ``memory://`` (each call gets its own, isolated state)."""
    del url, namespace  # one process, one state per gate: nothing to configure
    return MemoryBackend()
