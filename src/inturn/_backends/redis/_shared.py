"""What the async backend and its sync twin share: limits, error mapping, reply decoding,
the KEYS and ARGV of each script, the process's wake-up channel, and the bookkeeping of
the waiters of one event loop (``LoopState``) or of the threads (``Lines``).

Nothing here does I/O; :mod:`._async` and :mod:`._sync` send the commands.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio.cluster
import redis.cluster
import redis.exceptions

from inturn._backends.base import (
    ClaimResult,
    Confirmation,
    Grant,
)
from inturn._errors import BackendUnavailable

from ._calls import SUPERSEDE_KEEP as SUPERSEDE_KEEP  # re-exported, as are the three below
from ._calls import Call as Call
from ._calls import Scripts as Scripts
from ._calls import ms as ms
from ._errors import map_errors as map_errors  # re-exported: the twins import it from here
from ._errors import unavailable as unavailable
from ._keys import KeySpace
from ._lua import (
    ABANDON,
    CLAIM,
    FINISH,
    JOIN,
    LEAVE,
    REFRESH,
    RELEASE,
    RENEW,
    STOP_RUNNING,
    SUPERSEDE,
)
from ._lua_boxes import (
    MB_DEAD,
    MB_RELEASE_TAKE,
    MB_RENEW,
    MB_RESUME,
    MB_RETRY,
    MB_SUBMIT,
    MB_TAKE,
)
from ._mux import Mux, sha1
from ._nodes import NodeMuxes

logger = logging.getLogger("inturn")

RECHECK_MAX = 2.0
"""Longest sleep (seconds) of a waiter between two re-checks (the safety net)."""

CONNECT_TIMEOUT = 5.0
MAX_CONNECTIONS = 32
"""Connections per pool (per event loop, and one pool for threads) made by from_url."""
SOCKET_TIMEOUT = 5.0
"""Longest wait (seconds) for one reply; with the retries, a paused server is noticed in ~15 s."""
IDLE_READ = 5.0
"""How long the sync listener thread blocks on one read before it checks whether to stop."""


SCRIPTS = {
    "join": JOIN,
    "release": RELEASE,
    "renew": RENEW,
    "leave": LEAVE,
    "refresh": REFRESH,
    "claim": CLAIM,
    "finish": FINISH,
    "abandon": ABANDON,
    "supersede": SUPERSEDE,
    "stop_running": STOP_RUNNING,
    "mb_submit": MB_SUBMIT,
    "mb_take": MB_TAKE,
    "mb_retry": MB_RETRY,
    "mb_resume": MB_RESUME,
    "mb_renew": MB_RENEW,
    "mb_release_take": MB_RELEASE_TAKE,
    "mb_dead": MB_DEAD,
}

SHAS = {name: (sha1(lua), lua) for name, lua in SCRIPTS.items()}


# -- reply decoding ---------------------------------------------------------------------


def recheck_interval(lease: float) -> float:
    """How long a waiter sleeps between two re-checks: a third of its lease, within bounds."""
    return min(RECHECK_MAX, max(0.05, lease / 3))


def alive_ms(lease: float) -> int:
    """A waiter is declared dead when it missed three re-checks."""
    return ms(recheck_interval(lease) * 3)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def is_cluster(client: Any) -> bool:
    return isinstance(client, redis.asyncio.cluster.RedisCluster | redis.cluster.RedisCluster)


def decode_grant(reply: Sequence[Any], sent_at: float, lease: float) -> Grant:
    """A grant from a script's ``{1, fence, pttl_ms}`` reply, with a safe lease start.

    The lease is known to last until ``sent_at + pttl``; counting it from
    ``sent_at + pttl - lease`` never overestimates what is left.
    """
    pttl = int(reply[2]) / 1000
    return Grant(fence=int(reply[1]), granted_at=sent_at + min(pttl, lease) - lease)


def decode_claim(reply: Sequence[Any]) -> ClaimResult:
    state = text(reply[0])
    if state == "done":
        return ClaimResult("done", text(reply[1]) if reply[1] else None)
    return ClaimResult("new" if state == "new" else "in_progress")


def holder_of(value: bytes | str | None, token: str) -> bool:
    """True if an owner key's value ("<token>|<fence>") names ``token``."""
    return value is not None and text(value).partition("|")[0] == token


# -- waiters ----------------------------------------------------------------------------


