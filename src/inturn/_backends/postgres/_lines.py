"""The process-local lines of the PostgreSQL engine, shared by the async backend and its twin.

Only the head of a key's line waits in PostgreSQL's lock queue; the others
sleep on a :class:`~inturn._backends._wakeup.Wakeup` and are woken one at a
time. Every method here is a short critical section under one
``threading.Lock``; no I/O happens inside.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inturn._backends._wakeup import Wakeup
from inturn._backends.base import Grant
from inturn._errors import BackendUnavailable

__all__ = ["Holding", "LocalLines", "Waiter"]


class Waiter(Wakeup):
    """One token in a key's local line; woken on the loop or thread that waits."""

    __slots__ = ("conn", "key", "lease", "token")

    def __init__(self, key: str, token: str, lease: float, *, sync: bool) -> None:
        super().__init__(sync=sync)
        self.key = key
        self.token = token
        self.lease = lease
        self.conn: Any = None
        """The connection this waiter queues on in PostgreSQL (the head's only)."""


@dataclass(slots=True)
class Holding:
    """A granted turn: its connection holds the lock inside an open transaction.

    ``users`` counts the calls using the connection now (a renewal, a check,
    the release). The connection goes back to the pool only once it is
    ``released`` and no call uses it, so a late renewal can never run on a
    connection that already serves another turn.
    """

    key: str
    conn: Any
    grant: Grant | None = None
    lease_until: float = 0.0
    """When the lease lapses unless renewed (``time.monotonic()``)."""
    users: int = 0
    released: bool = False


@dataclass(frozen=True, slots=True)
class LineView:
    """One key's local line as :meth:`LocalLines.view` saw it (for ``statistics()``)."""

    key: str
    holder: str | None
    fence: int | None
    lease_until: float | None
    waiting: int
    sessions: frozenset[int]
    """The server pids of the line's connections (its holder's, its head's)."""


@dataclass(slots=True)
class _Line:
    holder: str | None = None
    waiters: dict[str, Waiter] = field(default_factory=dict)
    outage: BackendUnavailable | None = None
    """Why the line's last try to reach the server failed (None once one got through)."""


