"""The in-memory engine's state and its atomic operations, under one lock.

The in-memory backend (``memory://``, the default): one process, no server.

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

import dataclasses
import itertools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from inturn._backends._wakeup import Wakeup
from inturn._backends.base import (
    BoxState,
    ClaimResult,
    Grant,
    KeyState,
    ResumeStatus,
    Statistics,
    SubmitStatus,
    Submitted,
    Taken,
)
from inturn._errors import ConfigurationError

__all__ = ["Clock", "MemoryCore"]

_cores: weakref.WeakSet[MemoryCore] = weakref.WeakSet()


def _mark_forked() -> None:
    for core in list(_cores):
        core.forked = True


os.register_at_fork(after_in_child=_mark_forked)


def _refuse_after_fork() -> NoReturn:
    raise ConfigurationError(
        "this memory:// gate was made before fork(): in the child it would exclude nothing "
        "from the parent and its other children. Make the gate in the child, after the "
        "fork (Celery: in worker_process_init), or use redis:// or postgresql:// to "
        "exclude across processes"
    )


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
    not_before: float = 0.0
    """Epoch seconds before which the head is not taken (a retry's backoff)."""


@dataclass(slots=True)
class _Key:
    holder: str | None = None
    expires_at: float = 0.0
    fence: int = 0
    held_since: float = 0.0
    line: dict[str, _Waiter] = field(default_factory=dict)


class MemoryCore:
    """The shared state and every atomic operation, under one lock."""

    def __init__(self, clock: Clock) -> None:
        self.forked = False
        """Set in a child process after ``fork()``: this state excludes nothing there."""
        _cores.add(self)
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
        entry.fence = next(self._fences)
        entry.held_since = time.time()
        return Grant(fence=entry.fence, granted_at=time.monotonic())

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
        if self.forked:
            _refuse_after_fork()
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
        if self.forked:
            _refuse_after_fork()
        with self._lock:
            return self._if_free(key, token, lease, self._clock())

    def _if_free(self, key: str, token: str, lease: float, now: float) -> Grant | None:
        """Grant the turn if nobody holds it or waits (lock held)."""
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
        if self.forked:
            _refuse_after_fork()
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
        take: int,
        turn: tuple[str, float] | None = None,
    ) -> Submitted:
        if self.forked:
            _refuse_after_fork()
        with self._lock:
            now = self._clock()
            box = self._boxes.setdefault(name, _Box())
            dropped = 0
            if len(box.queue) >= max_pending:
                if not drop_oldest:
                    self._drop_idle_box(name, box)
                    return Submitted(SubmitStatus.REFUSED)
                box.queue.popleft()
                dropped = 1
            box.queue.append(message)
            if self._box_drainer(box, now) is not None:
                return Submitted(SubmitStatus.QUEUED, dropped)
            box.drainer, box.drainer_until = token, now + lease
            first = None
            if take:
                first = self._with_turn(
                    name[1], self._take(name, box, take, now, lease, ack=False), turn, now
                )
            return Submitted(SubmitStatus.DRAINER, dropped, first)

    def mb_take(
        self,
        name: tuple[str, str],
        token: str,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Taken:
        with self._lock:
            now = self._clock()
            taken = self._take_as(name, token, limit, now, lease, ack=ack)
            return self._with_turn(name[1], taken, turn, now)

    def _take_as(
        self, name: tuple[str, str], token: str, limit: int, now: float, lease: float, *, ack: bool
    ) -> Taken:
        """:meth:`_take` if ``token`` is the box's drainer (lock held)."""
        box = self._boxes.get(name)
        if box is None or self._box_drainer(box, now) != token:
            return Taken(lost_role=True)
        return self._take(name, box, limit, now, lease, ack=ack)

    def _with_turn(
        self, key: str, taken: Taken, turn: tuple[str, float] | None, now: float
    ) -> Taken:
        """``taken``, with the key's turn granted to ``turn``'s token if it asked and the
        turn is free (lock held)."""
        if turn is None or not taken.messages:
            return taken
        return dataclasses.replace(taken, turn=self._if_free(key, turn[0], turn[1], now))

    def _take(
        self, name: tuple[str, str], box: _Box, limit: int, now: float, lease: float, *, ack: bool
    ) -> Taken:
        box.drainer_until = now + lease
        if ack:
            box.inflight.clear()
        if box.inflight:
            return Taken(messages=tuple(box.inflight))
        if not box.queue:
            box.drainer = None
            self._drop_idle_box(name, box)
            return Taken()
        retry_in = box.not_before - time.time()
        if retry_in > 0:
            return Taken(retry_in=retry_in)
        box.not_before = 0.0
        while box.queue and len(box.inflight) < limit:
            box.inflight.append(box.queue.popleft())
        return Taken(messages=tuple(box.inflight))

    def mb_release_take(
        self,
        name: tuple[str, str],
        token: str,
        turn_token: str,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Taken:
        """Take first, then release: the next holder never sees the batch unacknowledged.
        With ``turn``, a batch taken while nobody waits keeps the turn for that token."""
        with self._lock:
            now = self._clock()
            taken = self._take_as(name, token, limit, now, lease, ack=ack)
            entry = self._keys.get(name[1])
            if entry is None or entry.holder != turn_token:
                return taken
            if turn is not None and taken.messages and not entry.line:
                return dataclasses.replace(taken, turn=self._grant(entry, *turn, now))
            self._hand_off(name[1], entry, now)
            return taken

    def mb_done(self, name: tuple[str, str], token: str) -> None:
        with self._lock:
            box = self._boxes.get(name)
            if box is not None and box.drainer == token:
                box.inflight.clear()

    def mb_retry(
        self, name: tuple[str, str], token: str, messages: list[str], not_before: float
    ) -> None:
        with self._lock:
            box = self._boxes.get(name)
            if box is not None and box.drainer == token:
                box.inflight.clear()
                box.queue.extendleft(reversed(messages))
                box.not_before = not_before if messages else 0.0

    def mb_resume(self, name: tuple[str, str], token: str, lease: float) -> ResumeStatus:
        with self._lock:
            now = self._clock()
            box = self._boxes.get(name)
            if box is None:
                return ResumeStatus.IDLE
            if self._box_drainer(box, now) is not None:
                return ResumeStatus.LIVE
            if not box.queue and not box.inflight:
                self._drop_idle_box(name, box)
                return ResumeStatus.IDLE
            box.queue.extendleft(reversed(box.inflight))  # redelivered first
            box.inflight.clear()
            box.drainer, box.drainer_until = token, now + lease
            return ResumeStatus.RESUMED

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

    def statistics(self, key: str | None, limit: int, namespace: str) -> Statistics:
        with self._lock:
            now = self._clock()
            keys: list[KeyState] = []
            for name in sorted(self._keys) if key is None else [key]:
                entry = self._live(name, now)
                if entry is None:
                    continue
                held = entry.holder is not None
                keys.append(
                    KeyState(
                        key=name,
                        holder=entry.holder,
                        fence=entry.fence if held else None,
                        lease_left=max(0.0, entry.expires_at - now) if held else None,
                        held_since=entry.held_since if held else None,
                        waiting=len(entry.line),
                    )
                )
            boxes = [
                BoxState(
                    mailbox=mailbox,
                    key=name,
                    queued=len(box.queue),
                    in_flight=len(box.inflight),
                    draining=self._box_drainer(box, now) is not None,
                )
                for (mailbox, name), box in sorted(self._boxes.items())
                if key is None or name == key
            ]
            dead = {mailbox: len(entries) for mailbox, entries in self._dead.items() if entries}
        truncated = len(keys) > limit or len(boxes) > limit
        return Statistics(
            namespace=namespace,
            keys=tuple(keys[:limit]),
            boxes=tuple(boxes[:limit]),
            dead_letters=dead,
            truncated=truncated,
        )

    def marks(self) -> int:
        """Dedup marks still inside their window (after dropping expired ones)."""
        with self._lock:
            now = self._clock()
            for name in [n for n, m in self._marks.items() if now >= m.expires_at]:
                del self._marks[name]
            return len(self._marks)