class Outage:
    """A waiter's re-checks that fail: retried with backoff while Redis may be restarting.

    A waiter rides out a short outage (a restart, a failover) for up to
    ``CONNECT_TIMEOUT`` seconds, never past its own deadline; then the last
    error is raised.
    """

    __slots__ = ("error", "since", "tries")

    def __init__(self) -> None:
        self.since: float | None = None
        self.error: BackendUnavailable | None = None
        self.tries = 0

    def failed(self, exc: BackendUnavailable, now: float, deadline: float | None) -> float:
        """Record a failure; return when to try again, or raise when out of grace."""
        if self.since is None:
            self.since = now
        self.error = exc
        self.tries += 1
        if now - self.since >= CONNECT_TIMEOUT or (deadline is not None and now >= deadline):
            raise exc
        retry_at = now + min(0.05 * 2.0**self.tries, 1.0)
        return retry_at if deadline is None else min(retry_at, deadline)

    def ok(self) -> None:
        self.since, self.error, self.tries = None, None, 0

    def raise_if_down(self) -> None:
        if self.error is not None:
            raise self.error


class Signal:
    """Wakes one waiting thread: a lock held until ``set()`` releases it.

    Cheaper than ``threading.Event`` for the listener thread's hand-off: no
    Condition, so the woken thread does not then wait for the Condition's lock
    that the waking thread still holds. ``wait`` consumes the signal.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        try:  # noqa: SIM105 (the listener's hot path: no context manager)
            self._lock.release()
        except RuntimeError:  # set already
            pass

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``set()``; True if it came (and is now used)."""
        return self._lock.acquire(timeout=max(timeout, 0.0))


@dataclass(slots=True)
class Waiter:
    """A token in a key's line, waiting in this process for its grant."""

    key: str
    lease: float
    next_check: float = 0.0
    solo: bool = False
    """JOIN said everyone ahead in the line is a waiter of this event loop."""
    alive_until: float = 0.0
    """Until when (monotonic) the server surely still counts this waiter alive."""
    future: asyncio.Future[object] | None = None
    """Resolved (with the grant, None for a re-check, or TIME_UP) to wake the waiting task."""
    event: Signal | None = None
    grant: Grant | None = None
    seq: int = 0
    """Its place in the order the line was joined (from JOIN; 0 while unknown)."""


def queued(waiter: Waiter, reply: Sequence[Any], sent: float) -> None:
    """A JOIN or REFRESH left the waiter in line: when to re-check; whether it is solo."""
    interval = recheck_interval(waiter.lease)
    pttl = int(reply[1]) / 1000 if len(reply) > 1 else -1
    if pttl > 0:  # the holder's lease lapses first: re-check then
        interval = min(interval, pttl + 0.002)
    waiter.next_check = time.monotonic() + interval
    # The server's mark lasts alive_ms from when the script ran (after `sent`); half of
    # it is the margin for the release that would rely on it.
    waiter.alive_until = sent + alive_ms(waiter.lease) / 2000
    if len(reply) > 3:  # a JOIN's
        waiter.solo = int(reply[2]) == 1
        waiter.seq = int(reply[3])


TIME_UP = object()
"""The result of a waiter's future that its timer resolved (nobody woke it)."""


def time_up(future: asyncio.Future[object]) -> None:
    """A waiter's sleep ended without a wake-up."""
    if not future.done():
        future.set_result(TIME_UP)


def wake(waiter: Waiter) -> None:
    if waiter.future is not None and not waiter.future.done():
        waiter.future.set_result(waiter.grant)
    if waiter.event is not None:
        waiter.event.set()