class LocalLines:
    """The process-local lines: one FIFO line per key, for every loop and thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lines: dict[str, _Line] = {}
        self.waiters: dict[str, Waiter] = {}
        self.holds: dict[str, Holding] = {}

    def enter(self, waiter: Waiter) -> bool:
        """Queue a waiter at the end of its key's line; True when the key was idle here."""
        with self.lock:
            line = self.lines.get(waiter.key)
            idle = line is None
            if line is None:
                line = self.lines[waiter.key] = _Line()
            line.waiters[waiter.token] = waiter
            self.waiters[waiter.token] = waiter
            return idle

    def hold_if_idle(self, key: str, token: str, holding: Holding) -> bool:
        """Become the holder-to-be of a key idle here (try_acquire); False if it has a line."""
        with self.lock:
            if key in self.lines:
                return False
            self.lines[key] = _Line(holder=token)
            self.holds[token] = holding
            return True

    def find(self, token: str) -> tuple[Waiter | None, Holding | None]:
        """The token's place: waiting in a line, holding, or neither."""
        with self.lock:
            return self.waiters.get(token), self.holds.get(token)

    def is_head(self, waiter: Waiter) -> bool:
        with self.lock:
            line = self.lines.get(waiter.key)
            return line is not None and next(iter(line.waiters), None) == waiter.token

    def granted(self, waiter: Waiter, holding: Holding) -> None:
        """The waiter holds the turn now; the next waiter becomes the head."""
        with self.lock:
            line = self.lines[waiter.key]
            line.waiters.pop(waiter.token, None)
            self.waiters.pop(waiter.token, None)
            line.holder = waiter.token
            self.holds[waiter.token] = holding
            head = next(iter(line.waiters.values()), None)
        if head is not None:
            head.wake()

    def remove(self, waiter: Waiter) -> None:
        """The waiter left: wake the new head if it was the head; forget an idle key."""
        head = None
        with self.lock:
            self.waiters.pop(waiter.token, None)
            line = self.lines.get(waiter.key)
            if line is None or waiter.token not in line.waiters:
                return
            was_head = next(iter(line.waiters)) == waiter.token
            del line.waiters[waiter.token]
            if was_head:
                head = next(iter(line.waiters.values()), None)
            if line.holder is None and not line.waiters:
                del self.lines[waiter.key]
        if head is not None:
            head.wake()

    def close_waiters(self, mine: Callable[[Waiter], bool]) -> list[Waiter]:
        """A face of the backend is closing: mark the waiters ``mine`` picks closed and wake
        them; each one's wait then leaves its line and raises (see ``Plan.wait``)."""
        with self.lock:
            closing = [w for w in self.waiters.values() if mine(w)]
        for waiter in closing:
            waiter.close()
        return closing

    def still_waiting(self, closing: list[Waiter]) -> list[Waiter]:
        """Those of ``closing`` still in a line."""
        with self.lock:
            return [w for w in closing if self.waiters.get(w.token) is w]

    def failed(self, key: str, error: BackendUnavailable) -> None:
        """The line's try to reach the server (its head's) failed: every waiter of the line
        in this process hears of it (see :meth:`outage`), the sleeping ones at once."""
        with self.lock:
            line = self.lines.get(key)
            if line is None:
                return
            line.outage = error
            waiters = list(line.waiters.values())
        for waiter in waiters:
            waiter.wake()

    def answered(self, key: str) -> None:
        """The server answered the line's head: the outage, if any, is over."""
        with self.lock:
            line = self.lines.get(key)
            if line is not None:
                line.outage = None

    def outage(self, key: str) -> BackendUnavailable | None:
        """Why the line cannot reach the server now (None: nothing known against it)."""
        with self.lock:
            line = self.lines.get(key)
            return None if line is None else line.outage

    def borrow(self, token: str) -> Holding | None:
        """The token's holding, counted as in use until :meth:`give_back`; None if not held."""
        with self.lock:
            holding = self.holds.get(token)
            if holding is None or holding.conn is None or holding.released:
                return None
            holding.users += 1
            return holding

    def unhold(self, key: str, token: str) -> Holding | None:
        """Forget the holder (the line goes when nobody waits); the caller then uses the
        holding's connection to end the turn and gives it back with :meth:`give_back`."""
        with self.lock:
            holding = self.holds.pop(token, None)
            line = self.lines.get(key)
            if line is not None and line.holder == token:
                line.holder = None
                if not line.waiters:
                    del self.lines[key]
            if holding is not None:
                holding.released = True
                holding.users += 1
            return holding

    def give_back(self, holding: Holding) -> Any:
        """Done with the holding's connection: returns it when it may go back to the pool."""
        with self.lock:
            holding.users -= 1
            if not holding.released or holding.users > 0 or holding.conn is None:
                return None
            conn, holding.conn = holding.conn, None
            return conn

    def view(self) -> list[LineView]:
        """Every local line now: its holder (if held here), fence, lease, waiters, sessions."""
        views = []
        with self.lock:
            for key, line in self.lines.items():
                holding = self.holds.get(line.holder) if line.holder is not None else None
                granted = holding.grant if holding is not None else None
                conns = [w.conn for w in line.waiters.values()]
                conns.append(holding.conn if holding is not None else None)
                pids = frozenset(
                    c.info.backend_pid for c in conns if c is not None and not c.closed
                )
                views.append(
                    LineView(
                        key,
                        line.holder,
                        granted.fence if granted is not None else None,
                        holding.lease_until if holding is not None and granted else None,
                        len(line.waiters),
                        pids,
                    )
                )
        return views

    def footprint(self) -> int:
        with self.lock:
            return len(self.lines) + len(self.waiters) + len(self.holds)