@dataclass(slots=True)
class Lines:
    """The waiters of one event loop (or of the sync twin's threads), and per key its line.

    Each key's line lists our waiters in the server's order: what a release may
    hand the turn over to without asking the server first.
    """

    waiters: dict[str, Waiter] = field(default_factory=dict)
    lines: dict[str, dict[str, Waiter]] = field(default_factory=dict)
    """Per key, the waiters in line, in the server's order."""
    changing_calls: dict[str, int] = field(default_factory=dict)
    """Per key, calls in flight that change its line (threads only; no hand-over then)."""

    def enlist(self, token: str, waiter: Waiter) -> None:
        """Register a waiter at the end of its key's line (its JOIN goes out next)."""
        self.waiters[token] = waiter
        self.lines.setdefault(waiter.key, {})[token] = waiter

    def place(self, token: str, waiter: Waiter) -> None:
        """Put a waiter in its key's line by its join sequence number.

        Threads send JOINs on several connections, so they reach the server in
        any order. An unknown number (0) goes first: no hand-over passes it.
        """
        line = self.lines.setdefault(waiter.key, {})
        line.pop(token, None)
        last = next(reversed(line.values()), None)
        line[token] = waiter
        if waiter.seq == 0 or (last is not None and (last.seq == 0 or last.seq > waiter.seq)):
            ordered = sorted(line.items(), key=lambda item: item[1].seq)
            line.clear()
            line.update(ordered)

    def forget(self, token: str) -> Waiter | None:
        waiter = self.waiters.pop(token, None)
        if waiter is not None:
            line = self.lines.get(waiter.key)
            if line is not None:
                line.pop(token, None)
                if not line:
                    del self.lines[waiter.key]
        return waiter

    def next_solo(self, key: str) -> tuple[str, Waiter] | None:
        """The waiter a release may hand the turn to at once, if any.

        It is the first of the key's line, everyone ahead of it in the server's
        line was ours, the server still counts it alive, and no call of ours
        that changes the line is in flight. The release script then confirms
        exactly this grant, and only if the waiter heads the line.
        """
        line = self.lines.get(key)
        if not line or self.changing_calls.get(key):
            return None
        token, waiter = next(iter(line.items()))
        if waiter.solo and waiter.grant is None and time.monotonic() < waiter.alive_until:
            return token, waiter
        return None

    def changing(self, key: str, delta: int) -> None:
        """Count a call that changes the key's line in (+1) or out (-1) of flight."""
        count = self.changing_calls.get(key, 0) + delta
        if count:
            self.changing_calls[key] = count
        else:
            self.changing_calls.pop(key, None)


@dataclass(slots=True, kw_only=True)
class LoopState(Lines):
    """What the async backend keeps per event loop.

    redis-py async clients are bound to the loop they were first used in, so
    each loop has its own client, pipelined connection, listener and waiters.
    """

    client: Any
    scripts: dict[str, Any]
    """redis-py Script objects, on a Cluster only (elsewhere the mux runs the scripts)."""
    channel: str
    """This loop's wake-up channel (pushes for its waiters, cancels for its calls)."""
    calls: Scripts
    """The KEYS and ARGV of the dedup and mailbox scripts for this client."""
    mux: Mux | None = None
    """The pipelined connection for scripts (None on a Cluster: its scripts go by slot)."""
    nodes: NodeMuxes | None = None
    """On a Cluster: a pipelined connection per master, for scripts (see ``_nodes``)."""
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    broken: BaseException | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the listener's current attempt to subscribe succeeds or fails (then
    replaced by a fresh event for the next attempt)."""
    again: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by a caller that wants a new attempt now, instead of after the backoff."""
    ever_subscribed: bool = False
    listener: asyncio.Task[None] | None = None
    cancels: dict[str, Callable[[], None]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    """Releases sent again in the background (their first reply was lost)."""
    closing: bool = False
    """Set by ``aclose()`` as it begins."""
    closed: bool = False
    """Set once ``aclose()`` closes the connections (see ``_closing.client_call``)."""
    client_calls: int = 0
    """Calls in flight through ``client`` (not the pipelined connection)."""

    def settle(self) -> None:
        """The listener's attempt ended (``subscribed`` or ``broken`` says how): wake
        the callers waiting for it."""
        settled, self.settled = self.settled, asyncio.Event()
        settled.set()


class ProcessChannel:
    """This process's key space and wake-up channel, shared by the async backend and its twin.

    Grants and cancels for this process's waiters arrive on the channel (each
    event loop subscribes to a sub-channel of its own).
    """

    def __init__(self, keyspace: KeySpace, channel: str) -> None:
        self.keys = keyspace
        self.channel = channel
        self.checked_eviction = False
        """The first listener to subscribe checks the eviction policy (once per process)."""

    def deliver(
        self, data: bytes | str, waiters: dict[str, Waiter], granted_at: float | None = None
    ) -> Waiter | None:
        """Match a grant ("<token>|<fence>") to a waiter of this loop or thread.

        ``granted_at``: a time before the grant, when known (the release that
        handed off was sent then). A push does not say when the grant was made;
        its arrival time is used, which is late by the push's transit (well
        inside the two thirds of a lease that renewal leaves as margin).
        """
        token, _, fence = text(data).partition("|")
        waiter = waiters.get(token)
        if waiter is not None and waiter.grant is None:
            when = time.monotonic() if granted_at is None else granted_at
            waiter.grant = Grant(fence=int(fence), granted_at=when)
            return waiter
        return None

    def handed_off(self, reply: Sequence[Any], lines: Lines, sent: float) -> Waiter | None:
        """The waiter of ours an MB_RELEASE_TAKE handed the turn to, granted (to wake now)."""
        if reply[1]:
            return self.deliver(f"{text(reply[1])}|{reply[2]}", lines.waiters, sent)
        return None


def hand_over(solo: tuple[str, Waiter], fence: int, sent: float, confirmed: Confirmation) -> Grant:
    """Start the releaser's own next waiter now, with the next fence; RELEASE names it."""
    waiter = solo[1]
    waiter.grant = Grant(fence + 1, sent, confirmed)
    wake(waiter)
    return waiter.grant


def after_release(
    process: ProcessChannel,
    lines: Lines,
    reply: Sequence[Any],
    args: list[Any],
    handed: Grant | None,
    sent: float,
) -> Waiter | None:
    """Act on RELEASE's reply: confirm a hand-over, or return the waiter of ours it chose.

    The caller wakes that waiter now instead of waiting for its push.
    """
    if handed is not None:
        # Code 1 naming our waiter with fence + 1: the script made exactly our grant.
        ok = len(reply) == 3 and reply[0] == 1 and text(reply[1]) == args[1]
        confirm(handed, ok and int(reply[2]) == handed.fence)
        if ok:
            return None
    if len(reply) == 3:
        return process.deliver(f"{text(reply[1])}|{reply[2]}", lines.waiters, sent)
    return None


def confirm(grant: Grant, ok: bool | None) -> None:
    """Resolve a handed-over grant's ``confirmed``: True, False (refused) or unknown."""
    confirmed = grant.confirmed
    if confirmed is not None and not confirmed.done():
        if ok is None:
            confirmed.cancel()
        else:
            confirmed.set_result(ok)


def log_channel_lost(exc: BaseException, backoff: float, *, ever: bool = True) -> None:
    """WARNING on the first failure, DEBUG while the reconnection keeps failing.

    ``ever``: the channel was subscribed before (else Redis was never reached: the
    callers get the error itself, and this line only says that retries go on).
    """
    level = logging.WARNING if backoff <= 0.05 else logging.DEBUG
    if ever:
        logger.log(level, "inturn: Redis wake-up channel lost (%s); reconnecting", exc)
    else:
        logger.log(level, "inturn: %s; trying again when asked", unavailable(exc, "connect"))


def idempotent(name: str, args: Sequence[Any]) -> bool:
    """Whether a script may run twice with the same arguments (a resend after a lost reply).

    SUPERSEDE counts a generation; a take that acknowledges (ack "1") deletes
    the batch in flight, which a second run would take to be the next one.
    Every other script is written to be safe twice (see :mod:`._lua`).
    """
    if name == "supersede":
        return False
    if name == "mb_take":
        return str(args[3]) != "1"
    if name == "mb_release_take":
        return str(args[4]) != "1"
    return True


@dataclass(frozen=True)
class ReplicaWait:
    """Wait for replicas before a submit is acknowledged (``?wait_replicas=N&wait_timeout=S``).

    Replication is asynchronous: a primary that fails over right after a write
    acknowledged to the caller loses it unless a replica had it. The submit's
    script is followed, on the same connection, by ``WAIT replicas timeout_ms``,
    and the submit returns once that many replicas have its write, or at the
    timeout (then a WARNING says how many had it: the message is stored on the
    primary only, and is lost if the primary fails now).
    """

    replicas: int
    timeout: float

    def command(self) -> tuple[Any, ...]:
        return ("WAIT", self.replicas, ms(self.timeout))

    def checked(self, reply: tuple[Any, Any], what: str) -> Any:
        """The script's reply, from ``(its reply, WAIT's reply)``, once WAIT's is checked."""
        self.check(reply[1], what)
        return reply[0]

    def missed(self, what: str) -> None:
        """Say that a write was acknowledged without waiting for replicas (on a Cluster,
        a call redirected to another master runs through redis-py's client, where WAIT
        cannot follow it on the same connection)."""
        logger.warning(
            "inturn: %s was redirected to another Cluster master and acknowledged without "
            "waiting for replicas: a failover now could lose it",
            what,
        )

    def check(self, acked: Any, what: str) -> None:
        if int(acked) < self.replicas:
            logger.warning(
                "inturn: %s acknowledged by %d of %d replicas within %gs: "
                "a failover now would lose it",
                what,
                int(acked),
                self.replicas,
                self.timeout,
            )
